"""The program book: what one engine's scheduler knows and decides about agent programs. Plain Python.

vLLM's scheduler sees requests; agentserve schedules programs. The book keeps the program-level
state of one engine and makes every program-level decision, so that the vLLM adapter
(`agentserve.engine.scheduler.ProgramScheduler`) only moves blocks and a simulator can run the same
rules:

- ranks: each program's arrival rank (program FCFS: a request's priority is its program's rank; a
  request without a program is a one-turn program). With a workflow order (`SchedulerConfig.order`
  other than "program") the rank is the workflow's: a sub-agent keeps its root's rank, and with "las"
  a request's priority is instead its workflow's attained service (tokens computed so far) when it
  arrives. Ranks go when the last program of their workflow ends; past `MAX_PROGRAM_RANKS` the oldest
  idle ones go too (clients that never end programs).
- the wait bound: a request waiting longer than `max_wait_s` is overdue (the queue order serves the
  overdue first come first served); the book notices requests crossing it (`age`).
- admission (`AdmissionGate`, working-set admission; on while the engine is contended by default): a
  request of a program outside the admitted set may be held, and admitted programs in a tool call may
  be paused (their pin goes, and the core evicts their blocks first: `take_paused`). A program inferred
  from its conversation stops counting once silent past twice its expected next turn: nobody says
  when it ends, and a finished conversation counted until it ends would hold newer programs out.
- pins (`PinTable`): whether a finished turn pins, which pin goes under pressure and who may take
  it (pin mode), expiry, and the release when the next turn is admitted.
- the end: nothing of an ended program stays. A request still in the engine when its program ends, or
  one that reaches the engine after the end (the front end began it first, or the end came sooner
  from another process), is served as a one-off: no rank, no pin, no next use. Requests carry their
  program's life (the control plane's serial, `XARG_LIFE`), so a late request of an ended life is told
  apart from a request of the next life of the same id; ended lives are remembered (`MAX_PROGRAM_RANKS`).

Every decision is counted (`counters`) and traced (`events`, drained by the control tick). Time comes
from the injected `clock` (wall-clock seconds: vLLM stamps requests with `time.time()`), so tests and
simulations drive it without sleeping. The trade-off of keeping the book apart from vLLM's request
objects: the adapter passes plain values (ids, token counts, arrival times) at each hook, a few
attribute reads per request per step.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from agentserve.options import SchedulerConfig
from agentserve.programs.admission import AdmissionGate
from agentserve.programs.contention import Contention
from agentserve.programs.fields import (XARG_INFERRED, XARG_IS_LAST, XARG_LIFE, XARG_NEXT_USE, XARG_PARENT,
                                       XARG_PRIORITY, XARG_PROGRAM, XARG_TTL, XARG_WORKFLOW)
from agentserve.programs.ids import tenant_of
from agentserve.programs.next_use import NEVER, NextUse
from agentserve.ttl.pins import Pin, PinTable, Release

MAX_EVENTS = 4096  # events kept between two control ticks (the front end ticks ~5x per second)
AGING_CHECK_S = 0.05  # how often waiting requests are checked against the wait bound
# Past this many ranked programs, ranks of programs with no live request and no pin go, oldest first:
# such a program's next request is ranked as a new arrival, which is what an idle program is.
MAX_PROGRAM_RANKS = 65536
# A priority hint's level outweighs any rank or attained service (both stay far below this).
PRIORITY_SPAN = 1 << 48
WORKFLOW_SIZE_WINDOW = 64  # ended workflows whose mean size a new workflow's admission expects
# An inferred conversation silent past this many times its expected gap has most likely ended.
INFERRED_QUIET_FACTOR = 2.0


class ProgramBook:
    def __init__(self, config: SchedulerConfig, *, total_blocks: int, block_size: int, max_model_len: int,
                 clock: Callable[[], float] = time.time, group_of: Callable[[str], str | None] = tenant_of):
        self.config = config
        self.clock = clock
        self.block_size = block_size
        self.pins = PinTable(cap_blocks=int(total_blocks * config.pin_cap_share),
                             group_caps={t: int(total_blocks * s) for t, s in config.tenant_pin_shares.items()},
                             group_of=group_of)
        a = config.admission
        self.admission = AdmissionGate(
            total_blocks * block_size, a.share, default_peak=int(max_model_len * a.default_peak_share),
            max_hold_s=a.max_hold_s, host_tokens=config.host_tokens, pause=a.pause,
            contention=Contention() if a.mode == "auto" else None,
            rank=self.rank) if a.mode != "off" and a.share > 0 else None
        self.next_use = NextUse(clock)  # when each program's KV is needed again (the host tier evicts by it)
        self.counters: Counter[str] = Counter()
        self.events: list[dict[str, Any]] = []
        self.reorder_due = False  # queue keys changed (pins, the wait bound): re-key at the next step
        self._ranks: dict[str, int] = {}  # rank key (program, or its workflow) -> arrival rank (insertion order)
        self._rank_seq = itertools.count()
        self._key: dict[str, str] = {}  # program -> its rank key
        self._members: Counter[str] = Counter()  # rank key -> its programs not ended
        self._service: Counter[str] = Counter()  # rank key -> tokens computed for it (las)
        self._size: Counter[str] = Counter()  # rank key -> programs it has had (a workflow's size)
        self._sizes: deque[int] = deque(maxlen=WORKFLOW_SIZE_WINDOW)  # sizes of workflows that ended
        self._live: dict[str, set[str]] = {}  # program -> its requests in the engine now
        self._life: dict[str, int] = {}  # program -> the life its requests here belong to
        self._ended: dict[str, int] = {}  # program -> its last life that ended (oldest first, bounded)
        self._orphans: set[str] = set()  # requests in the engine whose program's life has ended
        self._parent: dict[str, str] = {}  # sub-agent -> its parent program
        self._sub_agents: Counter[str] = Counter()  # program -> its sub-agents not ended
        self._held_for_sub_agents: set[int] = set()  # pins kept past their TTL for sub-agents (ids, counted once)
        self._returning: set[str] = set()  # requests of programs seen before (not a first turn)
        self._newcomers: dict[str, str] = {}  # requests of programs not admitted (new or paused) -> program
        self._held: set[str] = set()  # newcomers the gate has held at least once
        self._context: dict[str, int] = {}  # program -> its context when its last turn ended (admission)
        self._paused: list[str] = []  # programs paused since the core last took them
        self._releases: list[Release] = []  # their pins, released since
        self._aged: set[str] = set()  # waiting requests already seen overdue
        self._next_aging_check = 0.0

    # ---- arrivals, admission, departures -------------------------------------------------------
    def arrive_request(self, request_id: str, xargs: Mapping | None, prompt_tokens: int) -> int:
        """`arrive`, with the program fields read from a request's xargs (what the front end attached)."""
        x = xargs or {}
        priority = self.arrive(request_id, x.get(XARG_PROGRAM), prompt_tokens, x.get(XARG_WORKFLOW),
                               x.get(XARG_PARENT), x.get(XARG_LIFE))
        level = x.get(XARG_PRIORITY)
        if level:  # a priority hint (programs/hints.py): its level goes before any rank
            self.counters["priority_hints"] += 1
            return priority - int(level) * PRIORITY_SPAN
        return priority

    def arrive(self, request_id: str, program: str | None, prompt_tokens: int, workflow: str | None = None,
               parent: str | None = None, life: int | None = None) -> int:
        """A request entered the engine; returns its priority (its program's, or workflow's, arrival
        rank; with "las" its workflow's attained service). `parent`: the sub-agent's parent program;
        `life`: the program's life the request belongs to (None: not known)."""
        if program is not None and life is not None:
            if life <= self._ended.get(program, -1):  # the program ended before its request got here
                self._orphan(request_id, program)
                program = None
            else:
                self._life[program] = max(life, self._life.get(program, life))
        if program is None:
            return next(self._rank_seq)  # a lone request is a one-turn program
        key = self._key.get(program)
        if key is None:
            key = self._key[program] = workflow if workflow and self.config.order != "program" else program
            self._members[key] += 1
            self._size[key] += 1
            if key != program:
                self.counters["sub_agents_ranked_by_workflow"] += 1
            if parent is not None and parent != program:
                self._parent[program] = parent
                self._sub_agents[parent] += 1
        if key not in self._ranks:
            self._ranks[key] = next(self._rank_seq)
            if len(self._ranks) > MAX_PROGRAM_RANKS:
                self._forget_idle_programs()
            if self.admission is not None:
                self._newcomers[request_id] = program
        else:
            self._returning.add(request_id)
            if self.admission is not None:
                if program in self.admission:
                    self.admission.started(program, prompt_tokens, self.clock())
                elif key != program and program not in self.admission.paused:
                    self.admission.join(program, prompt_tokens, self.clock())  # its workflow was admitted whole
                else:
                    self._newcomers[request_id] = program  # held, paused or idle too long: asks again
        self._live.setdefault(program, set()).add(request_id)
        self.next_use.started(program)
        if self.config.order == "las":
            return self._service[key]
        return self._ranks[key]

    def may_start(self, request_id: str, prompt_tokens: int, arrival_time: float) -> bool:
        """May this waiting request be scheduled now? False holds it: its program is not admitted."""
        program = self._newcomers.get(request_id)
        if program is None:
            return True
        now = self.clock()
        weight = self.expected_workflow_size if request_id not in self._returning else 1.0
        if self.admission.admits(program, prompt_tokens, now - arrival_time, now, weight):
            del self._newcomers[request_id]
            self._held.discard(request_id)
            self.admission.started(program, prompt_tokens, now)
            self._pause(self.admission.take_paused(), for_program=program)
            return True
        if request_id not in self._held:
            self._held.add(request_id)
            self.counters["admission_held"] += 1
            self.event("admission_hold", program, load=self.admission.load, limit=self.admission.limit,
                       prompt=prompt_tokens)
        return False

    def started(self, request_id: str, program: str | None, cached_tokens: int, prompt_tokens: int,
                arrival_time: float) -> list[Release]:
        """A request was scheduled for the first time with `cached_tokens` of prefix hit: its
        program's pin is consumed (the hit holds those blocks now)."""
        returning = request_id in self._returning
        self._returning.discard(request_id)
        if program is None or request_id in self._orphans:
            return []
        if returning and self.admission is not None and self.admission.contention is not None:
            needed = min(self._context.get(program, 0), prompt_tokens)
            self.admission.contention.returned(needed, cached_tokens)
        release = self.pins.release(program, "consumed")
        if release is not None:
            self.counters["pinned_tokens_served"] += min(cached_tokens, release.pin.tokens)
            return self._released([release])
        if returning:
            self.event("admit_unpinned", program, queue_s=self.clock() - arrival_time, cached=cached_tokens,
                       prompt=prompt_tokens)
        return []

    def leave_request(self, request_id: str, xargs: Mapping | None, context_tokens: int, *, aborted: bool,
                      computed_tokens: int = 0) -> tuple[list[Release], float]:
        """`leave`, with the program fields read from the request's xargs."""
        x = xargs or {}
        next_use = x.get(XARG_NEXT_USE)
        return self.leave(request_id, x.get(XARG_PROGRAM), context_tokens, aborted=aborted,
                          is_last=bool(x.get(XARG_IS_LAST)), ttl_s=float(x.get(XARG_TTL, 0.0) or 0.0),
                          next_use_s=float(next_use) if next_use is not None else None,
                          computed_tokens=computed_tokens, inferred=bool(x.get(XARG_INFERRED)))

    def leave(self, request_id: str, program: str | None, context_tokens: int, *, aborted: bool,
              is_last: bool, ttl_s: float, next_use_s: float | None = None,
              computed_tokens: int = 0, inferred: bool = False) -> tuple[list[Release], float]:
        """A request left the engine after `computed_tokens` of work (prompt not served from cache, and
        output); its program's next turn is predicted `next_use_s` from now (the tool's predicted
        duration; `inferred`: the program was inferred from its conversation, so admission stops
        counting it once silent past INFERRED_QUIET_FACTOR times that). Returns (pins to release, TTL
        to pin its blocks for: 0 = none)."""
        for ids in (self._returning, self._aged, self._held):
            ids.discard(request_id)
        if (held := self._newcomers.pop(request_id, None)) is not None and held not in self._newcomers.values():
            self.admission.withdraw(held)  # it left without starting
        if request_id in self._orphans:  # its program ended: nothing of it is kept
            self._orphans.discard(request_id)
            self.counters["requests_outliving_program_end"] += 1
            return [], 0.0
        if program is None:
            return [], 0.0
        if (key := self._key.get(program)) is not None:
            self._service[key] += max(0, computed_tokens)
        if self.admission is not None:
            self._context[program] = context_tokens
            quiet_s = INFERRED_QUIET_FACTOR * next_use_s if inferred and next_use_s is not None else None
            self.admission.finished(program, context_tokens, self.clock(), quiet_s)
            self.admission.rebalance(self.clock())
            self._pause(self.admission.take_paused())
        requests = self._live.get(program, set())
        requests.discard(request_id)
        if not requests:
            self._live.pop(program, None)
        self.next_use.finished(program, next_use_s, is_last)
        if aborted:
            return self._released([self.pins.release(program, "abort")]), 0.0
        if is_last or ttl_s <= 0 or (self.admission is not None and program in self.admission.paused):
            return self._released([self.pins.release(program, "replaced")]), 0.0
        return [], ttl_s

    def pin(self, program: str, blocks: Sequence, ttl_s: float) -> tuple[bool, list[Release]]:
        """Pin a finished turn's blocks for `ttl_s`. Returns (pinned, pins to release first)."""
        now = self.clock()
        pin = Pin(program, blocks, len(blocks) * self.block_size, self.rank(program) or 0, now, now + ttl_s)
        inserted, releases = self.pins.add(pin)
        if inserted:
            self.counters["pins_created"] += 1
            self.event("pin", program, blocks=len(blocks), ttl_s=ttl_s)
            self.reorder_due = True
        else:
            self.counters["pins_refused"] += 1
            self.event("pin_refused", program, blocks=len(blocks))
        return inserted, self._released(releases)

    # ---- memory pressure ------------------------------------------------------------------------
    def release_for(self, program: str | None, rank: int, *, running: bool, preempted: bool,
                    arrival_time: float) -> Release | None:
        """A request cannot get blocks: the pin to release for it, or None (it waits). Pin mode soft:
        any pin, latest program first, the asker's own last. Ordered: running work (else preempted),
        preempted and overdue requests may take any pin; other waiting requests only later programs'."""
        junior_to = None
        if self.config.pin_mode == "ordered" and not (running or preempted or self.overdue(arrival_time)):
            junior_to = rank
        release = self.pins.release_for_pressure(spare=program, junior_to=junior_to)
        if release is None:
            self.counters["pin_waits"] += 1
            return None
        return self._released([release])[0]

    # ---- time -----------------------------------------------------------------------------------
    def overdue(self, arrival_time: float) -> bool:
        return self.config.max_wait_s > 0 and self.clock() - arrival_time > self.config.max_wait_s

    def age(self, waiting: Iterable[tuple[str, float]]) -> None:
        """Note waiting requests ((id, arrival time)) that crossed the wait bound since the last check."""
        now = self.clock()
        if self.config.max_wait_s <= 0 or now < self._next_aging_check:
            return
        self._next_aging_check = now + AGING_CHECK_S
        horizon = now - self.config.max_wait_s
        newly = [rid for rid, arrival in waiting if arrival < horizon and rid not in self._aged]
        if newly:
            self._aged.update(newly)
            self.counters["requests_aged"] += len(newly)
            self.reorder_due = True

    def expire(self, busy_programs: Callable[[], Iterable[str | None]]) -> list[Release]:
        """Pins past their TTL, except those of programs with a request waiting (it takes the pin) and
        of parents with live sub-agents: a parent's context is the prefix its sub-agents fork from, so
        it stays while any of them may still read it (still the first to go under pressure, as any pin)."""
        now = self.clock()
        nxt = self.pins.next_expiry()
        if nxt is None or nxt > now:
            return []
        parents = {p for p, n in self._sub_agents.items() if n > 0 and p in self.pins}
        for program in parents:
            pin = self.pins.get(program)
            if pin.expires_at <= now and id(pin) not in self._held_for_sub_agents:
                self._held_for_sub_agents.add(id(pin))
                self.counters["pins_held_for_sub_agents"] += 1
                self.event("pin_held_for_sub_agents", program, sub_agents=self._sub_agents[program])
        return self._released(self.pins.expire(now, set(busy_programs()) | parents))

    # ---- the control plane's commands ------------------------------------------------------------
    def end(self, program: str, life: int | None = None) -> list[Release]:
        """The program's `life` (None: whichever runs here) ended: its requests still in the engine are
        served as one-offs from now on, and its rank, pin and next use go. An older life's end that
        arrives after a newer life's requests leaves the newer life alone."""
        if life is not None:
            self._ended[program] = max(life, self._ended.pop(program, life))
            if len(self._ended) > MAX_PROGRAM_RANKS:
                del self._ended[next(iter(self._ended))]
            if life < self._life.get(program, life):
                return []
        self._life.pop(program, None)
        for request_id in self._live.pop(program, ()):
            self._orphan(request_id, program)
        key = self._key.pop(program, None)  # None: never seen here, or ended already
        if key is not None:
            self._members[key] -= 1
            if self._members[key] <= 0:  # the workflow's last program: its rank and service go
                del self._members[key]
                self._ranks.pop(key, None)
                self._service.pop(key, None)
                self._sizes.append(self._size.pop(key, 1))
        self.next_use.ended(program)
        if self.admission is not None:
            self.admission.end(program)
            self._context.pop(program, None)
        parent = self._parent.pop(program, None)
        if parent is not None and self._sub_agents[parent] > 0:
            self._sub_agents[parent] -= 1
            if self._sub_agents[parent] == 0:
                del self._sub_agents[parent]
        self._sub_agents.pop(program, None)  # a parent ended before its sub-agents: nothing to hold for
        return self._released([self.pins.release(program, "program_end")])

    def release(self, program: str, reason: str, life: int | None = None) -> list[Release]:
        """The program's pin goes (an older `life`'s release leaves a newer life's pin)."""
        if life is not None and life < self._life.get(program, life):
            return []
        return self._released([self.pins.release(program, reason)])

    def release_all(self, reason: str) -> list[Release]:
        return self._released(self.pins.release_all(reason))

    def command(self, command: str, payload: dict) -> list[Release]:
        """A control command from the front end (end / release / release_all / set_ttl / tick): the
        pins it releases. ValueError for an unknown command."""
        program, reason, life = payload.get("program_id"), payload.get("reason", "program_end"), payload.get("life")
        if command == "end":
            return self.end(program, life)
        if command == "release":
            return self.release(program, reason, life)
        if command == "release_all":
            return self.release_all(reason)
        if command == "set_ttl":
            self.set_ttl(program, float(payload["ttl_s"]))
        elif command != "tick":
            raise ValueError(f"unknown agentserve control command {command!r}")
        return []

    def set_ttl(self, program: str, ttl_s: float) -> None:
        if (pin := self.pins.get(program)) is not None:
            pin.expires_at = pin.created_at + max(0.0, ttl_s)

    @property
    def pauses_pending(self) -> bool:
        return bool(self._paused or self._releases)

    def take_paused(self) -> tuple[list[str], list[Release]]:
        """The programs paused since the last call, and the pins their pause released."""
        paused, self._paused = self._paused, []
        releases, self._releases = self._releases, []
        return paused, releases

    def holds_pin(self, program: str | None) -> bool:
        return program is not None and program in self.pins

    def stats(self) -> dict[str, Any]:
        """Counters, pins and program counts; drains the events."""
        events, self.events = self.events, []
        counters = dict(self.counters)
        if self.admission is not None:
            counters.update({f"admission_{k}": v for k, v in self.admission.counters.items()})
        return {"pins": len(self.pins), "pinned_blocks": self.pins.pinned_blocks,
                "pin_cap_blocks": self.pins.cap_blocks, "programs": len(self._ranks), "counters": counters,
                "admitted_programs": len(self.admission.programs) if self.admission is not None else None,
                "events": events}

    @property
    def idle(self) -> bool:
        """No program has a request in the engine and no per-request state is left."""
        return not (self._live or self._aged or self._returning or self._newcomers or self._held or self._orphans)

    @property
    def expected_workflow_size(self) -> float:
        """Programs a new workflow is expected to bring: the mean size of the last workflows that ended."""
        return sum(self._sizes) / len(self._sizes) if self._sizes else 1.0

    def holds(self, program: str) -> list[str]:
        """What the book keeps of a program: its rank, requests in the engine, a pin, a next use."""
        kept = {"rank": program in self._key, "requests": program in self._live, "pin": program in self.pins,
                "next_use": self.next_use.seconds_until(program) != NEVER}
        return [name for name, held in kept.items() if held]

    def rank(self, program: str) -> int | None:
        return self._ranks.get(self._key.get(program, program))

    def event(self, kind: str, program: str, **fields: Any) -> None:
        if len(self.events) < MAX_EVENTS:
            self.events.append({"kind": kind, "program": program, "t": self.clock(), **fields})

    # ---- internals --------------------------------------------------------------------------------
    def _pause(self, programs: list[str], for_program: str | None = None) -> None:
        """Admission paused these programs (in a tool call): their pins go, the core demotes their KV."""
        for program in programs:
            self._paused.append(program)
            self._releases += self._released([self.pins.release(program, "paused")])
            self.event("pause", program, for_program=for_program, load=self.admission.load,
                       limit=self.admission.limit)

    def _orphan(self, request_id: str, program: str) -> None:
        """The request's program ended: from now on it is a one-off (admission holds it no longer)."""
        self._orphans.add(request_id)
        self._returning.discard(request_id)
        self._held.discard(request_id)
        self._newcomers.pop(request_id, None)
        self.event("request_outlives_program", program, request=request_id)

    def _released(self, releases: Iterable[Release | None]) -> list[Release]:
        out = [r for r in releases if r is not None]
        for r in out:
            self._held_for_sub_agents.discard(id(r.pin))
            self.counters[f"pins_released_{r.reason}"] += 1
            self.event("unpin", r.pin.program_id, reason=r.reason, blocks=r.pin.num_blocks,
                       held_s=self.clock() - r.pin.created_at)
            if r.reason != "consumed":
                self.reorder_due = True
        return out

    def _forget_idle_programs(self) -> None:
        """Drop the oldest ranks of programs with no live request and no pin, down to 3/4 of the cap."""
        excess = len(self._ranks) - MAX_PROGRAM_RANKS * 3 // 4
        busy = {self._key.get(p, p) for p in (*self._live, *self.pins.pins)}
        idle = [key for key in self._ranks if key not in busy][:excess]
        for key in idle:
            del self._ranks[key]
            self._service.pop(key, None)
        forgotten = set(idle)
        for program in [p for p, key in self._key.items() if key in forgotten]:
            del self._key[program]
            self._context.pop(program, None)
        for key in forgotten:
            self._members.pop(key, None)
            self._size.pop(key, None)
        self.counters["program_ranks_forgotten"] += len(idle)
