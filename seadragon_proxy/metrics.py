"""Prometheus metrics: one registry per app, fed by finished requests and reloads; queue
gauges are read from the scheduler when scraped, so they are never out of step with it.

Label values are bounded: routes outside Ollama's known set are ``other``, and a model only
becomes a label once Ollama has answered for it with a success (a client cannot mint
label values by sending made-up names).
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .record import RequestRecord
from .routes import INFERENCE_PATHS, JSON_PATHS
from .scheduling import Health, Scheduler
from .tenants import TenantBook

KNOWN_ROUTES = INFERENCE_PATHS | JSON_PATHS | {
    "/", "/api/version", "/api/tags", "/api/ps", "/api/me", "/api/signout", "/v1/models",
}  # fmt: skip
WAIT_BUCKETS = (0.005, 0.05, 0.25, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
DURATION_BUCKETS = (0.05, 0.25, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
TOP_TENANTS = 10
TPS_BUCKETS = (1, 2, 5, 10, 15, 20, 30, 50, 75, 100, 150, 250, 500)


def route_label(route: str) -> str:
    if route in KNOWN_ROUTES:
        return route
    if route.startswith("/api/blobs/"):
        return "/api/blobs/:digest"
    if route.startswith("/v1/models/"):
        return "/v1/models/:model"
    return "other"


class QueueCollector(Collector):
    """Queue length and in-flight requests per source, as the scheduler has them now."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def collect(self) -> Iterable[Metric]:
        waiting = Tally(t.source for t in self.scheduler.queued())
        running = Tally(t.source for t in self.scheduler.running())
        queue = GaugeMetricFamily(
            "seadragon_queue_length", "Requests waiting for a slot, by source.", labels=["source"]
        )
        busy = GaugeMetricFamily(
            "seadragon_in_flight", "Requests at Ollama now, by source.", labels=["source"]
        )
        for source in sorted(waiting.keys() | running.keys()):
            queue.add_metric([source], waiting[source])
            busy.add_metric([source], running[source])
        slots = GaugeMetricFamily("seadragon_slots", "Requests Ollama may run at once.")
        slots.add_metric([], self.scheduler.slots)
        yield from (queue, busy, slots)
        yield from self._servers()

    def _servers(self) -> Iterable[Metric]:
        """Per server (label = its configured name, so bounded by the config file)."""
        label = ["server"]
        up = GaugeMetricFamily("seadragon_server_up", "1 if the server answers.", labels=label)
        slots = GaugeMetricFamily(
            "seadragon_server_slots", "Requests the server may run at once.", labels=label
        )
        busy = GaugeMetricFamily(
            "seadragon_server_in_flight", "Requests at the server now.", labels=label
        )
        loaded = GaugeMetricFamily(
            "seadragon_server_loaded_models", "Models the proxy knows loaded there.", labels=label
        )
        swaps = CounterMetricFamily(
            "seadragon_model_swaps", "Requests whose start loaded their model.", labels=label
        )
        cost = GaugeMetricFamily(
            "seadragon_swap_cost_seconds",
            "Learned time to load a model on a server (from load_duration).",
            labels=["server", "model"],
        )
        for server in self.scheduler.servers:
            name = [server.name]
            up.add_metric(name, 1 if server.health is Health.UP else 0)
            slots.add_metric(name, server.slots)
            busy.add_metric(name, len(server.running))
            loaded.add_metric(name, len(server.loaded))
            swaps.add_metric(name, server.swaps)
            # Models only appear here once a server loaded them for a request it answered.
            for model, seconds in sorted(server.swap_cost.items()):
                cost.add_metric([server.name, model], seconds)
        yield from (up, slots, busy, loaded, swaps, cost)


class TenantCollector(Collector):
    """Fair-share tenants: the top ``TOP_TENANTS`` by tokens of the last hour (and waiting),
    the rest summed as ``other`` — the label's values stay bounded however many there are."""

    def __init__(self, scheduler: Scheduler, book: TenantBook) -> None:
        self.scheduler = scheduler
        self.book = book

    def collect(self) -> Iterable[Metric]:
        tokens = GaugeMetricFamily(
            "seadragon_tenant_tokens_last_hour",
            "Prompt + generated tokens of the last hour, by tenant (top tenants, then other).",
            labels=["tenant"],
        )
        waiting = GaugeMetricFamily(
            "seadragon_tenant_waiting", "Requests waiting, by tenant (top, then other).",
            labels=["tenant"],
        )  # fmt: skip
        for name, used, queued in self.book.shares(self.scheduler.now(), top=TOP_TENANTS):
            tokens.add_metric([name], used)
            waiting.add_metric([name], queued)
        yield from (tokens, waiting)


class ReplicaCollector(Collector):
    """Which replica answers (one constant series, so cardinality stays one) and, with the
    Redis backend, whether its link to Redis is up."""

    def __init__(self, replica: str, backend: str, redis_up: Callable[[], bool] | None) -> None:
        self.replica, self.backend, self.redis_up = replica, backend, redis_up

    def collect(self) -> Iterable[Metric]:
        info = GaugeMetricFamily(
            "seadragon_replica_info",
            "Always 1: this process's replica name and queue backend.",
            labels=["replica", "backend"],
        )
        info.add_metric([self.replica, self.backend], 1)
        yield info
        if self.redis_up is not None:
            up = GaugeMetricFamily("seadragon_redis_up", "1 while the link to Redis is up.")
            up.add_metric([], 1 if self.redis_up() else 0)
            yield up


