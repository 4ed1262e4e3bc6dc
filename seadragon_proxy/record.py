"""One record per request, filled in as it is handled and emitted once when it ends:
the canonical log line, and whatever else listens (metrics, history)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from .usage import Usage

log = structlog.get_logger("seadragon.request")


@dataclass(slots=True)
class RequestRecord:
    id: str
    method: str
    route: str
    client_ip: str
    started_at: float = field(default_factory=time.time)  # wall clock, for history
    source: str | None = None
    priority: int | None = None
    model: str | None = None
    queued: bool = False
    status: int = 0
    queue_wait: float = 0.0
    upstream_time: float = 0.0
    bytes_out: int = 0
    usage: Usage | None = None
    hung_up: bool = False
    error: str | None = None
    refusal: str | None = None  # whitelist, origin, host, manage_models, max_queued, ...
    tenant: str | None = None  # who it counts for in fair shares: "source" or "source/value"
    user_agent: str | None = None
    upstream_error: str | None = None  # unreachable, timeout, broke_off, status_5xx
    pinned: str | None = None  # "num_ctx 32768->8192": what a defaults `force:` replaced
    server: str | None = None  # the Ollama server (its name) it was sent to
    swapped: bool = False  # starting it there loaded its model (a model swap)
    api_key: str | None = None  # the name of the known API key it carried (never the key)
    left_queue: bool = False  # it went (hung up, shutdown) while still waiting for its turn
    rejoined: bool = False  # a retry that took back the place its hung-up original had

    def fields(self) -> dict[str, object]:
        """The canonical line's key/values; zero-information fields are left out."""
        out: dict[str, object] = {
            "method": self.method,
            "user_agent": (self.user_agent or "")[:200] or None,
            "route": self.route,
            "status": self.status,
            "source": self.source,
            "priority": self.priority,
            "model": self.model,
            "bytes": self.bytes_out,
            "upstream_time": round(self.upstream_time, 4),
        }
        if self.refusal:
            out["refusal"] = self.refusal
        if self.server is not None:
            out["server"] = self.server
        if self.swapped:
            out["swapped"] = True
        if self.tenant and self.tenant != self.source:
            out["tenant"] = self.tenant
        if self.refusal in ("max_queued", "tokens_per_hour"):
            out["limit"] = self.refusal
        if self.pinned:
            out["pinned"] = self.pinned
        if self.api_key:
            out["key_name"] = self.api_key  # not "api_key": that name is redacted as a secret
        if self.queued:  # the real wait, whether it ended in a turn, a 503 or a hang-up
            out["queue_wait"] = round(self.queue_wait, 4)
        if self.usage is not None:
            out["eval_count"] = self.usage.eval_count
            out["prompt_eval_count"] = self.usage.prompt_eval_count
            if self.usage.tokens_per_second is not None:
                out["tokens_per_second"] = round(self.usage.tokens_per_second, 2)
        if self.rejoined:
            out["rejoined"] = True
        if self.hung_up:
            out["hung_up"] = "while queued" if self.left_queue else True
        if self.error:
            out["error"] = self.error
        return out


RecordListener = Callable[[RequestRecord], None]


class Recorder:
    """Emits each finished record to the log and to every listener."""

    def __init__(self) -> None:
        self.listeners: list[RecordListener] = []

    def emit(self, record: RequestRecord) -> None:
        # request_id and client_ip come from the bound context (logs.bind_request).
        log.info("request", **record.fields())
        for listener in self.listeners:
            listener(record)
