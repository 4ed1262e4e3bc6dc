"""Scenario 7, fair shares: what a fair level costs per dispatch, and how fair it is.

Both measured in this process on the proxy's own scheduler (``Scheduler`` with a
``FairLevel`` per priority, as ``create_app`` builds it), with no HTTP in the way: the
figures are the scheduler's own, which HTTP would only blur.

- **Dispatch cost**: N waiters over T tenants queue behind a held slot; the slot is
  released and every waiter, once woken, releases its own at once with a real cost (its
  estimate off by up to ±50 %, so every finish corrects a counter). Drain time / N, for
  10 waiters of 1 tenant and 10 000 over 1 000 tenants (FIFO levels alongside, for
  reference). Target: 10 000 / 1 000 within 2x of 10 / 1.
- **Dispatch through the proxy**: the same through HTTP, as scenario 5 measures the drain
  (a gated blocker holds the slot; N requests wait, each on its own connection, with
  ``X-Tenant: t<i mod T>`` on a source with ``fair_by: header:X-Tenant``; the gate opens and
  the drain is timed): drain per request at 10 / 1 and 10 000 / 1 000.
- **Fairness bound**: two tenants, both backlogged all along, one slot; each request costs
  ``input + 2 x output`` tokens (the paper's weights) drawn at random up to
  ``L_input = 256``, ``L_output = 512``; the estimate is the tenant's running average. The
  figure is the largest difference in service (tokens) the two tenants received over any
  interval, max over t1 < t2 of ``|W_a(t1, t2) - W_b(t1, t2)|``, next to the paper's bound
  ``2U`` with ``U = w_in L_input + w_out L_output`` (Sheng et al., OSDI 2024, Theorem 4.3,
  for one request in flight). FIFO on the same arrivals is shown for contrast.
"""

from __future__ import annotations

import asyncio
import gc
import random
import time
from collections.abc import Callable
from itertools import count

from seadragon_proxy.scheduling import FairLevel, FifoLevel, LevelQueue, Scheduler, Ticket

from .. import client
from ..context import Bench
from ..report import Row
from ..targets import Target

NAME = "10 fair shares"
L_INPUT, L_OUTPUT, W_OUTPUT = 256, 512, 2.0
BOUND = 2 * (L_INPUT + W_OUTPUT * L_OUTPUT)
SEED = 7

Factory = Callable[[int], LevelQueue]
_ids = count()


def ticket(tenant: str, estimate: float) -> Ticket:
    n = next(_ids)
    return Ticket(
        id=str(n),
        source="s",
        priority=5,
        path="/api/generate",
        model="m",
        client_ip="127.0.0.1",
        tenant=tenant,
        estimate=estimate,
    )


async def drain(factory: Factory, waiters: int, tenants: int) -> float:
    """Seconds per dispatch: N waiters queued behind a held slot, each releasing at once."""
    scheduler = Scheduler(slots=1, max_size=waiters + 1, level_factory=factory)
    rng = random.Random(SEED)
    blocker = await scheduler.acquire(ticket("blocker", 10))

    async def wait(t: Ticket) -> None:
        slot = await scheduler.acquire(t)
        slot.release(t.estimate * rng.uniform(0.5, 1.5))

    queued = asyncio.Event()

    def on_event(event: str, t: Ticket) -> None:
        if event == "queued" and scheduler.queue_length == waiters:
            queued.set()

    scheduler.add_listener(on_event)
    tasks = [
        asyncio.create_task(wait(ticket(f"t{i % tenants}", 100 + i % 13))) for i in range(waiters)
    ]
    await queued.wait()
    scheduler.remove_listener(on_event)
    gc.collect()
    started = time.perf_counter()
    blocker.release(10)
    await asyncio.gather(*tasks)
    return (time.perf_counter() - started) / waiters


async def dispatch_cost(factory: Factory, waiters: int, tenants: int, rounds: int) -> float:
    return min([await drain(factory, waiters, tenants) for _ in range(rounds)])


def service_difference(factory: Factory, requests: int) -> float:
    """Largest |W_a - W_b| over any interval, both tenants backlogged, one request at a time."""
    rng = random.Random(SEED)
    level = factory(5)
    average = {"a": 0.0, "b": 0.0}
    seq = count(1)
    for name in ("a", "b"):  # a's batch first, then b's: far more than will be served
        for _ in range(requests):
            t = ticket(name, 0.0)
            t.seq = next(seq)  # as the scheduler numbers them
            level.push(t)
    served = {"a": 0.0, "b": 0.0}
    lowest = highest = 0.0
    for _ in range(requests):
        head = level.head()
        assert head is not None
        name = head.tenant or ""
        head.estimate = average[name] or (L_INPUT / 2 + W_OUTPUT * L_OUTPUT / 2)
        level.pop(head)
        cost = rng.randint(1, L_INPUT) + W_OUTPUT * rng.randint(1, L_OUTPUT)
        level.finished(head, cost)
        average[name] = cost if not average[name] else 0.8 * average[name] + 0.2 * cost
        served[name] += cost
        difference = served["a"] - served["b"]
        lowest, highest = min(lowest, difference), max(highest, difference)
    return highest - lowest


