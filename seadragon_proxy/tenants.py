"""Who a request counts for inside its source, and what each tenant has used. Pure: no I/O.

A **tenant** is a source plus the value its ``fair_by`` names: ``none`` (the source is one
tenant), ``client_ip``, ``api_key`` (the bearer token's SHA-256, shortened: the token itself
is never kept, logged or stored) or ``header:<Name>``. ``TenantBook`` keeps, per tenant,
how many requests wait, the tokens of the last hour (for ``tokens_per_hour`` and the
dashboard's shares) and the recent average cost (the estimate a request is charged when it
starts). Times are passed in, so it is testable without a clock.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # policy.py imports this module for Fairness
    from .policy import Source

FAIR_BY_KINDS = ("none", "client_ip", "api_key")
HEADER_PREFIX = "header:"
HOUR = 3600.0
BUCKET = 60  # seconds: tokens are counted by the minute, so memory does not grow per request
VALUE_LIMIT = 64  # a header's value is cut to this many characters: the tenant's name
NO_VALUE = "-"  # the request carried no value (no header, no key): one tenant for all such


@dataclass(frozen=True, slots=True)
class TenantLimits:
    """Per tenant of one source; 0 = no limit."""

    max_queued: int = 0
    max_in_flight: int = 0
    tokens_per_hour: int = 0

    def __bool__(self) -> bool:
        return bool(self.max_queued or self.max_in_flight or self.tokens_per_hour)


@dataclass(frozen=True, slots=True)
class Fairness:
    """A source's ``fair_by``, ``weights`` and ``limits``."""

    fair_by: str = "none"
    weights: tuple[tuple[str, float], ...] = ()
    limits: TenantLimits = field(default_factory=TenantLimits)

    def weight(self, value: str | None) -> float:
        for name, weight in self.weights:
            if name == value:
                return weight
        return 1.0


def valid_fair_by(text: str) -> str | None:
    """``None`` if ``text`` is a valid ``fair_by``, else what is wrong with it."""
    if text in FAIR_BY_KINDS:
        return None
    if text.startswith(HEADER_PREFIX):
        name = text[len(HEADER_PREFIX) :]
        if name and all(33 <= ord(c) < 127 and c not in '()<>@,;:\\"/[]?={}' for c in name):
            return None
        return f"names no valid header ({text!r}); write header:X-OpenWebUI-User-Id"
    return f"must be one of {', '.join(FAIR_BY_KINDS)} or header:<Name>, got {text!r}"


def key_hash(token: str) -> str:
    """A bearer token as a tenant value: the first 12 hex digits of its SHA-256."""
    return "key:" + hashlib.sha256(token.encode()).hexdigest()[:12]


def bearer(headers: Mapping[str, str]) -> str | None:
    value = headers.get("Authorization", "")
    scheme, _, token = value.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def tenant_value(fair_by: str, client_ip: str, headers: Mapping[str, str]) -> str | None:
    """The value ``fair_by`` names for this request (``None`` for ``fair_by: none``)."""
    if fair_by == "none":
        return None
    if fair_by == "client_ip":
        return client_ip or NO_VALUE
    if fair_by == "api_key":
        token = bearer(headers)
        return key_hash(token) if token is not None else NO_VALUE
    value = headers.get(fair_by[len(HEADER_PREFIX) :], "").strip()
    return value[:VALUE_LIMIT] if value else NO_VALUE


def tenant_name(source: str, value: str | None) -> str:
    """The tenant as shown and stored: ``source`` or ``source/value``."""
    return source if value is None else f"{source}/{value}"


def cost(prompt_tokens: int, output_tokens: int, output_weight: float) -> float:
    """What a request is charged, in input-token units: output tokens weigh more."""
    return prompt_tokens + output_weight * output_tokens


def prompt_estimate(body_bytes: int) -> float:
    """A request nobody has measured yet: its prompt's size (about 4 bytes a token)."""
    return body_bytes / 4


def describe_tenant(source: Source, client_ip: str, headers: Mapping[str, str]) -> str:
    """For ``explain``: the tenant a request counts as, and why."""
    fairness = source.fairness
    value = tenant_value(fairness.fair_by, client_ip, headers)
    name = tenant_name(source.name, value)
    if fairness.fair_by == "none":
        return f"{name} (fair_by none: the whole source is one tenant)"
    parts = [f"fair_by {fairness.fair_by}"]
    weight = fairness.weight(value)
    if weight != 1:
        parts.append(f"weight {weight:g}")
    limits = fairness.limits
    for key in ("max_queued", "max_in_flight", "tokens_per_hour"):
        if getattr(limits, key):
            parts.append(f"{key} {getattr(limits, key)}")
    return f"{name} ({', '.join(parts)})"


