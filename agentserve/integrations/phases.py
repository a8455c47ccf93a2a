"""Concurrent tool calls of one program as one tool phase (a LangGraph ToolNode or an Agents SDK turn
runs several at once): the server tracks one open tool per program, and what the KV sees is the
program idle from the first start to the last end. A phase is reported under its first tool's name.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class ToolPhases:
    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self._open: dict[str, tuple[str, float, int]] = {}  # program -> (first tool, start, tools running)

    def start(self, program_id: str, name: str) -> str | None:
        """A tool call started: the phase's name if it opens a phase (report a start), else None."""
        first, t0, running = self._open.get(program_id, (name, self.clock(), 0))
        self._open[program_id] = (first, t0, running + 1)
        return first if running == 0 else None

    def end(self, program_id: str) -> tuple[str, float] | None:
        """A tool call ended: (name, seconds) if it closes its phase (report an end), else None. An end
        without a start (a call started before the program's first LLM call) closes nothing."""
        phase = self._open.pop(program_id, None)
        if phase is None:
            return None
        first, t0, running = phase
        if running > 1:
            self._open[program_id] = (first, t0, running - 1)
            return None
        return first, self.clock() - t0
