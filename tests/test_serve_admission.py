"""Admission: a bounded line by priority class (lower first, as vLLM takes it), first come first
served within a class, aging so that a low class is never starved; on an injected clock."""

from __future__ import annotations

import asyncio

import pytest

from tracedoffload.serve.admission import Admission, QueueFull


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def served_order(gate: Admission, tickets: dict) -> list[str]:
    """Release the place held by 'running' and each next one: the order names are admitted in."""
    order = []
    current = tickets.pop("running")
    while True:
        gate.release(current)
        admitted = [name for name, t in tickets.items() if t.admitted]
        if not admitted:
            return order
        (name,) = admitted
        order.append(name)
        current = tickets.pop(name)


def test_a_free_place_is_taken_at_once_and_a_full_line_refuses():
    gate = Admission(slots=1, max_waiting=2)
    assert gate.admit().admitted
    waiting = [gate.admit(), gate.admit()]
    assert not any(t.admitted for t in waiting) and gate.waiting == 2
    with pytest.raises(QueueFull) as refused:
        gate.admit()
    assert refused.value.retry_after_s == 1


def test_priority_classes_then_first_come_first_served():
    clock = Clock()
    gate = Admission(slots=1, max_waiting=10, aging_s=1000, clock=clock)
    tickets = {"running": gate.admit(0)}
    for name, priority in (("low-1", 5), ("high-1", 0), ("low-2", 5), ("high-2", 0), ("mid", 2)):
        clock.now += 1
        tickets[name] = gate.admit(priority)
    assert served_order(gate, tickets) == ["high-1", "high-2", "mid", "low-1", "low-2"]


def test_aging_lets_a_low_class_overtake_fresh_high_ones():
    """Priority 5 waiting 60 s with aging 10 s counts as -1: ahead of a priority 0 just arrived."""
    clock = Clock()
    gate = Admission(slots=1, max_waiting=10, aging_s=10, clock=clock)
    tickets = {"running": gate.admit(0), "old-low": gate.admit(5)}
    clock.now = 60
    tickets["new-high"] = gate.admit(0)
    assert served_order(gate, tickets) == ["old-low", "new-high"]


def test_a_waiter_that_leaves_gives_up_its_place_and_wait_returns_when_admitted():
    async def scenario() -> None:
        gate = Admission(slots=1, max_waiting=3)
        first = gate.admit()
        leaving, staying = gate.admit(), gate.admit()
        assert await staying.wait(0.01) is False
        gate.release(leaving)  # its client went away while waiting
        gate.release(leaving)  # idempotent
        gate.release(first)
        assert await staying.wait(1) is True and not leaving.admitted
        assert (gate.inside, gate.waiting) == (1, 0)

    asyncio.run(scenario())
