"""The scheduler on its own: order, limits, cancellation and pausing, without HTTP."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from seadragon_proxy.exceptions import QueueFull, QueueTimeout, ShuttingDown, UpstreamUnavailable
from seadragon_proxy.scheduling import (
    Affinity,
    Fit,
    Health,
    Scheduler,
    Server,
    Slot,
    State,
    Ticket,
)

_ids = itertools.count()


def ticket(source: str = "s", priority: int = 0) -> Ticket:
    return Ticket(
        id=f"t{next(_ids)}",
        source=source,
        priority=priority,
        path="/api/chat",
        model="m",
        client_ip="127.0.0.1",
    )


class Harness:
    """Queues tickets as tasks and records the order in which they are granted."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.granted: list[Ticket] = []
        self.slots: dict[Ticket, Slot] = {}
        self.tasks: dict[Ticket, asyncio.Task[Slot]] = {}

    async def enter(self, t: Ticket) -> asyncio.Task[Slot]:
        async def run() -> Slot:
            slot = await self.scheduler.acquire(t)
            self.granted.append(t)
            self.slots[t] = slot
            return slot

        task = asyncio.create_task(run())
        self.tasks[t] = task
        await asyncio.sleep(0)  # let it reach the queue (one step, not a timing wait)
        return task

    async def finish(self, t: Ticket) -> None:
        await self.tasks[t]
        self.slots[t].release()
        await asyncio.sleep(0)


async def test_lower_priority_number_first_fifo_within() -> None:
    s = Scheduler(slots=1, max_size=100)
    h = Harness(s)
    blocker = ticket(priority=99)
    await h.enter(blocker)
    order = [ticket("b", 5), ticket("a", 0), ticket("c", 8), ticket("a", 0), ticket("b", 5)]
    for t in order:
        await h.enter(t)
    assert s.queue_length == 5
    assert [t.priority for t in s.queued()] == [0, 0, 5, 5, 8]
    await h.finish(blocker)
    for _ in order:
        await h.finish(h.granted[-1])
    assert h.granted[1:] == [order[1], order[3], order[0], order[4], order[2]]


async def test_first_arrival_runs_at_once_without_queueing() -> None:
    s = Scheduler(slots=2, max_size=1)
    slot_a = await s.acquire(ticket())
    slot_b = await s.acquire(ticket())
    assert (s.in_flight, s.queue_length) == (2, 0)
    slot_a.release()
    slot_a.release()  # idempotent
    assert s.in_flight == 1
    slot_b.release()


async def test_never_more_than_slots_in_flight() -> None:
    s = Scheduler(slots=3, max_size=100)
    h = Harness(s)
    peak = 0

    def listener(event: str, _t: Ticket) -> None:
        nonlocal peak
        peak = max(peak, s.in_flight)

    s.add_listener(listener)
    tickets = [ticket() for _ in range(10)]
    for t in tickets:
        await h.enter(t)
    assert s.in_flight == 3 and s.queue_length == 7
    while len(h.granted) < 10 or s.in_flight:
        await h.finish(next(t for t in h.granted if not h.slots[t].released))
    assert peak == 3


async def test_queue_full_answers_with_ollamas_message() -> None:
    s = Scheduler(slots=1, max_size=2)
    h = Harness(s)
    for _ in range(3):
        await h.enter(ticket())
    with pytest.raises(QueueFull) as caught:
        await s.acquire(ticket())
    assert (
        caught.value.message == "server busy, please try again.  maximum pending requests exceeded"
    )
    assert caught.value.retry_after is not None and caught.value.retry_after >= 1


async def test_max_wait_fails_the_waiter_and_frees_its_place() -> None:
    s = Scheduler(slots=1, max_size=10, max_wait=0.05)
    h = Harness(s)
    await h.enter(ticket())
    late = ticket()
    task = await h.enter(late)
    with pytest.raises(QueueTimeout, match=r"queue\.max_wait"):
        await task
    assert s.queue_length == 0 and late.state is State.DONE


async def test_cancelled_waiter_is_removed_and_never_granted() -> None:
    s = Scheduler(slots=1, max_size=10)
    h = Harness(s)
    first = ticket()
    await h.enter(first)
    gone, kept = ticket(), ticket()
    await h.enter(gone)
    await h.enter(kept)
    h.tasks[gone].cancel()
    await asyncio.sleep(0)
    assert s.queue_length == 1
    await h.finish(first)
    await h.tasks[kept]
    assert h.granted == [first, kept]


