"""Which Ollama routes wait in the queue, which carry a JSON body, and the ``/api/ollama`` alias.

Pure data: the wire reference (shared/ollama-wire.md) turned into three kinds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["inference", "json", "stream"]

ALIAS_PREFIX = "/api/ollama"

# They occupy the model, so they take turns in the priority queue.
INFERENCE_PATHS = frozenset(
    {
        "/api/generate",
        "/api/chat",
        "/api/embed",
        "/api/embeddings",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/messages",
    }
)

# Small JSON bodies naming a model: read whole (bounded) so rules can match the model.
JSON_PATHS = frozenset(
    {"/api/show", "/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete"}
)


# Model management: its own permission (admin.manage_models), and behind the Host check.
MANAGEMENT_PATHS = JSON_PATHS - {"/api/show"}
BLOBS_PREFIX = "/api/blobs/"
# The routes that change what /api/tags lists, once Ollama accepted them.
CHANGES_MODELS = frozenset({"/api/pull", "/api/create", "/api/copy", "/api/delete"})


def manages_models(path: str) -> bool:
    """pull, push, create, copy, delete and blobs, by any method (``path`` canonical)."""
    return path in MANAGEMENT_PATHS or path.startswith(BLOBS_PREFIX)


def is_admin_surface(raw_path: str) -> bool:
    """The proxy's own operator routes: the admin API, ``/metrics`` and the dashboard."""
    return raw_path == "/metrics" or any(
        raw_path == p or raw_path.startswith(p + "/") for p in ("/api/admin", "/admin")
    )


@dataclass(frozen=True, slots=True)
class Route:
    """How a request is handled.

    ``inference``: JSON body read and checked, then queued.
    ``json``: JSON body read and checked, forwarded at once.
    ``stream``: body (if any) streamed through untouched, forwarded at once (blobs, GETs,
    and every path the proxy does not know, so Ollama answers its own 404/405).
    """

    path: str  # the path Ollama sees (alias removed)
    kind: Kind
    openai: bool  # errors in OpenAI's shape

    @property
    def queued(self) -> bool:
        return self.kind == "inference"

    @property
    def manages_models(self) -> bool:
        return manages_models(self.path)

    @property
    def changes_models(self) -> bool:
        return self.path in CHANGES_MODELS

    @property
    def reads_json(self) -> bool:
        return self.kind != "stream"


def canonical_path(path: str) -> str:
    """``/api/ollama/x`` is served as Ollama's ``/api/x``."""
    if path == ALIAS_PREFIX or path.startswith(ALIAS_PREFIX + "/"):
        return "/api" + path[len(ALIAS_PREFIX) :]
    return path


def classify(method: str, raw_path: str) -> Route:
    path = canonical_path(raw_path)
    openai = path.startswith("/v1/")
    if method == "POST" and path in INFERENCE_PATHS:
        return Route(path, "inference", openai)
    if (method == "POST" and path in JSON_PATHS and path != "/api/delete") or (
        method == "DELETE" and path == "/api/delete"
    ):
        return Route(path, "json", openai)
    return Route(path, "stream", openai)
