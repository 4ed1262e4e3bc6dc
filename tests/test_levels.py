"""A level's own order: FIFO, a returning ticket back in its old place, a filter on offer."""

from __future__ import annotations

from seadragon_proxy.scheduling import FifoLevel, Ticket
from seadragon_proxy.scheduling.levels import ModelFilter


def ticket(seq: int, model: str = "a") -> Ticket:
    return Ticket(
        id=str(seq),
        source="s",
        priority=0,
        path="/api/chat",
        model=model,
        client_ip="127.0.0.1",
        seq=seq,
    )


def test_fifo_serves_in_arrival_order_and_a_returning_ticket_keeps_its_place() -> None:
    level = FifoLevel()
    one, two, three = ticket(1), ticket(2), ticket(3)
    for t in (one, two, three):
        level.push(t)
    level.pop(one)  # served, then its upstream was unreachable: it comes back
    level.push(one)
    assert list(level) == [one, two, three]
    level.discard(two)
    assert level.head() is one and len(level) == 2


def test_head_with_a_filter_is_the_first_servable_one() -> None:
    level = FifoLevel()
    a, b1, b2 = ticket(1, "a"), ticket(2, "b"), ticket(3, "b")
    for t in (a, b1, b2):
        level.push(t)
    assert level.head(lambda t: t.model == "b") is b1
    assert level.head(lambda t: t.model == "c") is None


def test_a_model_filter_looks_at_those_models_only_and_keeps_the_order() -> None:
    level = FifoLevel()
    tickets = [ticket(i, "abc"[i % 3]) for i in range(1, 10)]
    for t in tickets:
        level.push(t)
    level.pop(tickets[1])  # ticket 2 (model c) is served, then comes back
    level.push(tickets[1])
    level.discard(tickets[0])  # ticket 1 (model b) leaves
    looked: list[Ticket] = []

    def accept(t: Ticket) -> bool:
        looked.append(t)
        return t.seq > 3

    found = level.head(ModelFilter({"b", "c"}, accept))
    assert found is not None and found.seq == 4  # b: 4 (1 left); c: 2 refused, 5
    assert all(t.model in ("b", "c") for t in looked)  # the a waiters were never looked at
    assert level.head(ModelFilter({"x"}, accept)) is None
    for t in list(level):
        level.pop(t)
    assert len(level) == 0 and level.head(ModelFilter({"a", "b", "c"}, accept)) is None
