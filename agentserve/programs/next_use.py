"""When each program's KV is next needed: the order in which cached KV should be given up. Plain Python.

An agent's KV is needed again when its tool call returns; one-off requests' KV and an ended
program's KV are not needed again by anyone we know of. So memory that must be freed (the host tier's
pool; the device's free blocks) should give up first the KV whose next use is furthest away:

    one-off requests and ended programs  (never, as far as we know)
    programs deep in a long tool call    (predicted return far ahead)
    programs whose next turn is due soon (predicted return close)       <- given up last
    programs with a request running now  (in use)

A program's next use is its last turn's finish plus the predicted duration of the tool its answer
runs (the control plane's predictor, carried with the request); a program past its predicted return
counts as due now (it is late, not gone: its next turn can arrive any moment). Time comes from the
injected clock. The trade-off against LRU: a wrong prediction (a tool much faster than predicted)
gives up KV that LRU would have kept; a program whose tool runs past its prediction keeps its KV
longer than LRU would, at the cost of other programs' further-away KV.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

NEVER = math.inf  # the next use of one-off requests' and ended programs' KV
MAX_PROGRAMS = 65536  # programs remembered; past it the furthest-away ones are forgotten (= NEVER)


class NextUse:
    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self._due: dict[str, float] = {}  # program -> predicted time of its next use (absolute)
        self._running: dict[str, int] = {}  # program -> its requests running now

    def started(self, program: str) -> None:
        """A request of the program entered the engine: its KV is in use."""
        self._running[program] = self._running.get(program, 0) + 1

    def finished(self, program: str, predicted_gap_s: float | None, is_last: bool) -> None:
        """A request of the program left the engine; its next turn is predicted `predicted_gap_s`
        from now (None: unknown, treated as due now), or never after a last turn."""
        left = self._running.get(program, 0) - 1
        if left > 0:
            self._running[program] = left
        else:
            self._running.pop(program, None)
        if is_last:
            self.ended(program)
            return
        self._due[program] = self.clock() + max(0.0, predicted_gap_s or 0.0)
        if len(self._due) > MAX_PROGRAMS:
            self._forget()

    def ended(self, program: str) -> None:
        self._due.pop(program, None)
        self._running.pop(program, None)

    def seconds_until(self, program: str | None) -> float:
        """Seconds until the program's KV is needed again: 0 for a program in use or late, NEVER for a
        one-off request (None) or an unknown or ended program."""
        if program is None:
            return NEVER
        if program in self._running:
            return 0.0
        due = self._due.get(program)
        return NEVER if due is None else max(0.0, due - self.clock())

    def _forget(self) -> None:
        """Drop the quarter of programs whose next use is furthest away (they count as NEVER)."""
        by_due = sorted(self._due, key=self._due.__getitem__, reverse=True)
        for program in by_due[: len(by_due) // 4]:
            del self._due[program]
