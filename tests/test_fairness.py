"""The fair level on its own: the Virtual Token Counter, checked against a plain model."""

from __future__ import annotations

import asyncio
import itertools
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from seadragon_proxy.scheduling import FairLevel, FifoLevel, Ticket
from seadragon_proxy.scheduling.levels import ModelFilter

_seq = itertools.count(1)


def ticket(tenant: str, estimate: float = 10.0, weight: float = 1.0, cap: int = 0) -> Ticket:
    seq = next(_seq)
    return Ticket(
        id=str(seq),
        source="s",
        priority=0,
        path="/api/chat",
        model="m",
        client_ip="127.0.0.1",
        tenant=tenant,
        weight=weight,
        estimate=estimate,
        max_in_flight=cap,
        seq=seq,
    )


def serve(level: FairLevel, tokens: float | None = None) -> Ticket:
    """Dispatch the head and finish it at once (one slot, a request at a time)."""
    head = level.head()
    assert head is not None
    level.pop(head)
    level.finished(head, head.estimate if tokens is None else tokens)
    return head


def test_a_late_tenant_is_interleaved_and_each_tenant_stays_fifo() -> None:
    level = FairLevel()
    a = [ticket("a") for _ in range(60)]
    for t in a:
        level.push(t)
    served = [serve(level) for _ in range(3)]
    b = [ticket("b") for _ in range(6)]
    for t in b:
        level.push(t)
    served += [serve(level) for _ in range(63)]
    assert [t for t in served if t.tenant == "a"] == a
    assert [t for t in served if t.tenant == "b"] == b
    assert max(served.index(t) for t in b) < 3 + 13


def test_weights_share_the_dispatches() -> None:
    level = FairLevel()
    for _ in range(300):
        level.push(ticket("a", weight=2))
        level.push(ticket("b", weight=1))
    served = [serve(level).tenant for _ in range(300)]
    assert 190 <= served.count("a") <= 210


def test_the_real_cost_corrects_the_estimate() -> None:
    level = FairLevel()
    for _ in range(200):
        level.push(ticket("a", estimate=10))
        level.push(ticket("b", estimate=10))
    served = []
    for _ in range(180):
        head = level.head()
        assert head is not None
        level.pop(head)
        level.finished(head, 80.0 if head.tenant == "a" else 10.0)  # a costs 8x b
        served.append(head.tenant)
    assert served.count("b") >= 4 * served.count("a")


def test_idleness_banks_no_credit() -> None:
    level = FairLevel()
    for _ in range(100):
        level.push(ticket("a"))
        level.push(ticket("b"))
    for _ in range(50):
        serve(level)
    for _ in range(20):  # c was away; it comes back with a backlog
        level.push(ticket("c"))
    served = [serve(level).tenant for _ in range(30)]
    runs = [len(list(group)) for key, group in itertools.groupby(served) if key == "c"]
    assert max(runs) == 1
    assert 9 <= served.count("c") <= 11


def test_an_idle_level_does_not_let_a_returning_tenant_catch_up() -> None:
    level = FairLevel()
    level.push(ticket("a"))
    serve(level)
    for _ in range(10):  # b alone for a while
        level.push(ticket("b"))
        serve(level)
    for _ in range(10):
        level.push(ticket("a"))
        level.push(ticket("b"))
    served = [serve(level).tenant for _ in range(10)]
    assert served.count("a") <= 6


def test_a_capped_tenant_does_not_block_the_next_one() -> None:
    level = FairLevel()
    a1, a2 = ticket("a", cap=1), ticket("a", cap=1)
    b1 = ticket("b", estimate=1000)
    for t in (a1, a2, b1):
        level.push(t)
    assert level.head() is a1
    level.pop(a1)
    assert level.head() is b1  # a is at max_in_flight
    assert level.head(lambda t: t.tenant == "a") is None
    level.pop(b1)
    assert level.head() is None and len(level) == 1  # a2 waits for a1, not for a slot
    level.finished(a1, 5.0)
    assert level.head() is a2


def test_head_with_a_filter_is_the_least_counter_tenant_that_has_a_servable_waiter() -> None:
    level = FairLevel()
    a = ticket("a")
    b_x = ticket("b")
    b_y = ticket("b")
    b_y.model = "y"
    c = ticket("c")
    c.model = "y"
    for t in (a, b_x, b_y, c):
        level.push(t)
    level.pop(a)
    level.push(ticket("a"))
    assert level.head(lambda t: t.model == "y") is b_y  # b before c (older head), b's first y


