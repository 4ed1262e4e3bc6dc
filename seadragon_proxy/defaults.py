"""Request options per source or model (``defaults`` in the YAML): ``options`` and
``keep_alive`` are merged where the client left them unset, ``force`` replaces what it sent.
Pure: no I/O, no aiohttp.

Only native inference routes carry Ollama's ``options`` and ``keep_alive``; the OpenAI
routes are left alone. Entries apply in order and an earlier one wins; for plain defaults
the client always wins, for pinned (``force``) values the pin always does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .policy import Glob

OptionValue = str | int | float | bool | tuple[str | int | float | bool, ...]
KeepAlive = str | int | float

# The runner options that change how a model is loaded: a request that differs in one of
# them makes Ollama reload the model (ollama/ollama server/sched.go needsReload).
PINNABLE = ("num_ctx", "num_batch", "num_gpu", "num_thread")


@dataclass(frozen=True, slots=True)
class RequestDefaults:
    """Options merged into (or, with ``force``, imposed on) matching requests' bodies."""

    sources: tuple[Glob, ...] = ()  # empty: any source
    models: tuple[Glob, ...] = ()  # empty: any model
    options: tuple[tuple[str, OptionValue], ...] = ()
    keep_alive: KeepAlive | None = None
    force_options: tuple[tuple[str, int], ...] = ()  # replace what the client sent
    force_keep_alive: KeepAlive | None = None

    def applies(self, source: str, model: str | None) -> bool:
        if self.sources and not any(g.matches(source) for g in self.sources):
            return False
        return not self.models or (model is not None and any(g.matches(model) for g in self.models))


@dataclass(frozen=True, slots=True)
class Merged:
    """The body to forward (``None``: forward the client's bytes) and what was pinned:
    ``(key, sent, pinned)`` per value the client had different or unset."""

    doc: dict[str, Any] | None
    pinned: tuple[tuple[str, object, object], ...] = ()

    def describe(self) -> str:
        """``num_ctx 32768->8192, keep_alive unset->30m`` for the request log line."""
        return ", ".join(f"{k} {_short(sent)}->{_short(to)}" for k, sent, to in self.pinned)


ROUTES = frozenset({"/api/generate", "/api/chat", "/api/embed", "/api/embeddings"})
UNCHANGED = Merged(None)


def merge(
    doc: dict[str, Any], rules: Sequence[RequestDefaults], source: str, model: str | None
) -> Merged:
    """Apply pins first (an earlier entry's pin wins), then fill what is still unset."""
    options = doc.get("options")
    if options is not None and not isinstance(options, dict):
        return UNCHANGED  # not ours to repair: Ollama answers it with 400
    merged = dict(options or {})
    keep_alive = doc.get("keep_alive")
    matching = [rule for rule in rules if rule.applies(source, model)]
    pinned: list[tuple[str, object, object]] = []
    done: set[str] = set()
    for rule in matching:
        for name, pin in rule.force_options:
            if name in done:
                continue
            done.add(name)
            sent = merged.get(name)
            if type(sent) is not int or sent != pin:  # 8192.0 and true are not 8192
                pinned.append((name, sent, pin))
                merged[name] = pin
        forced = rule.force_keep_alive
        if forced is not None and "keep_alive" not in done and not _unloads(doc, keep_alive):
            done.add("keep_alive")
            if keep_alive != forced:
                pinned.append(("keep_alive", keep_alive, forced))
                keep_alive = forced
    changed = bool(pinned)
    for rule in matching:
        for name, value in rule.options:
            if merged.get(name) is None:
                merged[name] = list(value) if isinstance(value, tuple) else value
                changed = True
        if rule.keep_alive is not None and keep_alive is None:
            keep_alive = rule.keep_alive
            changed = True
    if not changed:
        return UNCHANGED
    out = dict(doc)
    if merged:
        out["options"] = merged
    if keep_alive is not None:
        out["keep_alive"] = keep_alive
    return Merged(out, tuple(pinned))


def apply_defaults(
    doc: dict[str, Any], rules: Sequence[RequestDefaults], source: str, model: str | None
) -> dict[str, Any] | None:
    """A new body with the defaults and pins applied, or ``None`` when nothing changes."""
    return merge(doc, rules, source, model).doc


def effective(
    rules: Sequence[RequestDefaults], source: str, model: str | None
) -> list[tuple[str, object, bool]]:
    """What a request with no options of its own gets: ``(key, value, pinned)``, for explain."""
    out: dict[str, tuple[object, bool]] = {}
    for rule in rules:
        if not rule.applies(source, model):
            continue
        for name, value in rule.force_options:
            out.setdefault(name, (value, True))
        if rule.force_keep_alive is not None:
            out.setdefault("keep_alive", (rule.force_keep_alive, True))
    for rule in rules:
        if not rule.applies(source, model):
            continue
        for name, option in rule.options:
            out.setdefault(name, (list(option) if isinstance(option, tuple) else option, False))
        if rule.keep_alive is not None:
            out.setdefault("keep_alive", (rule.keep_alive, False))
    return [(name, value, pin) for name, (value, pin) in out.items()]


def _unloads(doc: dict[str, Any], keep_alive: object) -> bool:
    """``ollama stop M``: no prompt (or messages) and ``keep_alive: 0`` — an unload order,
    which a pinned keep_alive must not turn into a load (Ollama routes.go, "unload")."""
    if keep_alive not in (0, "0", "0s", "0m", "0h") or isinstance(keep_alive, bool):
        return False
    return not doc.get("prompt") and not doc.get("messages") and not doc.get("input")


def _short(value: object) -> str:
    if value is None:
        return "unset"
    text = json.dumps(value, ensure_ascii=True) if not isinstance(value, str) else value
    text = text.encode("ascii", "backslashreplace").decode()
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return text if len(text) <= 24 else text[:21] + "..."


def encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


def describe(rules: Sequence[RequestDefaults], source: str, model: str | None, path: str) -> str:
    """One line for ``explain``: what the proxy sets in such a request's body."""
    if path not in ROUTES:
        return "forwarded as sent (only /api/generate, chat, embed and embeddings carry options)"
    values = effective(rules, source, model)
    if not values:
        return "forwarded as sent (no defaults entry matches)"
    parts = [
        f"{name} {_short(value)} " + ("(pinned: replaces the client's)" if pin else "(if unset)")
        for name, value, pin in values
    ]
    return ", ".join(parts)
