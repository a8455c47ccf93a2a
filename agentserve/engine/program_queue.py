"""The waiting queue of program-level scheduling, as a vLLM `RequestQueue`, and its orders.

A queue order is a key function over waiting requests (`QueueOrder`); the queue is a heap on it. A key
may depend on state that changes outside the queue (pins, time): the owner calls `reorder()` then.

`ProgramFCFS` (Continuum's paper, with its missing first key restored): preempted requests first, then
requests past the wait bound (first come first served among them), then requests of programs that
hold a pin (their KV is waiting for them), then by program arrival (program FCFS: the earliest
program's turns go before a later program's), then by request arrival. Starvation-free: a later
program waits only for earlier ones, and with a wait bound only until it is overdue. The trade-off:
program order moves TTFT onto the latest programs; the wait bound caps how much.

The program's rank is the book's (a workflow's, for the workflow orders; attained service for "las").
With the critical-path orders, requests of one rank (a workflow's sub-agents) go by predicted
remaining work, most first (`remaining_of`): the join waits for the last child, so the longest goes
first.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from vllm.v1.core.sched.request_queue import RequestQueue
from vllm.v1.request import Request

from agentserve.programs.book import ProgramBook

QueueKey = tuple


class QueueOrder(Protocol):
    """A waiting request's sort key (lower goes first). Requests are vLLM's, or any object with
    `num_preemptions`, `priority` (the program's rank) and `arrival_time` (a simulator's)."""

    def __call__(self, request) -> QueueKey: ...


def _no_remaining(request) -> float:
    return 0.0


class ProgramFCFS:
    def __init__(self, book: ProgramBook, program_of: Callable[[object], str | None],
                 remaining_of: Callable[[object], float] = _no_remaining):
        self.book = book
        self.program_of = program_of
        self.remaining_of = remaining_of if book.config.order in ("critical-path", "las") else _no_remaining

    def __call__(self, request) -> QueueKey:
        if request.num_preemptions > 0:
            return (0, request.priority, 0.0, request.arrival_time)
        if self.book.overdue(request.arrival_time):
            # First come first served among the overdue, as stock vLLM would serve them: program order
            # here would let every earlier program's overdue turns pass a late program's, which under
            # overload (most requests overdue) is no bound at all.
            return (1, 0, 0.0, request.arrival_time)
        first = -self.remaining_of(request)
        if self.book.holds_pin(self.program_of(request)):
            return (2, request.priority, first, request.arrival_time)
        return (3, request.priority, first, request.arrival_time)


class ProgramQueue(RequestQueue):
    def __init__(self, key: QueueOrder):
        self._key = key
        self._heap: list[tuple[QueueKey, int, Request]] = []
        self._seq = itertools.count()  # ties: insertion order, and requests never get compared

    def add_request(self, request: Request) -> None:
        heapq.heappush(self._heap, (self._key(request), next(self._seq), request))

    def pop_request(self) -> Request:
        if not self._heap:
            raise IndexError("pop from empty queue")
        return heapq.heappop(self._heap)[2]

    def peek_request(self) -> Request:
        if not self._heap:
            raise IndexError("peek from empty queue")
        return self._heap[0][2]

    def prepend_request(self, request: Request) -> None:
        self.add_request(request)  # position comes from the key (a preempted request sorts first)

    def prepend_requests(self, requests: Iterable[Request]) -> None:
        for request in requests:
            self.add_request(request)

    def remove_request(self, request: Request) -> None:
        self.remove_requests((request,))

    def remove_requests(self, requests: Iterable[Request]) -> None:
        drop = {id(r) for r in requests}
        self._heap = [e for e in self._heap if id(e[2]) not in drop]
        heapq.heapify(self._heap)

    def reorder(self) -> None:
        """Recompute every key (after a pin was created or released)."""
        self._heap = [(self._key(r), s, r) for _, s, r in self._heap]
        heapq.heapify(self._heap)

    def __bool__(self) -> bool:
        return bool(self._heap)

    def __len__(self) -> int:
        return len(self._heap)

    def unordered(self) -> Iterator[Request]:
        """The waiting requests in heap order: O(n), for membership questions."""
        return (e[2] for e in self._heap)

    def __iter__(self) -> Iterator[Request]:
        return (e[2] for e in sorted(self._heap, key=lambda e: (e[0], e[1])))
