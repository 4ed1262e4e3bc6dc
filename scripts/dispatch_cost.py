"""The scheduler's cost per hand-off with few and with many waiters, over a fleet.

    .venv/bin/python scripts/dispatch_cost.py [--servers 8] [--models 20] [--handoffs 4000]
                                              [--level fifo|fair] [--tenants 1]

No HTTP: one ``Scheduler`` with ``--servers`` servers (2 slots, 3 loaded models each) and
waiters for ``--models`` models over four priority levels. The queue is kept at N waiters
(a new one joins after each hand-off) and the time of ``Slot.release()`` is measured: that
call frees the slot and runs the dispatch that picks the next waiter and its server. The
figure is the median over ``--handoffs`` hand-offs, for N = 10 and N = 10 000, with
affinity off and on; the ratio is what docs/performance.md quotes. ``--level fair`` gives
every level a ``FairLevel`` (as the proxy does) with waiters spread over ``--tenants``
tenants; ``fifo`` (the default) a ``FifoLevel``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import statistics
import time

from seadragon_proxy.scheduling import (
    Affinity,
    FairLevel,
    FifoLevel,
    LevelQueue,
    Scheduler,
    Server,
    Slot,
    Ticket,
)


def _fair(priority: int) -> LevelQueue:
    return FairLevel()


def _fifo(priority: int) -> LevelQueue:
    return FifoLevel()


async def measure(
    waiters: int,
    servers: int,
    models: int,
    handoffs: int,
    affinity: bool,
    *,
    fair: bool = False,
    tenants: int = 1,
) -> float:
    rng = random.Random(8)  # noqa: S311 - a reproducible mix, not a secret
    names = [f"model-{i}" for i in range(models)]
    fleet = [Server(f"gpu-{i}", 2, max_loaded=3) for i in range(servers)]
    for i, server in enumerate(fleet):  # each server starts with three models loaded
        server.observe_loaded([names[(3 * i + k) % models] for k in range(3)], 0.0)
    scheduler = Scheduler(
        max_size=waiters + 100,
        servers=fleet,
        affinity=Affinity(window=1, max_defer=120, min_residency=20) if affinity else None,
        level_factory=_fair if fair else _fifo,
    )
    slots: list[Slot] = []
    count = 0

    def join() -> asyncio.Task[None]:
        nonlocal count
        count += 1
        ticket = Ticket(
            id=str(count),
            source="s",
            priority=rng.choice((0, 5, 8, 10)),
            path="/api/chat",
            model=rng.choice(names),
            client_ip="127.0.0.1",
            tenant=f"tenant-{rng.randrange(tenants)}" if fair else None,
        )

        async def run() -> None:
            slots.append(await scheduler.acquire(ticket))

        return asyncio.create_task(run())

    tasks = [join() for _ in range(waiters + scheduler.slots)]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert scheduler.in_flight == scheduler.slots, scheduler
    samples = []
    gc.disable()
    try:
        for _ in range(handoffs):
            slot = slots.pop(rng.randrange(len(slots)))
            started = time.perf_counter()
            slot.release()
            samples.append(time.perf_counter() - started)
            tasks.append(join())
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            while len(slots) < scheduler.in_flight:  # noqa: ASYNC110 - let granted tasks run
                await asyncio.sleep(0)
    finally:
        gc.enable()
    for slot in slots:
        slot.release()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", type=int, default=8)
    parser.add_argument("--models", type=int, default=20)
    parser.add_argument("--handoffs", type=int, default=4000)
    parser.add_argument("--level", choices=("fifo", "fair"), default="fifo")
    parser.add_argument("--tenants", type=int, default=1)
    args = parser.parse_args()
    print(
        f"{args.servers} servers, {args.models} models, {args.level} levels, "
        f"{args.tenants} tenant(s), median of {args.handoffs} hand-offs"
    )
    fair = args.level == "fair"
    for affinity in (False, True):
        sizes = (args.servers, args.models, args.handoffs, affinity)
        small = asyncio.run(measure(10, *sizes, fair=fair, tenants=args.tenants))
        large = asyncio.run(measure(10_000, *sizes, fair=fair, tenants=args.tenants))
        print(
            f"affinity {'on ' if affinity else 'off'}: 10 waiters {small * 1e6:7.1f} µs, "
            f"10 000 waiters {large * 1e6:7.1f} µs, ratio {large / small:.2f}"
        )


if __name__ == "__main__":
    main()
