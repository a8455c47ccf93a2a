"""The order of program-level scheduling's waiting queue (a key over waiting requests; plain Python:
the vLLM queue, engine/program_queue.py, and the simulator's queue sort by it).

`ProgramFCFS` (Continuum's paper, with its missing first key restored): preempted requests first, then
requests past the wait bound (first come first served among them), then requests of programs that
hold a pin (their KV is waiting for them), then by program arrival (program FCFS: the earliest
program's turns go before a later program's), then by request arrival. Starvation-free: a later
program waits only for earlier ones, and with a wait bound only until it is overdue. The trade-off:
program order moves TTFT onto the latest programs; the wait bound caps how much.

Order "arrival" switches all of this off (the ablation's row): requests by arrival, preempted first,
as stock vLLM's FCFS queue. The program's rank is the book's (a workflow's, for the workflow orders;
attained service for "las").
With the critical-path orders, requests of one rank (a workflow's sub-agents) go by predicted
remaining work, most first (`remaining_of`): the join waits for the last child, so the longest goes
first. Order "srpt" ranks every program by its remaining work, least first (shortest remaining
processing time: the mean-JCT optimum when the remaining work is known, as the clairvoyant simulation
knows it; predicted, it orders by calls made). A key may depend on state that changes outside the queue (pins, time): the queue's owner
re-keys then.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

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
        self.remaining_of = remaining_of if book.config.order in ("critical-path", "las", "srpt") else _no_remaining

    def __call__(self, request) -> QueueKey:
        if self.book.config.order == "arrival":  # program order off: stock vLLM's FCFS, preempted first
            return (0 if request.num_preemptions > 0 else 3, 0, 0.0, request.arrival_time)
        if request.num_preemptions > 0:
            return (0, request.priority, 0.0, request.arrival_time)
        if self.book.overdue(request.arrival_time):
            # First come first served among the overdue, as stock vLLM would serve them: program order
            # here would let every earlier program's overdue turns pass a late program's, which under
            # overload (most requests overdue) is no bound at all.
            return (1, 0, 0.0, request.arrival_time)
        pinned = 2 if self.book.holds_pin(self.program_of(request)) else 3
        if self.book.config.order == "srpt":
            return (pinned, self.remaining_of(request), 0.0, request.arrival_time)
        return (pinned, request.priority, -self.remaining_of(request), request.arrival_time)
