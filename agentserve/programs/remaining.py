"""How much work a live program has left, in seconds: the critical-path order's key. Plain Python.

A program at depth d that has made k LLM calls is predicted to make E[N - k | N > k] more, N drawn
from the call counts of finished programs at the same depth (all depths while that depth has fewer
than `MIN_HISTORY`; one more call while nothing has finished). Each call costs the mean observed LLM
call time plus the mean time of the tool the program runs. So among a workflow's sub-agents the one
expected to run longest goes first, which is what shortens a join: the join waits for the last child.
The trade-off: siblings are told apart only by depth, calls made and their tool, not by content, so
with no history the order is by calls made.
"""

from __future__ import annotations

from collections import deque

WINDOW = 512  # finished programs (and LLM calls) remembered
MIN_HISTORY = 8  # finished programs at a depth before its own history is used
DEFAULT_CALL_S = 1.0  # an LLM call's time before any was observed


class RemainingWork:
    def __init__(self, window: int = WINDOW):
        self.window = window
        self._calls_by_depth: dict[int, deque[int]] = {}  # depth -> call counts of finished programs
        self._all: deque[int] = deque(maxlen=window)
        self._call_s: deque[float] = deque(maxlen=window)

    def observe_program(self, depth: int, calls: int) -> None:
        self._calls_by_depth.setdefault(depth, deque(maxlen=self.window)).append(calls)
        self._all.append(calls)

    def observe_call(self, seconds: float) -> None:
        self._call_s.append(max(0.0, seconds))

    def calls_left(self, depth: int, done: int) -> float:
        """E[N - done | N > done] over the finished programs' call counts N (1 with no history)."""
        history = self._calls_by_depth.get(depth, ())
        if len(history) < MIN_HISTORY:
            history = self._all
        longer = [n - done for n in history if n > done]
        return sum(longer) / len(longer) if longer else 1.0

    def call_s(self) -> float:
        return sum(self._call_s) / len(self._call_s) if self._call_s else DEFAULT_CALL_S

    def seconds(self, depth: int, done: int, tool_s: float) -> float:
        """Predicted seconds of work left: calls left x (an LLM call + a tool call of `tool_s`)."""
        return self.calls_left(depth, done) * (self.call_s() + max(0.0, tool_s))