def test_a_model_filter_looks_at_the_models_sub_lines_only() -> None:
    level = FairLevel()
    a_x, a_y, b_y, b_z = ticket("a"), ticket("a"), ticket("b"), ticket("b")
    a_y.model, b_y.model, b_z.model = "y", "y", "z"
    for t in (a_x, a_y, b_y, b_z):
        level.push(t)
    asked: list[Ticket] = []

    def accept(t: Ticket) -> bool:
        asked.append(t)
        return t is not a_y

    assert level.head(ModelFilter({"y", "z"}, accept)) is b_y  # a's y refused: b's first y
    assert a_x not in asked  # model x is not looked at
    level.discard(b_y)
    assert level.head(ModelFilter({"y", "z"}, accept)) is b_z
    level.pop(a_x)
    level.discard(a_y)
    level.push(a_y)  # coming back: its old place, in its model's sub-line too
    assert level.head(ModelFilter({"y"}, lambda t: True)) is a_y
    assert set(level) == {a_y, b_z}


def test_try_start_charges_and_honours_the_cap() -> None:
    level = FairLevel()
    one = ticket("a", cap=1, estimate=7)
    assert level.try_start(one)
    assert level.counter("a") == 7
    assert not level.try_start(ticket("a", cap=1))
    level.finished(one, 3.0)
    assert level.counter("a") == 3
    assert level.try_start(ticket("a", cap=1))


def test_a_discarded_waiter_leaves_no_trace_and_idle_tenants_are_forgotten() -> None:
    level = FairLevel()
    waiting = [ticket(f"t{i}") for i in range(500)]
    for t in waiting:
        level.push(t)
    for t in waiting[1:]:
        level.discard(t)
    assert len(level) == 1 and list(level) == [waiting[0]]
    serve(level)
    for i in range(300):  # many tenants come and go: the level does not remember them all
        level.push(ticket(f"u{i}"))
        serve(level)
    assert level.tenants() < 200


def test_the_view_lists_waiters_in_the_order_they_would_be_served() -> None:
    level = FairLevel()
    for _ in range(5):
        level.push(ticket("a"))
    for _ in range(3):
        level.push(ticket("b", estimate=20))
    expected = list(level)
    assert [serve(level) for _ in range(8)] == expected


class Model:
    """The algorithm as written in the paper, in O(tenants) per step."""

    def __init__(self) -> None:
        self.lines: dict[str, list[Ticket]] = {}
        self.counter: dict[str, float] = {}
        self.running: dict[str, int] = {}
        self.floor = 0.0

    def push(self, t: Ticket) -> None:
        name = t.tenant or ""
        line = self.lines.setdefault(name, [])
        if not line:
            others = [self.counter[n] for n, q in self.lines.items() if q and n != name]
            lift = min(others) if others else self.floor
            self.counter[name] = max(self.counter.get(name, 0.0), lift)
        line.append(t)

    def head(self) -> Ticket | None:
        ready = [
            (self.counter[n], q[0].seq, n)
            for n, q in self.lines.items()
            if q and not (q[0].max_in_flight and self.running.get(n, 0) >= q[0].max_in_flight)
        ]
        return self.lines[min(ready)[2]][0] if ready else None

    def pop(self, t: Ticket) -> None:
        name = t.tenant or ""
        self.lines[name].remove(t)
        self.floor = max(self.floor, self.counter[name])
        self.counter[name] += t.estimate / t.weight
        self.running[name] = self.running.get(name, 0) + 1

    def finished(self, t: Ticket, tokens: float) -> None:
        name = t.tenant or ""
        self.running[name] -= 1
        self.counter[name] += (tokens - t.estimate) / t.weight


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["push", "push", "serve", "finish", "discard"]),
            st.integers(0, 4),
            st.integers(1, 50),
            st.integers(0, 2),
        ),
        max_size=120,
    )
)
def test_it_serves_exactly_as_the_plain_model(steps: list[tuple[str, int, int, int]]) -> None:
    level, model = FairLevel(), Model()
    running: list[Ticket] = []
    for action, who, size, cap in steps:
        if action == "push":
            t = ticket(f"t{who}", estimate=size, weight=1 + who % 2, cap=cap if who < 2 else 0)
            if who < 2:  # a tenant's cap is the same on all its tickets
                t.max_in_flight = who + 1
            level.push(t)
            model.push(t)
        elif action == "serve":
            expected = model.head()
            assert level.head() is expected
            if expected is not None:
                level.pop(expected)
                model.pop(expected)
                running.append(expected)
        elif action == "discard":
            waiting = [t for q in model.lines.values() for t in q]
            if waiting:
                gone = waiting[size % len(waiting)]
                level.discard(gone)
                model.lines[gone.tenant or ""].remove(gone)
        elif running:
            done = running.pop(size % len(running))
            level.finished(done, float(size * 2))
            model.finished(done, float(size * 2))
    assert len(level) == sum(len(q) for q in model.lines.values())


