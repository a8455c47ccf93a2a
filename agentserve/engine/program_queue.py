"""The waiting queue of program-level scheduling, as a vLLM `RequestQueue`: a heap on a queue order
(programs/queue_order.py). A key may depend on state that changes outside the queue (pins, time):
the owner calls `reorder()` then.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Iterator

from vllm.v1.core.sched.request_queue import RequestQueue
from vllm.v1.request import Request

from agentserve.programs.queue_order import QueueKey, QueueOrder


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
        # vLLM hands back the requests it skipped this step in reverse order (its FCFS queue prepends
        # them one by one); re-adding them in that order would swap requests of equal key every step.
        for request in reversed(list(requests)):
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
