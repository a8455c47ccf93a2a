"""One simulated vLLM engine: continuous batching with a token budget and chunked prefill, prefix
caching over a block pool (pool.py), preemption by recompute, and, with a `ProgramBook`, agentserve's
scheduler plugin: the same book (ranks, wait bound, admission, pins) and the same queue order
(`ProgramFCFS`) the vLLM adapter (agentserve/engine/scheduler.py) drives, called at the same points.

A step is two calls: `schedule(now)` picks the work and says how long it takes (the cost model);
`complete(now)` applies it when that time has passed. What follows vLLM's scheduler, and why:
- running requests first, in order; a request that cannot get a block releases pins first (the
  book names them), then preempts the lowest-priority running request (the latest one without a
  book), which loses its KV and waits again (recompute);
- waiting requests next, in queue order, unless a preemption happened this step; a request's prefix
  hit is the cached run of its full blocks, at most all but one token; it is admitted only if blocks
  for its whole sequence are free (vLLM's `scheduler_reserve_full_isl`), though it computes a chunk;
  a request that cannot get them stops the scan;
- a finished request's full blocks stay cached (LRU), or pinned if the book pins them.
With a host tier (host.py), a device prefix miss continues on the host: the blocks it holds are
loaded back in the admitting step, at the cost model's load price, instead of recomputed; as with
vLLM's connector, the request waits out that step and computes from the next one.
What is left out: speculative decoding, multi-modal inputs.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from agentserve.engine.turn_ledger import TurnLedger
from agentserve.programs.book import ProgramBook
from agentserve.programs.core import ProgramCore
from agentserve.sim.costs import CostModel
from agentserve.step_shape import step_shape
from agentserve.sim.host import HostTier
from agentserve.sim.pool import BlockKey, BlockPool


class Stream:
    """A program's token stream, by block: block i's identity. A sub-program's stream starts with its
    parent's first `prefix_tokens` tokens (its prompt extends the parent's context); a program with a
    shared prefix starts with the blocks of every stream that names it (`shared`: its name, tokens)."""

    def __init__(self, owner: str, block_size: int, parent: Stream | None = None, prefix_tokens: int = 0,
                 shared: tuple[str, int] | None = None):
        self.owner, self.block_size, self.parent = owner, block_size, parent
        self.shared_blocks = prefix_tokens // block_size if parent is not None else 0
        self.prefix_name, self.prefix_blocks = (f"shared:{shared[0]}", shared[1] // block_size) if shared else ("", 0)

    def key(self, i: int) -> BlockKey:
        if i < self.shared_blocks:
            return self.parent.key(i)
        return (self.prefix_name, i) if i < self.prefix_blocks else (self.owner, i)

    def keys(self, n: int) -> list[BlockKey]:
        return [self.key(i) for i in range(n)]

    def iter_keys(self, n: int):
        return (self.key(i) for i in range(n))


@dataclass(eq=False)
class SimRequest:
    request_id: str
    program: str | None
    stream: Stream
    prompt_tokens: int
    output_tokens: int
    arrival_time: float
    xargs: dict = field(default_factory=dict)  # what the front end attached (the book reads its program fields)
    remaining_s: float = 0.0  # predicted work its program has left (the critical-path orders)
    priority: int = 0
    num_preemptions: int = 0
    computed: int = 0
    generated: int = 0
    held: list[BlockKey] = field(default_factory=list)  # full blocks it references, in order
    anonymous: int = 0  # blocks it holds that are not full yet
    cached_tokens: int | None = None  # at its first admission (what the API reports)
    first_token_at: float | None = None
    done_at: float | None = None
    scheduled: int = 0  # tokens in the step under way
    loading: bool = False  # its KV is being loaded back from the host tier in the step under way
    owner: object = None  # whoever sent it (the fleet's program)

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.generated

    def blocks(self) -> int:
        return len(self.held) + self.anonymous


def _fcfs(request: SimRequest) -> tuple:
    return (request.arrival_time,)


class SimBlocks:
    """The core's block operations (programs/core.py `BlockOps`) on the simulator's pool."""

    def __init__(self, engine: SimEngine):
        self.engine = engine
        self.pool = engine.pool

    def touch(self, blocks) -> None:
        self.pool.touch(list(blocks))

    def free(self, blocks) -> None:
        self.pool.release(list(blocks))

    def evict_first(self, blocks) -> int:
        return self.pool.evict_first(list(blocks))

    def blocks_of(self, request_id: str) -> list:
        return list(self.engine.requests[request_id].held)

    def num_free(self) -> int:
        return self.pool.num_free()


class SimEngine:
    def __init__(self, name: str, *, num_blocks: int, block_size: int, max_num_seqs: int,
                 max_batched_tokens: int, cost: CostModel, book: ProgramBook | None = None,
                 order: Callable[[SimRequest], tuple] | None = None, host: HostTier | None = None,
                 turns: TurnLedger | None = None):
        self.name, self.block_size, self.cost = name, block_size, cost
        self.max_num_seqs, self.max_batched_tokens = max_num_seqs, max_batched_tokens
        self.pool = BlockPool(num_blocks)
        self.book = book
        self.core = ProgramCore(book, SimBlocks(self)) if book is not None else None
        self.requests: dict[str, SimRequest] = {}  # running requests by id
        self.host = host
        self.turns = turns  # each request's time by part, as engine/turn_timer.py splits a real engine's
        self.loaded_tokens = 0  # loaded back from the host tier in the step under way
        self.host_hit_tokens = 0
        self.order = order or _fcfs
        self.priority_preemption = book is not None  # vLLM's priority policy (the plugin's default)
        self.waiting: list[tuple[tuple, int, SimRequest]] = []
        self.running: list[SimRequest] = []
        self.batch: list[SimRequest] = []
        self.preemptions = 0
        self.preempted_this_step = False
        self._returned = 0  # budget given back by requests preempted after they were scheduled
        self._preempted: list[SimRequest] = []  # preempted in the step being scheduled (the turn ledger's)
        self._seq = itertools.count()

    # ---- requests --------------------------------------------------------------------------------
    def add(self, request: SimRequest) -> None:
        if self.core is not None:
            request.priority = self.core.arrive(request.request_id, request.xargs, request.prompt_tokens)
        if self.turns is not None:
            self.turns.arrive(request.request_id, request.program, request.prompt_tokens)
        self._enqueue(request)

    def _enqueue(self, request: SimRequest) -> None:
        heapq.heappush(self.waiting, (self.order(request), next(self._seq), request))

    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def queued(self) -> int:
        return len(self.waiting) + len(self.running)

    # ---- a step ----------------------------------------------------------------------------------
    def schedule(self, now: float) -> float:
        """Pick this step's work; returns its duration (0: nothing to run)."""
        if self.core is not None and self.core.step(self._waiting, bool(self.waiting)):
            self.waiting = [(self.order(r), s, r) for _, s, r in self.waiting]
            heapq.heapify(self.waiting)
        budget, self.preempted_this_step = self.max_batched_tokens, False
        self.batch, self.loaded_tokens, self._returned = [], 0, 0
        bs = self.block_size
        for request in list(self.running):
            if budget <= 0:
                break
            if self.preempted_this_step and request not in self.running:  # preempted by an earlier one
                continue
            n = min(request.total - request.computed, budget)
            if request.computed + n > (len(request.held) + request.anonymous) * bs:
                grown = self._grow(request, n)
                budget, self._returned = budget + self._returned, 0
                if not grown:
                    continue
            request.scheduled, budget = n, budget - n
            self.batch.append(request)
        if not self.preempted_this_step:
            budget = self._admit(budget)
        if self.core is not None:  # as the plugin: once vLLM's schedule() is done, for what it scheduled
            for r in self.batch:
                self.core.started(r.request_id, r.program, r.computed, r.prompt_tokens, r.arrival_time)
        if self.turns is not None:
            self._stamp(now)
        prefill, decodes, kv, pairs = step_shape((r.computed, r.scheduled, r.generated > 0) for r in self.batch)
        return self.cost.step(prefill, decodes, kv, self.loaded_tokens, pairs)

    def _waiting(self):
        return ((r.request_id, r.program, r.arrival_time) for _, _, r in self.waiting)

    def _stamp(self, now: float) -> None:
        """The turn ledger at a step's start: what each live request does in it."""
        for request in self.running:
            if request.scheduled:
                self.turns.scheduled(request.request_id, request.computed, request.computed + request.scheduled,
                                     request.generated > 0, now)
            else:
                self.turns.enter(request.request_id, "load_back" if request.loading else "queue", now)
        # a waiting request stays in "queue" until scheduled: only those this step preempted change part
        for request in self._preempted:
            self.turns.enter(request.request_id, "queue", now)
        self._preempted.clear()

    def _grow(self, request: SimRequest, n: int) -> bool:
        """Blocks for `n` more tokens of a running request: releasing pins, then preempting."""
        need = -(-(request.computed + n) // self.block_size) - request.blocks()
        while need > 0 and not self.pool.take(need):
            if self._release_pin(request, running=True):
                continue
            victim = max(self.running, key=self._preemption_order)
            self._preempt(victim)
            if victim is request:
                return False
        request.anonymous += max(0, need)
        return True

    def _preemption_order(self, request: SimRequest) -> tuple:
        # vLLM: the lowest priority (the highest number, then the latest arrival); FCFS: the latest
        return (request.priority, request.arrival_time) if self.priority_preemption else (request.arrival_time,)

    def _preempt(self, request: SimRequest) -> None:
        self.running.remove(request)
        self.requests.pop(request.request_id, None)
        self.preempted_this_step = True
        if request.scheduled:  # scheduled earlier in this step: its tokens go back to the budget
            self.batch.remove(request)
            self._returned += request.scheduled
            request.scheduled = 0
        self.pool.release(request.held, request.anonymous)
        request.held, request.anonymous, request.computed = [], 0, 0
        request.num_preemptions += 1
        self.preemptions += 1
        if self.turns is not None:
            self._preempted.append(request)
        self._enqueue(request)

    def _release_pin(self, request: SimRequest, *, running: bool) -> bool:
        return self.core is not None and self.core.release_for(
            request.program, request.priority, running=running, preempted=request.num_preemptions > 0,
            arrival_time=request.arrival_time)

    def _admit(self, budget: int) -> int:
        skipped = []
        while budget > 0 and self.waiting and len(self.running) < self.max_num_seqs:
            request = self.waiting[0][2]
            if self.core is not None and not self.core.may_start(request.request_id, request.prompt_tokens,
                                                                 request.arrival_time):
                skipped.append(heapq.heappop(self.waiting))
                continue
            limit = (request.total - 1) // self.block_size
            hits = self.pool.cached_prefix(request.stream.iter_keys(limit))
            loads = 0 if self.host is None else self.host.cached_prefix(
                request.stream.key(i) for i in range(hits, limit))
            start = (hits + loads) * self.block_size
            n = min(request.total - start, budget)
            need = -(-(start + n) // self.block_size) - hits
            # vLLM admits a waiting request only if its whole sequence fits, though it computes a chunk
            full = -(-request.total // self.block_size) - hits
            no_pins = self.book is None or not self.book.pins
            if no_pins and full > self.pool.num_free():
                break  # it cannot get its blocks: vLLM's scan stops here too
            keys = request.stream.keys(hits)
            if no_pins and full > self.pool.num_free() - sum(1 for k in keys if self.pool.ref[k] == 0):
                break  # referencing its hits takes them off the free queue
            self.pool.touch(keys)
            while full > self.pool.num_free() or not self.pool.take(need):
                if not self._release_pin(request, running=False):
                    self.pool.release(keys)
                    self.waiting.extend(skipped)
                    heapq.heapify(self.waiting)
                    return budget
            heapq.heappop(self.waiting)
            request.held, request.anonymous = keys, need
            if loads:
                loaded = request.stream.keys(hits + loads)[hits:]
                self.host.load(loaded, request.program)
                for key in loaded:
                    self.pool.fill(key)
                request.held, request.anonymous = keys + loaded, need - loads
                self.loaded_tokens += loads * self.block_size
                self.host_hit_tokens += loads * self.block_size
            request.computed = start
            if request.cached_tokens is None:
                request.cached_tokens = request.computed
            self.running.append(request)
            self.requests[request.request_id] = request
            if loads:  # as vLLM's connector: it waits out the step that copies, and computes from the next
                request.loading = True
            else:
                request.scheduled, budget = n, budget - n
                self.batch.append(request)
        for entry in skipped:
            heapq.heappush(self.waiting, entry)
        return budget

    def complete(self, now: float) -> list[SimRequest]:
        """The step's work is done at `now`: KV computed, tokens sampled. Returns requests that
        produced their first token or finished (check `first_token_at`, `done_at`)."""
        touched = []
        for request in self.batch:
            before = request.computed // self.block_size
            request.computed += request.scheduled
            request.scheduled = 0
            for i in range(before, request.computed // self.block_size):
                key = request.stream.key(i)
                self.pool.fill(key)
                request.anonymous -= 1
                request.held.append(key)
                if self.host is not None:
                    self.host.store(key, request.program)
            if request.computed < request.total:
                continue  # a prefill chunk
            request.generated += 1
            if request.generated == 1:
                request.first_token_at = now
                touched.append(request)
            if request.generated >= request.output_tokens:
                request.done_at = now
                self._finish(request)
                if request not in touched:
                    touched.append(request)
        self.batch = []
        for request in self.running:
            request.loading = False  # a load-back completes with its step
            if self.turns is not None:
                self.turns.enter(request.request_id, "between_steps", now)
        return touched

    def _finish(self, request: SimRequest) -> None:
        self.running.remove(request)
        if self.core is not None:
            self.core.finish(request.request_id, request.xargs, request.total, aborted=False,
                             free_request=lambda: self.pool.release(request.held, request.anonymous))
        else:
            self.pool.release(request.held, request.anonymous)
        self.requests.pop(request.request_id, None)
        request.held, request.anonymous = [], 0
        if self.turns is not None:
            self.turns.finish(request.request_id, request.generated, request.num_preemptions, aborted=False)

    def command(self, command: str, payload: dict) -> dict:
        """A control command from the front end, as the plugin's (engine/scheduler.py `command`)."""
        return self.core.command(command, payload, self._waiting)

    def check(self) -> None:
        """Invariants after a step: blocks conserved; every reference accounted for by a running
        request or a pin."""
        self.pool.check()
        refs: dict[BlockKey, int] = {}
        for request in self.running:
            for key in request.held:
                refs[key] = refs.get(key, 0) + 1
        if self.book is not None:
            for pin in self.book.pins.pins.values():
                for key in pin.blocks:
                    refs[key] = refs.get(key, 0) + 1
        assert all(self.pool.ref.get(k, 0) == n for k, n in refs.items()), "a reference without an owner"
        assert sum(1 for r in self.pool.ref.values() if r > 0) == len(refs), "a referenced block nobody holds"
        assert sum(r.anonymous for r in self.running) == self.pool.anonymous, "anonymous blocks out of step"
        assert self.host is None or len(self.host.blocks) <= self.host.num_blocks, "the host tier over its size"