def _dispatch_cost(waiters: int, tenants: int, rounds: int = 3) -> float:
    best = float("inf")
    for _ in range(rounds):
        level = FairLevel()
        for i in range(waiters):
            level.push(ticket(f"t{i % tenants}", estimate=10 + i % 7))
        start = time.perf_counter()
        for _ in range(waiters):
            head = level.head()
            assert head is not None
            level.pop(head)
            level.finished(head, 12.0)
            level.push(ticket(head.tenant or "", estimate=10))
        best = min(best, (time.perf_counter() - start) / waiters)
    return best


def test_dispatch_cost_does_not_grow_with_the_number_of_tenants() -> None:
    """The bench (scenario 7) judges 2x through the scheduler; here, on the bare level, a
    looser bound that still fails by far for anything that looks at every tenant (1 000
    tenants would be ~100x): a heap step per dispatch, nothing per tenant."""
    small = min(_dispatch_cost(10, 1) for _ in range(20))
    large = _dispatch_cost(10_000, 1_000, rounds=2)
    assert large < 5 * small + 2e-6, (large, small)


def test_the_fifo_level_has_a_try_start_that_always_admits() -> None:
    assert FifoLevel().try_start(ticket("a"))


async def test_the_scheduler_leaves_a_slot_free_while_every_waiter_is_capped() -> None:
    from seadragon_proxy.scheduling import Scheduler

    scheduler = Scheduler(slots=3, max_size=10, level_factory=lambda priority: FairLevel())
    queued = asyncio.Event()
    scheduler.add_listener(lambda event, t: queued.set() if event == "queued" else None)
    first = await scheduler.acquire(ticket("a", cap=1))
    waiting = asyncio.ensure_future(scheduler.acquire(ticket("a", cap=1)))
    await queued.wait()
    assert scheduler.queue_length == 1 and scheduler.in_flight == 1  # two slots free
    low = ticket("b")
    low.priority = 9  # a worse priority is not held up by the capped tenant
    other = await scheduler.acquire(low)
    assert scheduler.in_flight == 2 and not waiting.done()
    first.release(5.0)
    second = await waiting
    assert second.ticket.tenant == "a"
    second.release(5.0)
    other.release(1.0)


def test_a_forgotten_tenant_coming_back_is_not_confused_with_its_old_entries() -> None:
    level = FairLevel()
    for _ in range(3):
        level.push(ticket("b", estimate=100))
    old = ticket("a", estimate=1)
    level.push(old)
    level.discard(old)  # a is forgotten; its heap entry is stale
    for _ in range(5):
        level.push(ticket("c"))
    for _ in range(70):  # enough tenants come and go to force a sweep and new versions
        level.push(ticket("x"))
        level.discard(next(t for t in level if t.tenant == "x"))
    back = ticket("a", estimate=1)
    level.push(back)
    order = [serve(level).tenant for _ in range(9)]
    assert order.count("a") == 1 and sorted(set(order)) == ["a", "b", "c"]


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(1, 1000), min_size=20, max_size=200),
    st.lists(st.integers(1, 1000), min_size=20, max_size=200),
    st.sampled_from([1.0, 2.0, 3.0]),
)
def test_two_backlogged_tenants_never_drift_apart_by_more_than_the_papers_bound(
    costs_a: list[int], costs_b: list[int], weight_a: float
) -> None:
    """Sheng et al.'s bound, 2U with U the largest request cost: over any interval while
    both are backlogged, the weighted service of two tenants differs by at most that, with
    estimates that are wrong (a flat 500) and corrected at the end."""
    level = FairLevel()
    costs = {"a": iter(costs_a), "b": iter(costs_b)}
    for name, count, weight in (("a", len(costs_a), weight_a), ("b", len(costs_b), 1.0)):
        for _ in range(count):
            level.push(ticket(name, estimate=500, weight=weight))
    served = {"a": 0.0, "b": 0.0}
    left = {"a": len(costs_a), "b": len(costs_b)}
    low = high = 0.0
    while all(left.values()):  # both backlogged
        head = level.head()
        assert head is not None
        name = head.tenant or ""
        cost = next(costs[name])
        left[name] -= 1
        level.pop(head)
        level.finished(head, float(cost))
        served[name] += cost / head.weight
        low, high = min(low, served["a"] - served["b"]), max(high, served["a"] - served["b"])
    bound = 2 * max(max(costs_a) / weight_a, max(costs_b), 500 / weight_a, 500.0)
    assert high - low <= bound
