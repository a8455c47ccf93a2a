"""Working-set admission: run as many programs as the KV budget holds, and pause the others whole.

Under overload, stock vLLM (and pins, which only choose whose KV survives) shares the device among
every live program turn by turn; their contexts together outgrow the KV budget, every turn re-prefills,
and all of them finish late (measured: 16 live SWE programs, hit rate 0.23 on 12k tokens of KV; the
same programs six at a time hit 0.86 and finish 20 % more programs per second; docs/benchmarks.md).
This is thrashing, and the answer is the operating system's: a working set. The gate keeps a set of
admitted programs whose footprints fit `share` of the budget:

- a program's request is scheduled only if its program is admitted, or can be: its footprint fits
  next to the admitted ones' (a member), or fits once admitted programs of a later rank that sit in a
  tool call are paused (older programs go first: they run to completion);
- a request held `max_hold_s` is admitted anyway, as a guest (a bound on any program's wait, first
  turns included; 0 = none); a gate with nothing admitted always admits (progress);
- when a turn ends and the admitted set is over the limit, guests in a tool call are paused, the
  latest rank first, until it fits; members are paused only for an older program, so the set's
  oldest programs run to completion while a guest gets a turn per hold bound. A paused program's pin goes and its blocks are
  evicted first (the host tier keeps a copy; they come back for its next turn); its next request
  waits like a new program's, at its own, earlier, rank. Once the set fits, its guests are members.

A footprint is the KV a program needs to keep hitting: the larger of its context so far and the
expected peak of a program (the mean peak of the last programs that ended; `default_peak` until one
has). With a host KV tier (`host_tokens`), a program in a tool call counts only for the part of its
footprint the tier cannot hold: its KV waits there for the cost of a copy, so the device budget is for
programs that run. A workflow (a program and its sub-agents) is admitted as a whole: its root counts
its footprint times the workflow's expected size (`weight`); sub-agents `join` without a check.

With `contention` (programs/contention.py) the gate holds and pauses only while the engine is
contended, and admits everything otherwise, so an engine with room never pays for it; when contention
begins, the earliest ranks that fit are members and the rest guests. Without it, the
gate always acts (the opt-in). With `pause` off, it is the older gate: only new programs are held,
admitted ones run until they end. Programs leave at their end, or when idle for `idle_s` with no
request in the engine (clients that never end programs), or sooner for a program whose end nobody
will say (one inferred from its conversation: `finished(quiet_s=)`). Time is the caller's (`now`).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from agentserve.programs.contention import Contention

# A program with no request in the engine for this long no longer counts against the budget: its
# KV has most likely been evicted by then, and a client that never ends programs cannot block the gate.
DEFAULT_IDLE_S = 30.0
# Longest a request is held; the JCT it loses waiting is what admitted programs gain, up to here.
DEFAULT_MAX_HOLD_S = 60.0
PEAK_WINDOW = 64  # ended programs the expected peak is the mean of (recent behaviour, bounded memory)


@dataclass
class Admitted:
    tokens: int  # the program's latest context (prompt + output so far)
    last_active: float
    live: int = 0  # its requests in the engine now
    guest: bool = False  # admitted past the hold bound while the set was full: paused first
    quiet_s: float | None = None  # idle this long, it no longer counts (None: the gate's `idle_s`)


class AdmissionGate:
    def __init__(self, budget_tokens: int, share: float, *, default_peak: int = 0,
                 max_hold_s: float = DEFAULT_MAX_HOLD_S, idle_s: float = DEFAULT_IDLE_S, host_tokens: int = 0,
                 pause: bool = False, contention: Contention | None = None,
                 rank: Callable[[str], int | None] | None = None):
        if budget_tokens <= 0 or not 0 < share or default_peak < 0:
            raise ValueError("the gate needs a KV budget > 0, a share > 0 and a default peak >= 0")
        self.limit = int(budget_tokens * share)
        self.default_peak = default_peak
        self._peaks: deque[int] = deque(maxlen=PEAK_WINDOW)
        self._expected_peak = default_peak  # the mean of `_peaks`, kept as they change (asked per footprint)
        self.max_hold_s = max_hold_s
        self.idle_s = idle_s
        self.host_tokens = host_tokens  # a host KV tier holds programs' KV while they wait on tools
        self.pause = pause
        self.contention = contention
        self.rank = rank or (lambda program: None)
        self.programs: dict[str, Admitted] = {}
        self.waiting: dict[str, int] = {}  # programs with a request held now -> its context
        self.paused: dict[str, tuple[int, float]] = {}  # paused programs -> (their context, paused at)
        self.counters: Counter[str] = Counter()
        self._paused_now: list[str] = []
        self._load_now: int | None = None  # `load`, until the admitted set changes

    def __contains__(self, program: str) -> bool:
        return program in self.programs

    @property
    def expected_peak(self) -> int:
        return self._expected_peak

    def footprint(self, tokens: int) -> int:
        return max(tokens, self.expected_peak)

    @property
    def load(self) -> int:
        """Device KV the admitted programs need: running programs their whole footprint; programs in a
        tool call only the part a host tier cannot hold for them (it loads back for a copy's cost).
        Kept until the admitted set changes: vLLM asks for every held request at every step."""
        if self._load_now is None:
            self._load_now = self._load(self.programs.values())
        return self._load_now

    def _load(self, programs) -> int:
        running = waiting = 0
        for p in programs:
            if p.live > 0:
                running += self.footprint(p.tokens)
            else:
                waiting += self.footprint(p.tokens)
        return running + max(0, waiting - self.host_tokens)

    @property
    def demand(self) -> int:
        """The load if every live program were admitted: the admitted, the held and the paused."""
        others = {**{p: t for p, (t, _) in self.paused.items()}, **self.waiting}
        return self.load + sum(self.footprint(t) for p, t in others.items() if p not in self.programs)

    def contended(self) -> bool:
        """Whether the gate acts now: always without a contention signal, else while it says so."""
        if self.contention is None:
            return True
        was = self.contention.on
        on = self.contention.update(self.demand, self.limit)
        if on != was:
            self.counters["contention_on" if on else "contention_off"] += 1
            if on:
                self._split_by_rank()
        return on

    def admits(self, program: str, tokens: int, waited_s: float, now: float, weight: float = 1.0) -> bool:
        """May this program's request start? If so, admits it (counting why), pausing programs to make
        room for it if it must (`take_paused`)."""
        if program in self.programs:
            return True
        self.expire_idle(now)
        self.waiting[program] = tokens
        need = int(self.footprint(tokens) * max(1.0, weight))
        if not self.programs:
            reason = "admitted_idle"
        elif not self.contended():
            reason = "admitted_uncontended"
        elif self.load + need <= self.limit:
            reason = "admitted"
        elif self.pause and (victims := self._room_for(program, need)):
            for victim in victims:
                self._pause(victim, now)
            reason = "admitted_displacing"
        elif self.max_hold_s > 0 and waited_s >= self.max_hold_s:
            reason = "admitted_overdue"
        else:
            return False
        del self.waiting[program]
        if self.paused.pop(program, None) is not None:
            self.counters["resumed"] += 1
        self.programs[program] = Admitted(tokens, now, guest=reason == "admitted_overdue")
        self._load_now = None
        self.counters[reason] += 1
        return True

    def rebalance(self, now: float) -> None:
        """After a turn: while the admitted set is over the limit, pause guests in a tool call, the
        latest rank first (`take_paused`); once it is within the limit, its guests are members."""
        if not self.pause or not self.programs:
            return
        if self.load <= self.limit:
            for p in self.programs.values():
                p.guest = False
            return
        if not self.contended():
            return
        for name in self._idle_latest_first(guests=True):
            if self.load <= self.limit or len(self.programs) == 1:
                break
            self._pause(name, now)

    def take_paused(self) -> list[str]:
        """The programs paused since the last call (their KV is to be demoted)."""
        paused, self._paused_now = self._paused_now, []
        return paused

    def join(self, program: str, tokens: int, now: float) -> None:
        """A sub-agent of an admitted workflow starts: admitted without a check (its root's admission
        counted it), so it counts against the budget from now on."""
        if program not in self.programs:
            self.programs[program] = Admitted(tokens, now)
            self._load_now = None
            self.paused.pop(program, None)
            self.counters["joined_workflow"] += 1
        self.started(program, tokens, now)

    def started(self, program: str, tokens: int, now: float) -> None:
        """A request of an admitted program entered the engine with a context of `tokens`."""
        if (p := self.programs.get(program)) is not None:
            p.tokens, p.last_active, p.live = max(p.tokens, tokens), now, p.live + 1
            self._load_now = None

    def finished(self, program: str, tokens: int, now: float, quiet_s: float | None = None) -> None:
        """A request of an admitted program left the engine; its context is now `tokens`. `quiet_s`:
        idle this long, the program has most likely ended (a conversation nobody will say has ended,
        silent past its expected next turn): it stops counting then; back later, it asks again."""
        if (p := self.programs.get(program)) is not None:
            p.tokens, p.last_active, p.live = max(p.tokens, tokens), now, max(0, p.live - 1)
            p.quiet_s = quiet_s
            self._load_now = None

    def end(self, program: str) -> None:
        self.waiting.pop(program, None)
        self.paused.pop(program, None)
        if (p := self.programs.pop(program, None)) is not None:
            self._peaks.append(p.tokens)
            self._expected_peak = sum(self._peaks) // len(self._peaks)
            self._load_now = None
            self.counters["ended"] += 1

    def withdraw(self, program: str) -> None:
        """A held request left without starting (aborted): its program no longer waits."""
        self.waiting.pop(program, None)

    def expire_idle(self, now: float) -> None:
        idle = [name for name, p in self.programs.items()
                if p.live == 0 and now - p.last_active >= min(self.idle_s, p.quiet_s or self.idle_s)]
        for name in idle:
            del self.programs[name]
            self._load_now = None
        self.counters["expired_idle"] += len(idle)
        # a paused program that has not come back in as long no longer counts as demand either
        gone = [name for name, (_, since) in self.paused.items() if name not in self.waiting and now - since >= self.idle_s]
        for name in gone:
            del self.paused[name]

    # ---- internals --------------------------------------------------------------------------------
    def _idle_latest_first(self, guests: bool = False) -> list[str]:
        idle = [name for name, p in self.programs.items() if p.live == 0 and (p.guest or not guests)]
        order = {name: i for i, name in enumerate(self.programs)}  # admission order breaks rank ties
        return sorted(idle, key=lambda n: (self._rank(n), order[n]), reverse=True)

    def _split_by_rank(self) -> None:
        """Contention began with every program admitted: the earliest ranks that fit the limit stay
        members, the rest are guests (paused at their next tool boundary while the set is over it)."""
        order = {name: i for i, name in enumerate(self.programs)}
        members: list[Admitted] = []
        for name in sorted(self.programs, key=lambda n: (self._rank(n), order[n])):
            p = self.programs[name]
            p.guest = self._load([*members, p]) > self.limit and bool(members)
            if not p.guest:
                members.append(p)
        self.counters["guests_at_contention"] += len(self.programs) - len(members)

    def _rank(self, program: str) -> float:
        rank = self.rank(program)
        return float("inf") if rank is None else rank

    def _room_for(self, program: str, need: int) -> list[str]:
        """Admitted programs in a tool call, of a later rank than `program`, whose pause makes room for
        `need` (latest first); [] if pausing all of them would not."""
        mine = self._rank(program)
        later = [name for name in self._idle_latest_first() if self._rank(name) > mine]
        gone = set(later)
        if not later or self._load(p for n, p in self.programs.items() if n not in gone) + need > self.limit:
            return []  # pausing every one of them would not make room (the common case: asked every step)
        victims, kept = [], dict(self.programs)
        for name in later:
            victims.append(name)
            del kept[name]
            if self._load(kept.values()) + need <= self.limit:
                return victims
        return []

    def _pause(self, program: str, now: float) -> None:
        p = self.programs.pop(program)
        self._load_now = None
        self.paused[program] = (p.tokens, now)
        self._paused_now.append(program)
        self.counters["paused"] += 1
