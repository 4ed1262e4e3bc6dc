"""Model names as Ollama matches them, to tell whether ``/api/tags`` lists the one asked for.

Ollama (``types/model/name.go``, ``ParseName``) reads ``[host/][namespace/]model[:tag]``
``[+build][@digest]`` and fills what is missing with ``registry.ollama.ai``, ``library``
and ``latest``; it finds the model on disk ignoring ASCII case (``Name.EqualFold``). So
``llama3``, ``library/llama3:latest``, ``LLaMA3`` and ``registry.ollama.ai/library/llama3``
are one model, listed by ``/api/tags`` as ``llama3:latest``.

``model_key`` gives that one model one key. It answers ``None`` (in doubt: never refuse)
for a name this module does not read as Ollama would with certainty: one with a build
(``+Q4_0``) or a digest (``@sha256-…``), one Ollama itself would not parse, and a cloud
model (a tag ``cloud`` or ``…-cloud``), which Ollama serves without a pull since
ollama/ollama#14574, so /api/tags need not list it.
"""

from __future__ import annotations

MAX_PART = 128  # Ollama's MaxNamePartLen; it bounds the whole name as well
DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
_WORD = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def _valid(part: str, *, dots: bool = True) -> bool:
    return (
        bool(part)
        and len(part) <= MAX_PART
        and all(c in _WORD for c in part)
        and (dots or "." not in part)
    )


def model_key(name: str) -> str | None:
    """``host/namespace/model:tag``, lower case and with Ollama's defaults filled in, or
    ``None`` when the name cannot be matched with certainty (then let the request through)."""
    if name.startswith("http://"):
        name = name[len("http://") :]
    elif name.startswith("https://"):
        name = name[len("https://") :]
    if not name or len(name) > MAX_PART or ".." in name or "+" in name or "@" in name:
        return None  # too long, a build or a digest: Ollama's own business
    path, colon, tag = name.rpartition(":") if ":" in name.rsplit("/", 1)[-1] else (name, "", "")
    if colon and (not _valid(tag) or "cloud" in tag.lower()):
        return None  # a cloud model (``:cloud``, ``-cloud``) needs no pull, so no listing
    parts = path.split("/")
    if len(parts) > 3:
        return None
    model = parts[-1]
    namespace = parts[-2] if len(parts) >= 2 else DEFAULT_NAMESPACE
    host = parts[0] if len(parts) == 3 else DEFAULT_HOST
    if not (_valid(model) and _valid(namespace, dots=False) and _valid(host)):
        return None
    return f"{host}/{namespace}/{model}:{tag or DEFAULT_TAG}".lower()