async def test_waiter_cancelled_just_after_being_woken_passes_its_turn_on() -> None:
    """Granted and cancelled in the same loop step: the slot must go to the next one."""
    s = Scheduler(slots=1, max_size=10)
    h = Harness(s)
    first, unlucky, next_one = ticket(), ticket(), ticket()
    await h.enter(first)
    await h.enter(unlucky)
    await h.enter(next_one)
    h.slots[first] = await h.tasks[first]
    h.slots[first].release()  # wakes `unlucky` (its future is resolved) ...
    h.tasks[unlucky].cancel()  # ... but it is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await h.tasks[unlucky]
    await h.tasks[next_one]
    assert h.granted == [first, next_one]
    assert s.in_flight == 1


async def test_aging_lets_old_low_priority_work_through() -> None:
    """With aging=1 s per level, a priority-5 request that has waited 10 s beats a fresh 0."""
    clock = [100.0]
    s = Scheduler(slots=1, max_size=10, aging=1.0, clock=lambda: clock[0])
    h = Harness(s)
    await h.enter(ticket(priority=0))
    old = ticket("batch", 5)
    await h.enter(old)
    clock[0] += 10
    fresh = ticket("coding", 0)
    await h.enter(fresh)
    assert s.queued() == [old, fresh]
    assert s.effective_priority(old, clock[0]) == pytest.approx(-5)


async def test_reconfigure_aging_reorders_the_waiting() -> None:
    clock = [0.0]
    s = Scheduler(slots=1, max_size=10, clock=lambda: clock[0])
    h = Harness(s)
    await h.enter(ticket())
    old = ticket("batch", 5)
    await h.enter(old)
    clock[0] += 10
    fresh = ticket("coding", 0)
    await h.enter(fresh)
    assert s.queued() == [fresh, old]
    s.reconfigure(max_size=10, max_wait=0, aging=1.0)
    assert s.queued() == [old, fresh]


async def test_pause_holds_waiters_in_place_and_resume_serves_them() -> None:
    s = Scheduler(slots=1, max_size=10)
    h = Harness(s)
    first, second = ticket(), ticket()
    await h.enter(first)
    await h.enter(second)
    s.pause()
    await h.finish(first)
    assert s.in_flight == 0 and s.queue_length == 1  # free slot, but paused
    s.resume()
    await h.tasks[second]
    assert h.granted == [first, second]


async def test_returning_ticket_keeps_its_place_ahead_of_later_arrivals() -> None:
    s = Scheduler(slots=1, max_size=1)
    a = ticket(priority=5)
    slot = await s.acquire(a)
    h = Harness(s)
    later = ticket(priority=5)
    await h.enter(later)
    s.pause()
    slot.release()  # as if Ollama refused the connection: a goes back in line
    back = asyncio.create_task(s.acquire(a))
    await asyncio.sleep(0)
    assert s.queued() == [a, later]  # max_size=1 did not refuse the returning ticket
    s.resume()
    assert (await back).ticket is a


async def test_reject_waiting_and_close() -> None:
    s = Scheduler(slots=1, max_size=10)
    h = Harness(s)
    await h.enter(ticket())
    waiting = [await h.enter(ticket()) for _ in range(3)]
    assert s.reject_waiting(lambda: UpstreamUnavailable("down")) == 3
    for task in waiting:
        with pytest.raises(UpstreamUnavailable):
            await task
    assert s.close(ShuttingDown) == 0
    with pytest.raises(ShuttingDown):
        await s.acquire(ticket())


async def test_cancelled_waiters_leave_their_level_at_once() -> None:
    s = Scheduler(slots=1, max_size=1000)
    h = Harness(s)
    await h.enter(ticket())
    tasks = [await h.enter(ticket()) for _ in range(200)]
    for task in tasks[:-1]:
        task.cancel()
    await asyncio.sleep(0)
    assert s.queue_length == 1
    assert sum(len(level) for level in s._levels.values()) == 1


async def test_release_while_a_waiter_is_being_cancelled_skips_it() -> None:
    """A waiter's future is cancelled at once when its task is, but its clean-up runs a step
    later; a release in between must pass over it, not fail, and serve the next one."""
    s = Scheduler(slots=1, max_size=10)
    h = Harness(s)
    first, leaving, next_one = ticket(), ticket(), ticket()
    await h.enter(first)
    await h.enter(leaving)
    await h.enter(next_one)
    h.slots[first] = await h.tasks[first]
    h.tasks[leaving].cancel()  # its future is cancelled now; its except clause runs later
    h.slots[first].release()  # must not raise InvalidStateError
    with pytest.raises(asyncio.CancelledError):
        await h.tasks[leaving]
    await h.tasks[next_one]
    assert h.granted == [first, next_one]
    assert (s.in_flight, s.queue_length) == (1, 0)