async def proxied_drain(bench: Bench, target: Target, waiters: int, tenants: int) -> float:
    """Seconds per request from the gate opening to the last of N answers, through HTTP."""
    fake = bench.fake
    await fake.mark()
    gate = fake.new_gate(f"fair-{waiters}-{tenants}")
    limit = 30.0 + waiters * 0.02
    data = client.body("queued")

    async def one(tenant: str) -> None:
        headers = {**client.headers("tenants"), "X-Tenant": tenant}
        async with s.post(target.url + "/api/generate", data=data, headers=headers) as r:
            answer = await r.read()
            if r.status != 200:
                raise client.BenchError(f"{target.url} answered {r.status}: {answer[:200]!r}")

    async with client.session() as s, client.Load() as load:
        load.start(client.generate(s, target.url, client.body(f"gate:{gate}"), "coding"))
        await fake.wait(30.0, started=1)
        for i in range(waiters):
            load.start(one(f"t{i % tenants}"))
        await target.wait_waiting(waiters, limit)
        opened = time.perf_counter()
        await fake.open_gate(gate)
        await load.done(limit)
        return (time.perf_counter() - opened) / waiters


async def run(bench: Bench) -> list[Row]:
    quick = bench.sizes.queue_sizes[-1] < 10_000
    large, tenants = (1_000, 100) if quick else (10_000, 1_000)
    fair: Factory = lambda priority: FairLevel()  # noqa: E731
    fifo: Factory = lambda priority: FifoLevel()  # noqa: E731
    small_fair = await dispatch_cost(fair, 10, 1, rounds=200)
    large_fair = await dispatch_cost(fair, large, tenants, rounds=3)
    small_fifo = await dispatch_cost(fifo, 10, 1, rounds=200)
    large_fifo = await dispatch_cost(fifo, large, tenants, rounds=3)
    bench.details["fairness"] = {
        "dispatch_us": {
            "fair_10_over_1": small_fair * 1e6,
            f"fair_{large}_over_{tenants}": large_fair * 1e6,
            "fifo_10_over_1": small_fifo * 1e6,
            f"fifo_{large}_over_{tenants}": large_fifo * 1e6,
        },
    }
    rows = [
        Row(NAME, "dispatch, 10 waiters / 1 tenant", "us", {"proxy": small_fair * 1e6}),
        Row(
            NAME, f"dispatch, {large} waiters / {tenants} tenants", "us",
            {"proxy": large_fair * 1e6},
        ).judge("<= 2x 10/1", lambda r: r.value("proxy") <= 2 * small_fair * 1e6),
        Row(NAME, "dispatch, FIFO levels, 10 / 1 (reference)", "us", {"proxy": small_fifo * 1e6}),
        Row(
            NAME, f"dispatch, FIFO levels, {large} / {tenants} (reference)", "us",
            {"proxy": large_fifo * 1e6},
        ),
    ]  # fmt: skip
    proxy = next((t for t in bench.targets if t.name == "proxy"), None)
    if proxy is not None:
        small_http = min([await proxied_drain(bench, proxy, 10, 1) for _ in range(5)])
        large_http = await proxied_drain(bench, proxy, large, tenants)
        bench.details["fairness"]["proxied_drain_ms"] = {
            "10_over_1": small_http * 1e3,
            f"{large}_over_{tenants}": large_http * 1e3,
        }
        rows += [
            Row(NAME, "drain per request via HTTP, 10 / 1", "ms", {"proxy": small_http * 1e3}),
            Row(
                NAME, f"drain per request via HTTP, {large} / {tenants}", "ms",
                {"proxy": large_http * 1e3},
            ).judge("<= 2x 10/1", lambda r: r.value("proxy") <= 2 * small_http * 1e3),
        ]  # fmt: skip
    requests = 2_000 if quick else 20_000
    fair_gap = service_difference(fair, requests)
    fifo_gap = service_difference(fifo, requests)
    bench.details["fairness"] |= {
        "requests": requests,
        "max_service_difference_tokens": fair_gap,
        "fifo_max_service_difference_tokens": fifo_gap,
        "paper_bound_2U_tokens": BOUND,
    }
    rows += [
        Row(
            NAME, f"max service difference, 2 tenants, {requests} requests", "tokens",
            {"proxy": fair_gap},
        ).judge(f"<= 2U = {BOUND:g}", lambda r: r.value("proxy") <= BOUND),
        Row(NAME, "the same with FIFO levels (reference)", "tokens", {"proxy": fifo_gap}),
    ]  # fmt: skip
    return rows
