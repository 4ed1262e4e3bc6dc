"""Request bodies on JSON routes: parsed as Ollama parses them, checked, never re-encoded.

Ollama reads the body as JSON whatever the Content-Type says (``curl -d`` sends
form-urlencoded and works), so this does too. The bytes forwarded are the bytes
received; the parsed object is only looked at. The ``*_in_worker`` functions run in a
worker process (bodies.py) and send back only what the proxy needs, never the object.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .defaults import RequestDefaults, encode, merge
from .exceptions import BadRequest

_STRUCTURE = (b",", b"{", b"[")


def count_elements(chunk: bytes) -> int:
    """An upper bound on the JSON values a piece of a body can add: its commas and its
    opening brackets (those inside strings too). C-speed, so it is counted as bytes arrive."""
    return sum(chunk.count(c) for c in _STRUCTURE)


@dataclass(frozen=True, slots=True)
class JsonBody:
    raw: bytes
    doc: dict[str, Any] | None  # None when it was parsed in a worker process
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


def inspect_in_worker(raw: bytes, require_model: bool) -> tuple[str | None, str | None]:
    """In a worker process: ``(model, None)``, or ``(None, message)`` for a 400."""
    try:
        return inspect_json(raw, require_model=require_model).model, None
    except BadRequest as e:
        return None, e.message


def merge_in_worker(
    raw: bytes, rules: Sequence[RequestDefaults], source: str, model: str | None
) -> tuple[bytes, str] | None:
    """In a worker process: the body with the defaults merged in and what was pinned
    (``describe()``), or ``None`` if unchanged."""
    merged = merge(json.loads(raw), rules, source, model)
    return None if merged.doc is None else (encode(merged.doc), merged.describe())
