"""Scenario 6, priority under load: three sources flood at once; is the best one served first?

Every job is a gated generate (``gate:prio-<target>-<run>-<i>``), so the harness decides when the
job at the upstream ends, and the fake reports which job it starts next. One step:

1. the fake says job J has started (J was dispatched);
2. the harness sends the arrivals the seeded schedule gives this step (0-2 jobs from
   random sources, one on average, so a backlog of about 30 persists; 30 at the first
   step, as many per source as the sources' shares), while J is being served;
3. the target confirms that every job sent and not yet dispatched is waiting in it;
4. the harness opens J's gate: J ends and the target dispatches the next job.

So when a job is dispatched, the set of jobs waiting in the target is known exactly: no
arrival races a dispatch, and "already waiting" needs no guess about clocks or delays.
An order error is a dispatch while a job of a better (lower) priority was waiting. A job's
wait in jobs is how many other jobs were dispatched after it arrived and before it was.
Direct has no priorities (the fake serves in arrival order): its figures are the baseline.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .. import client
from ..children import SOURCES
from ..context import Bench
from ..report import Row
from ..stats import median, percentile
from ..targets import Target

NAME = "6 priority under load"
TOP = "coding"
TIMEOUT = 30.0
SEED = 6
WEIGHTS = {"coding": 0.2, "chat": 0.3, "scripts": 0.5}
ARRIVALS = (0, 1, 2)  # arrivals per step (one on average) ...
ODDS = (0.3, 0.4, 0.3)  # ... and their odds
FIRST_BURST = {"coding": 3, "chat": 9, "scripts": 18}  # sent while the blocker is served


@dataclass
class Job:
    index: int
    source: str
    arrived: int  # the dispatch number of the job being served when it was sent
    dispatched: int = -1

    @property
    def priority(self) -> int:
        return SOURCES[self.source]

    @property
    def wait(self) -> int:
        return self.dispatched - self.arrived - 1


def schedule(total: int) -> list[list[str]]:
    """The sources arriving at each step; the same for every target. One job is dispatched
    per step, so the backlog is tracked and never allowed to run dry before the end (an
    idle slot would dispatch an arrival at once, with nothing to choose from)."""
    rng = random.Random(SEED)
    first = [source for source, n in FIRST_BURST.items() for _ in range(n)]
    rng.shuffle(first)
    steps = [first]
    sent = len(first)
    backlog = sent - 1
    names, weights = list(WEIGHTS), list(WEIGHTS.values())
    while sent < total:
        k = min(rng.choices(ARRIVALS, ODDS)[0], total - sent)
        if backlog + k == 0:
            k = 1
        steps.append(rng.choices(names, weights, k=k))
        sent += k
        backlog += k - 1
    return steps


@dataclass(frozen=True)
class Outcome:
    jobs: list[Job]
    order_errors: int

    def waits(self, source: str) -> list[float]:
        return [float(job.wait) for job in self.jobs if job.source == source]


async def measure(bench: Bench, target: Target, steps: list[list[str]]) -> Outcome:
    fake = bench.fake
    await fake.mark()
    prefix = fake.new_gate(f"prio-{target.name}") + "-"
    jobs: list[Job] = []
    waiting: dict[int, Job] = {}
    errors = 0
    async with client.session() as s, client.Load() as load:
        current = f"{prefix}blocker"  # no header: the worst priority, served as it comes
        load.start(client.generate(s, target.url, client.body(f"gate:{current}")))
        await fake.wait(TIMEOUT, started=1)
        total = sum(map(len, steps))
        for step in range(len(steps) + total + 1):  # in step s, dispatch number s is served
            for source in steps[step] if step < len(steps) else ():
                job = Job(len(jobs), source, arrived=step)
                jobs.append(job)
                waiting[job.index] = job
                data = client.body(f"gate:{prefix}{job.index}")
                load.start(client.generate(s, target.url, data, source))
            await target.wait_waiting(len(waiting), TIMEOUT)
            await fake.open_gate(current)
            if not waiting:
                break
            seen = await fake.wait(TIMEOUT, started=step + 2)  # the blocker was number 0
            current = str(seen["current"]).removeprefix("gate:")
            job = waiting.pop(int(current.removeprefix(prefix)))
            job.dispatched = step + 1
            if any(other.priority < job.priority for other in waiting.values()):
                errors += 1
        if waiting or len(jobs) != total:
            raise client.BenchError(f"{target.name}: {len(waiting)} jobs never dispatched")
        await load.done(TIMEOUT)
    return Outcome(jobs, errors)


async def run(bench: Bench) -> list[Row]:
    steps = schedule(bench.sizes.priority_jobs)
    found = {t.name: await measure(bench, t, steps) for t in bench.targets}
    bench.details["priority"] = {
        name: {
            "order_errors": o.order_errors,
            "waits": {source: o.waits(source) for source in SOURCES},
        }
        for name, o in found.items()
    }
    jobs = bench.sizes.priority_jobs
    errors: dict[str, float | None] = {n: float(o.order_errors) for n, o in found.items()}
    p50: dict[str, float | None] = {n: median(o.waits(TOP)) for n, o in found.items()}
    p95: dict[str, float | None] = {n: percentile(o.waits(TOP), 95) for n, o in found.items()}
    return [
        Row(NAME, f"order errors, {jobs} jobs", "count", errors, "diff").judge(
            "0", lambda r: r.value("proxy") == 0
        ),
        Row(NAME, f"{TOP} wait p50", "jobs", p50, "diff"),
        Row(NAME, f"{TOP} wait p95", "jobs", p95, "diff"),
    ]