@dataclass(slots=True)
class _Usage:
    # Tokens by the minute they were used in, oldest first: at most 61 entries however many
    # requests. A minute's tokens count until an hour after that minute's end.
    window: deque[list[int]] = field(default_factory=deque)  # [minute, tokens]
    total: int = 0
    average: float = 0.0  # recent cost per request (exponentially weighted)
    waiting: int = 0

    def prune(self, now: float) -> None:
        window = self.window
        while window and (window[0][0] + 1) * BUCKET + HOUR <= now:
            self.total -= window.popleft()[1]

    def add(self, now: float, tokens: int) -> None:
        minute = int(now // BUCKET)
        if self.window and self.window[-1][0] == minute:
            self.window[-1][1] += tokens
        else:
            self.window.append([minute, tokens])
        self.total += tokens


class TenantBook:
    """Per-tenant counts for limits, estimates and views. Memory: tenants seen in the last
    hour (an idle one goes at the next sweep)."""

    def __init__(self) -> None:
        self._tenants: dict[str, _Usage] = {}
        self._sweep_at = 256

    def _get(self, tenant: str) -> _Usage:
        usage = self._tenants.get(tenant)
        if usage is None:
            usage = self._tenants[tenant] = _Usage()
        return usage

    # -- the queue, from the scheduler's events ---------------------------------------

    def joined(self, tenant: str) -> None:
        self._get(tenant).waiting += 1

    def left(self, tenant: str) -> None:
        usage = self._tenants.get(tenant)
        if usage is not None and usage.waiting:
            usage.waiting -= 1

    def waiting(self, tenant: str) -> int:
        usage = self._tenants.get(tenant)
        return usage.waiting if usage is not None else 0

    # -- use -----------------------------------------------------------------------

    def used(self, tenant: str, tokens: int, charge: float, now: float) -> None:
        """A request of ``tenant`` ended: ``tokens`` prompt + generated, ``charge`` its cost."""
        usage = self._get(tenant)
        usage.prune(now)
        if tokens > 0:
            usage.add(now, tokens)
        usage.average = charge if not usage.average else 0.8 * usage.average + 0.2 * charge
        if len(self._tenants) > self._sweep_at:
            self._sweep(now)

    def tokens_last_hour(self, tenant: str, now: float) -> int:
        usage = self._tenants.get(tenant)
        if usage is None:
            return 0
        usage.prune(now)
        return usage.total

    def estimate(self, tenant: str, body_bytes: int) -> float:
        """The tenant's recent average cost, or the prompt's size for a tenant not seen yet."""
        usage = self._tenants.get(tenant)
        if usage is not None and usage.average:
            return usage.average
        return prompt_estimate(body_bytes)

    def over_tokens(self, tenant: str, limit: int, now: float) -> int | None:
        """``None`` if under ``limit``, else the whole seconds until enough tokens age out."""
        usage = self._tenants.get(tenant)
        if usage is None:
            return None
        usage.prune(now)
        if usage.total < limit:
            return None
        excess = usage.total - limit
        for minute, tokens in usage.window:  # the oldest first: when is it below the limit?
            excess -= tokens
            if excess < 0:
                return max(1, math.ceil((minute + 1) * BUCKET + HOUR - now))
        return max(1, math.ceil((usage.window[-1][0] + 1) * BUCKET + HOUR - now))

    def hour(self, now: float) -> dict[str, int]:
        """Tokens of the last hour, per tenant that used any."""
        out = {}
        for name, usage in self._tenants.items():
            usage.prune(now)
            if usage.total:
                out[name] = usage.total
        return out

    def shares(self, now: float, top: int = 10) -> list[tuple[str, int, int]]:
        """(tenant, tokens in the last hour, waiting) for the ``top`` tenants by tokens
        (those waiting first), the rest summed as ``other``."""
        rows = []
        for name, usage in self._tenants.items():
            usage.prune(now)
            if usage.total or usage.waiting:
                rows.append((name, usage.total, usage.waiting))
        rows.sort(key=lambda r: (-r[1], -r[2], r[0]))
        if len(rows) <= top:
            return rows
        rest = rows[top:]
        other = ("other", sum(r[1] for r in rest), sum(r[2] for r in rest))
        return [*rows[:top], other]

    def _sweep(self, now: float) -> None:
        for name in list(self._tenants):
            usage = self._tenants[name]
            usage.prune(now)
            if not usage.window and not usage.waiting:
                del self._tenants[name]
        self._sweep_at = max(256, 2 * len(self._tenants))

    def __len__(self) -> int:
        return len(self._tenants)