async def test_a_fleet_keeps_slots_per_server_and_sends_work_where_it_is_allowed() -> None:
    a = Server("a", 1, models=["m"])
    b = Server("b", 2)
    s = Scheduler(max_size=100, servers=[a, b])
    h = Harness(s)
    only_b = [ticket() for _ in range(3)]
    for t in only_b:
        t.model = "other"  # a may not serve it
        await h.enter(t)
    assert [t.server for t in h.granted] == ["b", "b"] and s.queue_length == 1
    m = ticket()
    await h.enter(m)  # a is free and allows m: it does not wait behind the b work
    assert m.server == "a" and s.in_flight == 3
    await h.finish(only_b[0])
    assert only_b[2].server == "b" and s.queue_length == 0
    assert len(a.running) == 1 and len(b.running) == 2


async def test_a_down_server_gets_no_work_and_its_waiters_resume_elsewhere() -> None:
    a, b = Server("a", 1), Server("b", 1)
    s = Scheduler(max_size=100, servers=[a, b])
    h = Harness(s)
    s.set_health("a", Health.DOWN)
    first, second = ticket(), ticket()
    await h.enter(first)
    await h.enter(second)
    assert first.server == "b" and second.state is State.QUEUED
    s.set_health("a", Health.UP)
    await asyncio.sleep(0)
    assert second.server == "a"
    await h.finish(first)
    await h.finish(second)
    s.set_health("a", Health.FAILING)
    s.set_health("b", Health.DOWN)
    waits = ticket()
    await h.enter(waits)  # b may be back soon: wait for it rather than fail on a
    assert waits.state is State.QUEUED
    assert s.give_up("b", lambda: UpstreamUnavailable("gone")) == 1
    with pytest.raises(UpstreamUnavailable):
        await h.tasks[waits]
    stranded = ticket()
    await h.enter(stranded)  # every server failing: it goes, to fail fast there
    assert stranded.state is State.RUNNING and stranded.server == "a"


def test_a_server_knows_llama3_as_llama3_latest() -> None:
    server = Server("a", 1, max_loaded=1, models=["llama3*"])
    server.observe_known(["llama3:latest", "qwen:7b"])
    server.observe_loaded(["llama3:latest"], 0.0)
    assert server.allows("llama3") and not server.allows("qwen:7b")
    assert server.fit("llama3") is Fit.LOADED and server.has_loaded("llama3")
    assert "llama3" in server.loaded_names()


async def test_a_cheap_swap_buys_a_short_deferral() -> None:
    server = Server("a", 1, max_loaded=1)
    server.observe_loaded(["a:1"], 0.0)
    server.learn_load("a:1", 0.1)
    server.learn_load("b:1", 0.2)  # learned earlier: both loads are cheap
    s = Scheduler(max_size=10, servers=[server], affinity=Affinity(window=0, max_defer=100))
    h = Harness(s)
    running = ticket()
    running.model = "a:1"
    await h.enter(running)
    passed, loaded = ticket(), ticket()
    passed.model, loaded.model = "b:1", "a:1"
    await h.enter(passed)
    await h.enter(loaded)
    await h.finish(running)
    assert loaded.state is State.RUNNING and passed.state is State.QUEUED
    timer = passed._defer_timer
    assert timer is not None
    # 10 x (0.2 s to load b + 0.1 s to reload a) = 3 s, far below max_defer's 100 s.
    assert timer.when() - passed.passed_at == pytest.approx(3.0, abs=0.01)
    await h.finish(loaded)
    assert passed.state is State.RUNNING  # nothing else for a: the swap happens


async def test_min_residency_keeps_a_fresh_model_preferred_when_swaps_are_cheap() -> None:
    server = Server("a", 1, max_loaded=1)
    server.learn_load("a:1", 0.01)
    server.learn_load("b:1", 0.01)  # 10 x 0.02 s: cheap swaps would buy only 0.2 s
    s = Scheduler(
        max_size=10,
        servers=[server],
        affinity=Affinity(window=0, max_defer=100, min_residency=5),
    )
    h = Harness(s)
    first = ticket()
    first.model = "a:1"
    await h.enter(first)  # the proxy loads a:1 now
    assert first.swapped
    passed, loaded = ticket(), ticket()
    passed.model, loaded.model = "b:1", "a:1"
    await h.enter(passed)
    await h.enter(loaded)
    await h.finish(first)
    assert loaded.state is State.RUNNING
    timer = passed._defer_timer
    assert timer is not None
    # a:1 was loaded at first.started_at and keeps preference for 5 s from then.
    assert timer.when() == pytest.approx(first.started_at + 5, abs=0.01)
    await h.finish(loaded)


def spread_fleet(max_defer: float = 100.0, affinity: bool = True) -> tuple[Scheduler, Harness]:
    servers = [Server("a", 1, max_loaded=1), Server("b", 1, max_loaded=1)]
    on = Affinity(window=0, max_defer=max_defer) if affinity else None
    s = Scheduler(max_size=20, servers=servers, affinity=on, clock=clock.now)
    return s, Harness(s)


class Clock:
    """The scheduler's clock, moved by hand (the deadlines, not the timers, are checked)."""

    def __init__(self) -> None:
        self.t = 1000.0

    def now(self) -> float:
        return self.t


