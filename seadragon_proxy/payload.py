"""Request bodies on JSON routes: parsed as Ollama parses them, checked, never re-encoded.

Ollama reads the body as JSON whatever the Content-Type says (``curl -d`` sends
form-urlencoded and works), so this does too. The bytes forwarded are the bytes
received; the parsed object is only looked at.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .exceptions import BadRequest


@dataclass(frozen=True, slots=True)
class JsonBody:
    raw: bytes
    doc: dict[str, Any]
    model: str | None


def inspect_json(raw: bytes, *, require_model: bool) -> JsonBody:
    """Parse ``raw`` as a JSON object and find its model (``model``, else legacy ``name``)."""
    if not raw.strip():
        raise BadRequest("missing request body")
    try:
        doc = json.loads(raw)
    except RecursionError:
        raise BadRequest("invalid JSON: nested too deeply") from None
    except UnicodeDecodeError:
        raise BadRequest("invalid JSON: the body is not UTF-8 text") from None
    except ValueError as e:
        raise BadRequest(f"invalid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise BadRequest(f"invalid JSON: expected an object, got {_json_type(doc)}")
    model: str | None = None
    for key in ("model", "name"):
        value = doc.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise BadRequest(f"invalid {key}: expected a string, got {_json_type(value)}")
        if value:
            model = value
            break
    if require_model and model is None:
        raise BadRequest("model is required")
    return JsonBody(raw, doc, model)


def _json_type(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object" if isinstance(value, dict) else "null"
