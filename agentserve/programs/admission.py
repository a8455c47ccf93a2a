"""Program admission: start a new program only when the KV of the programs already running fits.

Under overload, stock vLLM (and pins, which only choose whose KV survives) lets every arriving program
start; their contexts together outgrow the KV budget, every turn re-prefills, and the engine spends
its time recomputing (measured: 16 live SWE programs, hit rate 0.23 on 12k tokens of KV; the same
programs six at a time hit 0.86 and finish 20 % more programs per second; docs/benchmarks.md). The
gate holds a *new* program's first request while the admitted programs' footprints plus the
newcomer's exceed `share` of the budget. A footprint is the KV a program needs to keep hitting until
it ends: the larger of its context so far and the expected peak context of a program, learned online
(the mean peak of the last programs that ended; `default_peak` until one has: admission happens at a
program's start, when its own context says nothing about how far it will grow). A program already
admitted is never held, so admitted programs run at full speed and finish.

With a host KV tier (`host_tokens`), a program in a tool call counts only for the part of its
footprint the tier cannot hold: its KV waits in host memory and comes back for the cost of a copy, so
the device budget is for programs that are running.

A workflow (a program and its sub-agents) is admitted as a whole: its root is checked with its
footprint times the workflow's expected size (`weight`: the mean number of programs in the last
workflows that ended, learned by the program book), so a parent is not admitted only for its children
to find no room; its sub-agents then `join` without a check and count like any admitted program.

Trade-off: a held program's first turn waits (its TTFT includes the hold), which is the price of
the shorter mean JCT. `max_hold_s` bounds the hold (past it a program is admitted anyway: no
starvation, and under a sustained overload the gate degrades to admitting everything); a gate with
nothing admitted always admits (progress). Programs leave at their end (the front end's end or
abandon), or when idle for `idle_s` with no request in the engine (clients that never end programs).
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass

# A program with no request in the engine for this long no longer counts against the budget: its
# KV has most likely been evicted by then, and a client that never ends programs cannot block the gate.
DEFAULT_IDLE_S = 30.0
# Longest a new program is held; the JCT it loses waiting is what admitted programs gain, up to here.
DEFAULT_MAX_HOLD_S = 60.0
PEAK_WINDOW = 64  # ended programs the expected peak is the mean of (recent behaviour, bounded memory)


@dataclass
class Admitted:
    tokens: int  # the program's latest context (prompt + output so far)
    last_active: float
    live: int = 0  # its requests in the engine now


class AdmissionGate:
    def __init__(self, budget_tokens: int, share: float, *, default_peak: int = 0,
                 max_hold_s: float = DEFAULT_MAX_HOLD_S, idle_s: float = DEFAULT_IDLE_S, host_tokens: int = 0):
        if budget_tokens <= 0 or not 0 < share or default_peak < 0:
            raise ValueError("the gate needs a KV budget > 0, a share > 0 and a default peak >= 0")
        self.limit = int(budget_tokens * share)
        self.default_peak = default_peak
        self._peaks: deque[int] = deque(maxlen=PEAK_WINDOW)
        self.max_hold_s = max_hold_s
        self.idle_s = idle_s
        self.host_tokens = host_tokens  # a host KV tier holds programs' KV while they wait on tools
        self.programs: dict[str, Admitted] = {}
        self.counters: Counter[str] = Counter()

    def __contains__(self, program: str) -> bool:
        return program in self.programs

    @property
    def expected_peak(self) -> int:
        return sum(self._peaks) // len(self._peaks) if self._peaks else self.default_peak

    def footprint(self, tokens: int) -> int:
        return max(tokens, self.expected_peak)

    @property
    def load(self) -> int:
        """Device KV the admitted programs need: running programs their whole footprint; programs in a
        tool call only the part a host tier cannot hold for them (it loads back for a copy's cost)."""
        running = sum(self.footprint(p.tokens) for p in self.programs.values() if p.live > 0)
        waiting = sum(self.footprint(p.tokens) for p in self.programs.values() if p.live == 0)
        return running + max(0, waiting - self.host_tokens)

    def admits(self, program: str, tokens: int, waited_s: float, now: float, weight: float = 1.0) -> bool:
        """May this program's request start? Admits it (and counts why) if so. `weight`: the programs
        it is expected to bring (a workflow's root: its expected size)."""
        if program in self.programs:
            return True
        self.expire_idle(now)
        if not self.programs:
            reason = "admitted_idle"
        elif self.load + int(self.footprint(tokens) * max(1.0, weight)) <= self.limit:
            reason = "admitted"
        elif self.max_hold_s > 0 and waited_s >= self.max_hold_s:
            reason = "admitted_overdue"
        else:
            return False
        self.programs[program] = Admitted(tokens, now)
        self.counters[reason] += 1
        return True

    def join(self, program: str, tokens: int, now: float) -> None:
        """A sub-agent of an admitted workflow starts: admitted without a check (its root's admission
        counted it), so it counts against the budget from now on."""
        if program not in self.programs:
            self.programs[program] = Admitted(tokens, now)
            self.counters["joined_workflow"] += 1
        self.started(program, tokens, now)

    def started(self, program: str, tokens: int, now: float) -> None:
        """A request of an admitted program entered the engine with a context of `tokens`."""
        if (p := self.programs.get(program)) is not None:
            p.tokens, p.last_active, p.live = max(p.tokens, tokens), now, p.live + 1

    def finished(self, program: str, tokens: int, now: float) -> None:
        """A request of an admitted program left the engine; its context is now `tokens`."""
        if (p := self.programs.get(program)) is not None:
            p.tokens, p.last_active, p.live = max(p.tokens, tokens), now, max(0, p.live - 1)

    def end(self, program: str) -> None:
        if (p := self.programs.pop(program, None)) is not None:
            self._peaks.append(p.tokens)
            self.counters["ended"] += 1

    def expire_idle(self, now: float) -> None:
        idle = [name for name, p in self.programs.items() if p.live == 0 and now - p.last_active >= self.idle_s]
        for name in idle:
            del self.programs[name]
        self.counters["expired_idle"] += len(idle)