clock = Clock()


def wants(model: str) -> Ticket:
    t = ticket()
    t.model = model
    return t


@pytest.mark.parametrize("affinity", [False, True])
async def test_a_free_server_loads_a_model_nobody_has_rather_than_a_second_copy(
    affinity: bool,
) -> None:
    _, h = spread_fleet(affinity=affinity)
    on_a, on_b = wants("a:1"), wants("c:1")
    await h.enter(on_a)
    await h.enter(on_b)
    assert (on_a.server, on_b.server) == ("a", "b")
    second_a, first_b = wants("a:1"), wants("b:1")
    await h.enter(second_a)
    await h.enter(first_b)
    await h.finish(on_b)  # b frees: a:1 is on a, b:1 is nowhere
    if not affinity:
        assert second_a.state is State.RUNNING and second_a.server == "b"  # Part 1 order
        return
    assert first_b.state is State.RUNNING and first_b.server == "b"
    assert second_a.state is State.QUEUED and second_a.passed_at == clock.t
    timer = second_a._defer_timer
    assert timer is not None
    assert timer.when() - asyncio.get_running_loop().time() <= 100.0
    await h.finish(on_a)
    assert second_a.state is State.RUNNING and second_a.server == "a"
    assert not second_a.swapped  # served where its model was loaded: no second copy


async def test_the_spread_passes_over_a_waiter_no_longer_than_max_defer() -> None:
    _, h = spread_fleet(max_defer=5)
    on_a, on_b = wants("a:1"), wants("c:1")
    await h.enter(on_a)
    await h.enter(on_b)
    passed, first_b, first_d = wants("a:1"), wants("b:1"), wants("d:1")
    for t in (passed, first_b, first_d):
        await h.enter(t)
    await h.finish(on_b)
    assert first_b.server == "b" and passed.passed_at == clock.t
    clock.t += 5  # max_defer is up: d:1 (loaded nowhere) no longer goes first
    await h.finish(first_b)
    assert passed.state is State.RUNNING and passed.server == "b"
    assert first_d.state is State.QUEUED


async def test_servers_keep_one_model_each_when_the_first_two_jobs_loaded_the_same() -> None:
    s, h = spread_fleet()
    one, two = wants("a:1"), wants("a:1")
    await h.enter(one)
    await h.enter(two)
    assert {one.server, two.server} == {"a", "b"}  # nobody else waited: both load a:1
    line = [wants(m) for m in ("b:1", "b:1", "a:1", "a:1")]
    for t in line:
        await h.enter(t)
    await h.finish(one)  # a frees: a:1 is also on b, b:1 is nowhere: the spread takes b:1
    assert line[0].state is State.RUNNING and line[0].server == one.server
    await h.finish(two)  # b keeps a:1 (a has b:1 now): loaded work
    assert line[2].state is State.RUNNING and line[2].server == two.server
    await h.finish(line[0])
    await h.finish(line[2])
    assert line[1].server == one.server and line[3].server == two.server
    assert sum(x.swaps for x in s.servers) == 3


async def test_a_free_server_waits_for_a_model_loaded_elsewhere_while_that_drains_in_time() -> None:
    s, h = spread_fleet(max_defer=100)
    on_a, on_b = wants("a:1"), wants("b:1")
    await h.enter(on_a)
    await h.enter(on_b)
    later_b = wants("b:1")
    await h.enter(later_b)
    await h.finish(on_a)  # a frees; its only waiter's model is loaded (busy) on b
    assert later_b.state is State.QUEUED and later_b.passed_at == clock.t
    assert s.server("a").free == 1
    clock.t += 100  # max_defer is up: a loads b:1 after all
    s.refresh()
    assert later_b.state is State.RUNNING and later_b.server == "a"
    await h.finish(on_b)
    await h.finish(later_b)


async def test_a_server_kept_free_for_a_model_elsewhere_still_serves_its_own_models_work() -> None:
    _, h = spread_fleet(max_defer=100)
    on_a, on_b = wants("a:1"), wants("b:1")
    await h.enter(on_a)
    await h.enter(on_b)
    later_b, later_a = wants("b:1"), ticket(priority=5)
    later_a.model = "a:1"  # a lower level (beyond the window), for the model a has loaded
    await h.enter(later_b)
    await h.enter(later_a)
    await h.finish(on_a)  # a will not load b:1 (b drains it in time): a:1's work goes there
    assert later_a.state is State.RUNNING and later_a.server == "a" and not later_a.swapped
    assert later_b.state is State.QUEUED and later_b.passed_at == clock.t
    await h.finish(on_b)
    assert later_b.state is State.RUNNING and later_b.server == "b" and not later_b.swapped
    await h.finish(later_a)
    await h.finish(later_b)
