"""Default request options per source or model (``defaults`` in the YAML), merged into a
request's body only where the client left them unset. Pure: no I/O, no aiohttp.

Only native inference routes carry Ollama's ``options`` and ``keep_alive``; the OpenAI
routes are left alone. Entries apply in order and an earlier one wins, the client always.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .policy import Glob

OptionValue = str | int | float | bool | tuple[str | int | float | bool, ...]


@dataclass(frozen=True, slots=True)
class RequestDefaults:
    """Options merged into matching requests' bodies where the client did not set them."""

    sources: tuple[Glob, ...] = ()  # empty: any source
    models: tuple[Glob, ...] = ()  # empty: any model
    options: tuple[tuple[str, OptionValue], ...] = ()
    keep_alive: str | int | float | None = None

    def applies(self, source: str, model: str | None) -> bool:
        if self.sources and not any(g.matches(source) for g in self.sources):
            return False
        return not self.models or (model is not None and any(g.matches(model) for g in self.models))


ROUTES = frozenset({"/api/generate", "/api/chat", "/api/embed", "/api/embeddings"})


def apply_defaults(
    doc: dict[str, Any], rules: Sequence[RequestDefaults], source: str, model: str | None
) -> dict[str, Any] | None:
    """A new body with the defaults merged in, or ``None`` when nothing changes."""
    options = doc.get("options")
    if options is not None and not isinstance(options, dict):
        return None  # not ours to repair: Ollama answers it
    merged = dict(options or {})
    keep_alive = doc.get("keep_alive")
    changed = False
    for rule in rules:
        if not rule.applies(source, model):
            continue
        for name, value in rule.options:
            if merged.get(name) is None:
                merged[name] = list(value) if isinstance(value, tuple) else value
                changed = True
        if rule.keep_alive is not None and keep_alive is None:
            keep_alive = rule.keep_alive
            changed = True
    if not changed:
        return None
    out = dict(doc)
    if merged:
        out["options"] = merged
    if keep_alive is not None:
        out["keep_alive"] = keep_alive
    return out


def encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