class Metrics:
    def __init__(self, scheduler: Scheduler, tenants: TenantBook | None = None) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "seadragon_requests", "Finished requests.",
            ["source", "route", "model", "status"], registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "seadragon_queue_wait_seconds", "Time inference requests waited for a slot.",
            ["source"], buckets=WAIT_BUCKETS, registry=r,
        )  # fmt: skip
        self.upstream_duration = Histogram(
            "seadragon_upstream_duration_seconds", "Time from sending to Ollama to its last byte.",
            ["source"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.tokens = Counter(
            "seadragon_eval_tokens",
            "Tokens generated (Ollama's eval_count).",
            ["model"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "seadragon_prompt_tokens", "Prompt tokens evaluated (prompt_eval_count).",
            ["model"], registry=r,
        )  # fmt: skip
        self.eval_seconds = Counter(
            "seadragon_eval_duration_seconds",
            "Time spent generating (eval_duration); rate(tokens) / rate(this) = tokens/s.",
            ["model"], registry=r,
        )  # fmt: skip
        self.tokens_per_second = Histogram(
            "seadragon_generation_tokens_per_second", "Generation speed of each request.",
            ["model"], buckets=TPS_BUCKETS, registry=r,
        )  # fmt: skip
        self.refusals = Counter(
            "seadragon_whitelist_refusals",
            "Requests refused because the client is not on the whitelist.",
            ["source"], registry=r,
        )  # fmt: skip
        self.upstream_errors = Counter(
            "seadragon_upstream_errors",
            "Ollama failures: unreachable, timeout, broke_off (mid-stream), status_5xx.",
            ["kind"], registry=r,
        )  # fmt: skip
        self.tenant_limited = Counter(
            "seadragon_tenant_limited",
            "Requests refused (429) because their tenant is over a limit of its source.",
            ["source", "limit"], registry=r,
        )  # fmt: skip
        self.hangups = Counter(
            "seadragon_client_hangups", "Clients that left before their answer was complete.",
            ["source"], registry=r,
        )  # fmt: skip
        self.queue_hangups = Counter(
            "seadragon_queue_hangups",
            "Clients that gave up while queued, before their turn (a client timeout, usually).",
            ["source"], registry=r,
        )  # fmt: skip
        self.rejoins = Counter(
            "seadragon_queue_rejoins",
            "Retries that took back the place of the same request, hung up while queued.",
            ["source"], registry=r,
        )  # fmt: skip
        self.reloads = Counter(
            "seadragon_reloads", "Reloads of the policy (config) and the whitelist.",
            ["what", "result"], registry=r,
        )  # fmt: skip
        r.register(QueueCollector(scheduler))
        if tenants is not None:
            r.register(TenantCollector(scheduler, tenants))
        self._models: set[str] = set()
        # Label lookups take a lock and hash the values each time: keep the children.
        self._request_children: dict[tuple[str, str, str, str], Any] = {}
        self._source_children: dict[str, tuple[Any, ...]] = {}
        self._model_children: dict[str, tuple[Any, ...]] = {}

    def model_label(self, record: RequestRecord) -> str:
        model = record.model
        if not model:
            return ""
        if model in self._models:
            return model
        if 200 <= record.status < 300 and len(self._models) < 1000:
            self._models.add(model)
            return model
        return "other"

    def _by_source(self, source: str) -> tuple[Any, ...]:
        """The per-source children, looked up once per source rather than per request."""
        children = self._source_children.get(source)
        if children is None:
            children = self._source_children[source] = (
                self.queue_wait.labels(source),
                self.upstream_duration.labels(source),
            )
        return children

    def _by_model(self, model: str) -> tuple[Any, ...]:
        children = self._model_children.get(model)
        if children is None:
            children = self._model_children[model] = (
                self.tokens.labels(model),
                self.prompt_tokens.labels(model),
                self.eval_seconds.labels(model),
                self.tokens_per_second.labels(model),
            )
        return children

    def observe(self, record: RequestRecord) -> None:
        """A Recorder listener: one finished request."""
        source = record.source or ""
        model = self.model_label(record)
        key = (source, route_label(record.route), model, str(record.status))
        counter = self._request_children.get(key)
        if counter is None:
            counter = self._request_children[key] = self.requests.labels(*key)
        counter.inc()
        wait, duration = self._by_source(source)
        if record.queued and record.status:
            wait.observe(record.queue_wait)
        if record.upstream_time and record.status:
            duration.observe(record.upstream_time)
        usage = record.usage
        if usage is not None:
            tokens, prompt_tokens, eval_seconds, speed = self._by_model(model)
            tokens.inc(usage.eval_count)
            prompt_tokens.inc(usage.prompt_eval_count)
            eval_seconds.inc(usage.eval_duration_ns / 1e9)
            if usage.tokens_per_second is not None:
                speed.observe(usage.tokens_per_second)
        if record.refusal == "whitelist":
            self.refusals.labels(source).inc()
        elif record.refusal in ("max_queued", "tokens_per_hour"):
            self.tenant_limited.labels(source, record.refusal).inc()
        if record.upstream_error:
            self.upstream_errors.labels(record.upstream_error).inc()
        if record.hung_up:
            self.hangups.labels(source).inc()
            if record.left_queue:
                self.queue_hangups.labels(source).inc()
        if record.rejoined:
            self.rejoins.labels(source).inc()

    def add_replica(
        self, replica: str, backend: str, redis_up: Callable[[], bool] | None = None
    ) -> None:
        """``seadragon_replica_info`` (and ``seadragon_redis_up`` with the Redis backend)."""
        self.registry.register(ReplicaCollector(replica, backend, redis_up))

    def reloaded(self, what: str, ok: bool) -> None:
        """A Live listener."""
        self.reloads.labels(what, "ok" if ok else "failed").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
