"""Admission in front of the engine: a bounded queue with priority classes and aging.

At most `slots` requests are in the engine (its batch); up to `max_waiting` more wait here, and
one more is refused at once (429). When a place frees, the waiting request with the best
effective priority goes in: its `priority` (as vLLM takes it: lower is served first, default 0)
minus one class per `aging_s` seconds it has waited, first come first served among equals. So a
request of a low class gains a class every `aging_s` and is never starved by a stream of higher
ones. A request whose client leaves while it waits gives its place up. One client (an API key,
or an address) holds at most `max_per_client` places, in the engine and in line together, so one
busy caller cannot fill the line for everyone (0: no such limit).

Used from the event loop only (no locks): `admit` is synchronous (a refusal is immediate),
`Ticket.wait` awaits the place (in slices, so the caller can look whether the engine still lives), `release` frees it.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable


class QueueFull(Exception):
    """More requests than the engine admits (or than this client may have); retry after `retry_after_s`."""

    def __init__(self, retry_after_s: int, message: str | None = None) -> None:
        super().__init__(message or f"the server is at its limit of requests in flight; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class Ticket:
    """One request's place in line; `wait()` returns once it is in the engine."""

    __slots__ = ("priority", "arrived", "order", "client", "_granted", "admitted", "released")

    def __init__(self, priority: int, arrived: float, order: int, client: str | None = None) -> None:
        self.priority = priority
        self.client = client
        self.arrived = arrived
        self.order = order
        self._granted: asyncio.Future[None] | None = None
        self.admitted = False
        self.released = False

    async def wait(self, timeout_s: float | None = None) -> bool:
        """Wait (up to `timeout_s`) for the place; True once in the engine."""
        if not self.admitted:
            if self._granted is None:
                self._granted = asyncio.get_running_loop().create_future()
            await asyncio.wait({self._granted}, timeout=timeout_s)  # never cancels the future
        return self.admitted

    def _grant(self) -> None:
        self.admitted = True
        if self._granted is not None and not self._granted.done():
            self._granted.set_result(None)


class Admission:
    """The gate. `clock` is injectable so that aging is tested without waiting."""

    def __init__(self, slots: int, max_waiting: int, aging_s: float = 10.0, clock: Callable[[], float] = time.monotonic, max_per_client: int = 0) -> None:
        self.slots = slots
        self.max_waiting = max_waiting
        self.max_per_client = max_per_client
        self._per_client: dict[str, int] = {}
        self.aging_s = aging_s
        self._clock = clock
        self._inside = 0
        self._waiting: list[Ticket] = []
        self._order = itertools.count()

    @property
    def inside(self) -> int:
        return self._inside

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def admit(self, priority: int = 0, client: str | None = None) -> Ticket:
        """A ticket, in the engine at once when a place is free; raises QueueFull when the line is
        full, or when `client` already holds `max_per_client` places."""
        held = self._per_client.get(client, 0) if client is not None else 0
        if self.max_per_client and held >= self.max_per_client:
            raise QueueFull(1, f"this client has {held} requests in flight, the most one client may have (--max-requests-per-client); retry after one ends")
        ticket = Ticket(priority, self._clock(), next(self._order), client)
        if self._inside < self.slots and not self._waiting:
            self._inside += 1
            ticket._grant()
        elif len(self._waiting) >= self.max_waiting:
            raise QueueFull(retry_after_s=1)
        else:
            self._waiting.append(ticket)
        if client is not None:
            self._per_client[client] = held + 1
        return ticket

    def release(self, ticket: Ticket) -> None:
        """The request left (finished, failed, or its client went away): its place, or its spot
        in line, goes to the next. Idempotent."""
        if ticket.released:
            return
        ticket.released = True
        if ticket.client is not None:
            left = self._per_client.pop(ticket.client) - 1
            if left:
                self._per_client[ticket.client] = left
        if ticket.admitted:
            self._inside -= 1
        elif ticket in self._waiting:
            self._waiting.remove(ticket)
        self._fill()

    def _fill(self) -> None:
        while self._inside < self.slots and self._waiting:
            now = self._clock()
            best = min(self._waiting, key=lambda t: (t.priority - (now - t.arrived) / self.aging_s, t.order))
            self._waiting.remove(best)
            self._inside += 1
            best._grant()
