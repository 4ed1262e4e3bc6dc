"""The glue between a source's fair-share settings, the scheduler and the tenants' book:
who a request counts for, its weight and estimate, its limits (429), and what it cost.

The order itself is the scheduler's levels' (scheduling/fairness.py); this module only
fills in the ticket and keeps the per-tenant counts. No aiohttp here.
"""

from __future__ import annotations

from collections.abc import Mapping

from .exceptions import TenantLimited
from .policy import Source
from .scheduling import Scheduler, Ticket
from .tenants import TenantBook, cost, tenant_name, tenant_value
from .usage import Usage


class Tenancy:
    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.book = TenantBook()
        self._waiting: set[Ticket] = set()
        scheduler.add_listener(self._event)

    def _event(self, event: str, ticket: Ticket) -> None:
        if ticket.tenant is None:
            return
        if event == "queued":
            self._waiting.add(ticket)
            self.book.joined(ticket.tenant)
        elif ticket in self._waiting and event in ("started", "dropped"):
            self._waiting.discard(ticket)
            self.book.left(ticket.tenant)

    @staticmethod
    def tenant(source: Source, client_ip: str, headers: Mapping[str, str]) -> str:
        """The tenant a request of ``source`` counts as (``explain`` shows this too)."""
        return tenant_name(source.name, tenant_value(source.fairness.fair_by, client_ip, headers))

    def admit(
        self,
        ticket: Ticket,
        source: Source,
        headers: Mapping[str, str],
        body_bytes: int,
    ) -> None:
        """Fill in the ticket's tenant, weight, estimate and cap; raise ``TenantLimited``
        if the tenant is over ``max_queued`` or ``tokens_per_hour``."""
        fairness = source.fairness
        value = tenant_value(fairness.fair_by, ticket.client_ip, headers)
        tenant = tenant_name(source.name, value)
        ticket.tenant = tenant
        ticket.weight = fairness.weight(value)
        ticket.estimate = self.book.estimate(tenant, body_bytes)
        limits = fairness.limits
        ticket.max_in_flight = limits.max_in_flight
        where = f"limits.{{}} of source {source.name!r}"
        if limits.max_queued and self.book.waiting(tenant) >= limits.max_queued:
            raise TenantLimited(
                f"tenant {tenant!r} already has {limits.max_queued} requests waiting, "
                f"the {where.format('max_queued')}; try again later",
                limit="max_queued",
                retry_after=self.scheduler.retry_after(),
            )
        if limits.tokens_per_hour:
            now = self.scheduler.now()
            wait = self.book.over_tokens(tenant, limits.tokens_per_hour, now)
            if wait is not None:
                raise TenantLimited(
                    f"tenant {tenant!r} used {self.book.tokens_last_hour(tenant, now)} tokens "
                    f"in the last hour, the {where.format('tokens_per_hour')} is "
                    f"{limits.tokens_per_hour}; try again in {wait} s",
                    limit="tokens_per_hour",
                    retry_after=wait,
                )

    def cost(self, usage: Usage | None, output_weight: float) -> float | None:
        """A finished request's real cost from Ollama's counts, if it sent them."""
        if usage is None:
            return None
        return cost(usage.prompt_eval_count, usage.eval_count, output_weight)

    def used(self, ticket: Ticket, usage: Usage | None, charge: float | None) -> None:
        """A request ended: book its tokens (prompt + generated) against its tenant."""
        if ticket.tenant is None:
            return
        tokens = usage.prompt_eval_count + usage.eval_count if usage is not None else 0
        spent = charge if charge is not None else ticket.estimate
        self.book.used(ticket.tenant, tokens, spent, self.scheduler.now())
