"""agentserve's vLLM scheduler plugin (`SchedulerConfig.scheduler_cls`): KV pins and program FCFS.

A thin adapter: which pins exist is decided by `agentserve.ttl.pins.PinTable`, how long by the
frontend's TTL policy (it arrives per request in `SamplingParams.extra_args`), the queue order by
`ProgramQueue`. This class only moves blocks:

- pin: when a non-final turn of a program finishes, `block_pool.touch` its full (prefix-cached) blocks
  before vLLM frees the request, so their reference count stays > 0 and LRU cannot evict them; the next
  turn hits them through ordinary prefix caching. Unpin = `block_pool.free_blocks`.
- unpin when the program's next turn is admitted (its hit holds the blocks now), at expiry (checked at
  every step and every control tick, skipped while a request of the program waits), on program end,
  abort, and under memory pressure: `allocate_slots` is wrapped so that, before vLLM preempts or leaves
  a request waiting for lack of blocks, pins are released latest program first (pin mode "soft"; in
  mode "ordered" a waiting request frees only later programs' pins until it is past the wait bound).
- program admission (optional, `admission_share` > 0; agentserve/programs/admission.py): a new
  program's first request is skipped for the step (vLLM's `_handle_blocked_waiting_request` hook)
  while the admitted programs' contexts fill that share of the KV budget.
- program FCFS: every request gets `priority` = its program's arrival rank (vLLM's priority policy then
  preempts the latest program first), and the waiting queue is a `ProgramQueue`; a request that has
  waited longer than `max_wait_s` is served right after the preempted ones, first come first served
  among such requests (a bound on program FCFS's tail).

Why a scheduler subclass rather than a KV connector's delayed free: the connector sees the finish but
not admission or allocation failure, so "unpin when the next turn is admitted" and "release before
preempting" would need the scheduler anyway; the connector slot stays free for KV sharing.

The frontend talks to it through `EngineCore.agentserve_control` (a vLLM utility call, installed below):
end / release / set_ttl / tick (expire + report counters and events).
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from typing import Any

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from agentserve.engine.program_queue import ProgramQueue
from agentserve.programs.admission import DEFAULT_MAX_HOLD_S, AdmissionGate
from agentserve.programs.fields import XARG_IS_LAST, XARG_PROGRAM, XARG_TTL
from agentserve.server.tenants import tenant_of
from agentserve.ttl.pins import Pin, PinTable, Release

# Share of the KV budget pins may hold at most; the rest always serves running work.
DEFAULT_PIN_CAP_SHARE = 0.5
# Program FCFS lets a later program's turn wait behind every earlier program's turns; under overload
# that pushes the TTFT tail onto the latest programs. A request waiting longer than this is served
# before program order, overdue requests among themselves first come first served (stock vLLM's
# order), which bounds the wait; 0 turns the bound off. The bound adds up to itself to a request's
# wait over stock vLLM's, so it must be small next to stock vLLM's own tail: at 2 s (stock p99 TTFT
# on BFCL at 12k of KV: 1.6-2.2 s) agentserve's p99 TTFT came out 1.35-1.9x stock's in every round,
# at 0.5 s 0.78-1.32x (pooled 1.09x), with no measurable mean-JCT cost (docs/benchmarks.md).
DEFAULT_MAX_WAIT_S = 0.5
AGING_CHECK_S = 0.05  # how often the waiting queue is scanned for requests past the bound
# Who may free a pin under memory pressure. "soft": any request (pins never delay anything). "ordered":
# a waiting request frees only later programs' pins and otherwise waits, until it is past max_wait_s;
# running work frees any pin before vLLM would preempt it.
PIN_MODES = ("soft", "ordered")
DEFAULT_PIN_MODE = "soft"
MAX_EVENTS = 4096  # events kept between two ticks (the frontend ticks ~5x per second)
# Program ranks are dropped when the front end ends a program; a client that sets the program field
# itself (vllm_xargs, bypassing the front end) never ends one. Past this many programs, ranks of
# programs with no live request and no pin go, oldest first: such a program's next request is then
# ranked as a new arrival, which is what an idle program is.
MAX_PROGRAM_RANKS = 65536


def program_of(request: Request) -> str | None:
    extra = request.sampling_params.extra_args if request.sampling_params else None
    return extra.get(XARG_PROGRAM) if extra else None


class ProgramScheduler(Scheduler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        conf = (self.vllm_config.additional_config or {}).get("agentserve", {})
        total = self.kv_cache_manager.block_pool.num_gpu_blocks - 1  # minus the null block
        self.pins = PinTable(cap_blocks=int(total * float(conf.get("pin_cap_share", DEFAULT_PIN_CAP_SHARE))),
                             group_caps={t: int(total * float(share))
                                         for t, share in conf.get("tenant_pin_shares", {}).items()},
                             group_of=tenant_of)
        self.block_size = self.cache_config.block_size
        self.max_wait_s = float(conf.get("max_wait_s", DEFAULT_MAX_WAIT_S))
        self.ordered_pins = conf.get("pin_mode", DEFAULT_PIN_MODE) == "ordered"
        self._next_aging_check = 0.0
        self._reorder_due = False  # the queue's keys changed; re-keyed at the next step's start
        self._aged: set[str] = set()  # waiting requests already re-keyed as overdue
        self._ranks: dict[str, int] = {}  # program -> arrival rank, until the program ends (insertion order)
        self._live: Counter[str] = Counter()  # program -> its requests in the scheduler now
        self._rank_seq = itertools.count()
        self._returning: set[str] = set()  # requests of programs seen before (not a first turn)
        share = float(conf.get("admission_share", 0.0))
        # Before any program ended, a program is expected to grow to a quarter of the context window.
        default_peak = int(conf.get("admission_peak_tokens", self.vllm_config.model_config.max_model_len // 4))
        self.admission = AdmissionGate(total * self.block_size, share, default_peak=default_peak, max_hold_s=float(
            conf.get("admission_max_hold_s", DEFAULT_MAX_HOLD_S))) if share > 0 else None
        self._newcomers: set[str] = set()  # first requests of new programs, not admitted yet
        self._held: set[str] = set()  # newcomers the gate has held at least once
        self.counters: Counter[str] = Counter()
        self.events: list[dict[str, Any]] = []
        self.waiting = ProgramQueue(self._queue_key)
        self._allocate = self.kv_cache_manager.allocate_slots
        self.kv_cache_manager.allocate_slots = self._allocate_or_release_pins

    # ---- ordering --------------------------------------------------------------------------
    def _queue_key(self, request: Request) -> tuple:
        if request.num_preemptions > 0:
            return (0, request.priority, request.arrival_time)
        if self._overdue(request, time.time()):
            # Past the bound: first come first served among the overdue, as stock vLLM would serve
            # them. Keeping program order here would let every earlier program's overdue turns pass a
            # late program's, which under overload (most requests overdue) is no bound at all.
            return (1, 0, request.arrival_time)
        if (p := program_of(request)) is not None and p in self.pins:
            return (2, request.priority, request.arrival_time)
        return (3, request.priority, request.arrival_time)

    def _overdue(self, request: Request, now: float) -> bool:
        return self.max_wait_s > 0 and now - request.arrival_time > self.max_wait_s

    def _age_waiting(self) -> None:
        """Re-key the queue when a request has crossed the wait bound since the last scan."""
        now = time.time()
        if self.max_wait_s <= 0 or now < self._next_aging_check or not self.waiting:
            return
        self._next_aging_check = now + AGING_CHECK_S
        horizon = now - self.max_wait_s
        newly = [r.request_id for r in self.waiting.unordered()
                 if r.arrival_time < horizon and r.request_id not in self._aged]
        if newly:
            self._aged.update(newly)
            self.counters["requests_aged"] += len(newly)
            self._reorder_due = True

    def add_request(self, request: Request) -> None:
        program = program_of(request)
        if program is None:
            request.priority = next(self._rank_seq)  # a lone request is a one-turn program
        else:
            if program not in self._ranks:
                self._ranks[program] = next(self._rank_seq)
                if len(self._ranks) > MAX_PROGRAM_RANKS:
                    self._forget_idle_programs()
                if self.admission is not None:
                    self._newcomers.add(request.request_id)
            else:
                self._returning.add(request.request_id)
                if self.admission is not None:
                    if any(program_of(self.requests[r]) == program for r in self._newcomers):
                        self._newcomers.add(request.request_id)  # its program is still held
                    else:
                        self.admission.started(program, request.num_prompt_tokens, time.time())
            request.priority = self._ranks[program]
            self._live[program] += 1
        super().add_request(request)

    def _forget_idle_programs(self) -> None:
        """Drop the oldest ranks of programs with no live request and no pin, down to 3/4 of the cap."""
        excess = len(self._ranks) - MAX_PROGRAM_RANKS * 3 // 4
        idle = [p for p in self._ranks if p not in self._live and p not in self.pins][:excess]
        for program in idle:
            del self._ranks[program]
        self.counters["program_ranks_forgotten"] += len(idle)

    def _handle_blocked_waiting_request(self, request: Request) -> bool:
        """vLLM asks this of every waiting request it considers; False skips it for this step."""
        if not super()._handle_blocked_waiting_request(request):
            return False
        if request.request_id not in self._newcomers:
            return True
        program, now = program_of(request), time.time()
        if self.admission.admits(program, request.num_prompt_tokens, now - request.arrival_time, now):
            self._newcomers.discard(request.request_id)
            self._held.discard(request.request_id)
            self.admission.started(program, request.num_prompt_tokens, now)
            return True
        if request.request_id not in self._held:
            self._held.add(request.request_id)
            self.counters["admission_held"] += 1
            self._event("admission_hold", program, load=self.admission.load, limit=self.admission.limit,
                        prompt=request.num_prompt_tokens)
        return False

    # ---- pin / unpin ------------------------------------------------------------------------
    def _free_request(self, request: Request, delay_free_blocks: bool = False):
        program = program_of(request)
        self._returning.discard(request.request_id)
        self._aged.discard(request.request_id)
        self._newcomers.discard(request.request_id)
        self._held.discard(request.request_id)
        if program is not None:
            if self.admission is not None:
                self.admission.finished(program, request.num_tokens, time.time())
            self._live[program] -= 1
            if self._live[program] <= 0:
                del self._live[program]
            if request.status == RequestStatus.FINISHED_ABORTED:
                self._release(self.pins.release(program, "abort"))
            else:
                self._maybe_pin(request, program)
        return super()._free_request(request, delay_free_blocks)

    def _maybe_pin(self, request: Request, program: str) -> None:
        extra = request.sampling_params.extra_args
        ttl = float(extra.get(XARG_TTL, 0.0) or 0.0)
        if extra.get(XARG_IS_LAST) or ttl <= 0:
            self._release(self.pins.release(program, "replaced"))
            return
        blocks = [b for group in self.kv_cache_manager.get_blocks(request.request_id).blocks
                  for b in group if b.block_hash is not None and not b.is_null]
        now = time.monotonic()
        pin = Pin(program, blocks, len(blocks) * self.block_size, self._ranks.get(program, 0), now, now + ttl)
        inserted, releases = self.pins.add(pin)
        for r in releases:
            self._release(r)
        if inserted:
            self.kv_cache_manager.block_pool.touch(blocks)
            self.counters["pins_created"] += 1
            self._event("pin", program, blocks=len(blocks), ttl_s=ttl)
            self._reorder_due = True
        else:
            self.counters["pins_refused"] += 1
            self._event("pin_refused", program, blocks=len(blocks))

    def _release(self, release: Release | None) -> None:
        if release is None:
            return
        # Tail first: if the blocks are evicted later, the end of the context goes before its start.
        self.kv_cache_manager.block_pool.free_blocks(reversed(release.pin.blocks))
        self.counters[f"pins_released_{release.reason}"] += 1
        self._event("unpin", release.pin.program_id, reason=release.reason, blocks=release.pin.num_blocks,
                    held_s=time.monotonic() - release.pin.created_at)
        if release.reason != "consumed":
            self._reorder_due = True

    def _allocate_or_release_pins(self, request: Request, *args, **kwargs):
        blocks = self._allocate(request, *args, **kwargs)
        if blocks is not None or not self.pins:  # the hot path: called per running request per step
            return blocks
        own = program_of(request)
        junior_to = request.priority if self.ordered_pins and not self._may_take_any_pin(request) else None
        while blocks is None and self.pins:
            release = self.pins.release_for_pressure(spare=own, junior_to=junior_to)
            if release is None:  # only earlier programs' pins left: wait for them (TTL, max_wait)
                self.counters["pin_waits"] += 1
                break
            self._release(release)
            blocks = self._allocate(request, *args, **kwargs)
        return blocks

    def _may_take_any_pin(self, request: Request) -> bool:
        """Running work (else it is preempted), preempted requests and requests past the wait bound
        may free any pin; other waiting requests only those of later programs (ordered pins)."""
        return (request.status == RequestStatus.RUNNING or request.num_preemptions > 0
                or self._overdue(request, time.time()))

    # ---- per step ---------------------------------------------------------------------------
    def schedule(self, *args, **kwargs):
        self._expire()
        self._age_waiting()
        if self._reorder_due:
            # Only here, never inside vLLM's schedule(): its waiting loop peeks the head, allocates
            # (which may release pins, see above) and then pops the head, so re-keying in between
            # would pop another request than the one it allocated for.
            self._reorder_due = False
            self.waiting.reorder()
        output = super().schedule(*args, **kwargs)
        for new in output.scheduled_new_reqs:
            request = self.requests.get(new.req_id)
            program = program_of(request) if request else None
            if program is None:
                continue
            cached = new.num_computed_tokens  # the prefix hit at admission
            release = self.pins.release(program, "consumed")
            if release is not None:
                self.counters["pinned_tokens_served"] += min(cached, release.pin.tokens)
                self._release(release)
            elif new.req_id in self._returning:
                self._event("admit_unpinned", program, queue_s=time.time() - request.arrival_time,
                            cached=cached, prompt=request.num_prompt_tokens)
            self._returning.discard(new.req_id)
        return output

    def _expire(self) -> None:
        nxt = self.pins.next_expiry()
        if nxt is None or nxt > time.monotonic():
            return
        busy = {program_of(r) for r in self.waiting.unordered()}
        for r in self.pins.expire(time.monotonic(), busy):
            self._release(r)

    def _event(self, kind: str, program: str, **fields: Any) -> None:
        if len(self.events) < MAX_EVENTS:
            self.events.append({"kind": kind, "program": program, "t": time.time(), **fields})

    # ---- control (frontend -> engine core) ---------------------------------------------------
    def agentserve_control(self, command: str, payload: dict) -> dict:
        program = payload.get("program_id")
        if command == "end":
            self._release(self.pins.release(program, "program_end"))
            self._ranks.pop(program, None)
            if self.admission is not None:
                self.admission.end(program)
        elif command == "release":
            self._release(self.pins.release(program, payload.get("reason", "program_end")))
        elif command == "release_all":
            for r in self.pins.release_all(payload.get("reason", "program_end")):
                self._release(r)
        elif command == "set_ttl":
            pin = self.pins.get(program)
            if pin is not None:
                pin.expires_at = pin.created_at + max(0.0, float(payload["ttl_s"]))
        elif command != "tick":
            raise ValueError(f"unknown agentserve control command {command!r}")
        self._expire()
        events, self.events = self.events, []
        return {
            "pins": len(self.pins),
            "pinned_blocks": self.pins.pinned_blocks,
            "pin_cap_blocks": self.pins.cap_blocks,
            "programs": len(self._ranks),
            # load, for routing new programs across replicas (free includes evictable cached blocks)
            "free_blocks": self.kv_cache_manager.block_pool.get_num_free_blocks(),
            "total_blocks": self.kv_cache_manager.block_pool.num_gpu_blocks - 1,
            "queued": len(self.waiting) + len(self.running),
            "counters": {**self.counters, **({f"admission_{k}": v for k, v in self.admission.counters.items()}
                                             if self.admission is not None else {})},
            "admitted_programs": len(self.admission.programs) if self.admission is not None else None,
            "events": events,
        }


def _install_control_utility() -> None:
    """Make `agentserve_control` callable as a vLLM utility (`call_utility_async`) on the engine core."""
    from vllm.v1.engine.core import EngineCore

    def agentserve_control(self, command: str, payload: dict) -> dict:
        if not isinstance(self.scheduler, ProgramScheduler):
            raise RuntimeError("the engine does not run agentserve's ProgramScheduler")
        return self.scheduler.agentserve_control(command, payload)

    EngineCore.agentserve_control = agentserve_control


_install_control_utility()
