"""A fleet of simulated replicas serving a replay plan: a discrete-event simulation, seeded and
deterministic (events at equal times run in the order they were scheduled).

The front end is agentserve's own `ControlPlane` (programs/control.py) with its tracker on the
simulated clock, called as the server calls it for what the replay's SDK client sends: `begin_call`
per turn (the TTL, the workflow, the predicted remaining work it returns go on the request), the
first token, the call's end, tool events with their measured durations, the program's end (its link
sends `end` to the replicas). Each replica runs a `SimEngine` with its own `ProgramBook`; the router
is one of routers.py. Stock vLLM and the oracle run without a control plane and without a book, as
the replay drives them (plain OpenAI requests). Programs
follow the replay plan (workloads/plan.py): a turn is sent when the previous one finished and its
tool call ended, a spawning turn's sub-programs start when it finishes and the next turn waits for
all of them, and a program ends (its pins released, its route forgotten) after its last turn. The
output is the replay's: one `ProgramRecord` per program, summarized by workloads/report.py.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from dataclasses import dataclass, field

import msgspec

from agentserve.engine.turn_ledger import TurnLedger
from agentserve.hosttier.owners import ChunkOwners
from agentserve.options import ProgramOptions
from agentserve.programs.book import ProgramBook
from agentserve.programs.control import ControlPlane
from agentserve.programs.queue_order import ProgramFCFS
from agentserve.programs.fields import XARG_REMAINING, ProgramFields, ToolRun
from agentserve.programs.tracker import ProgramTracker
from agentserve.sim.clairvoyant import Truth
from agentserve.sim.costs import CostModel
from agentserve.sim.engine import SimEngine, SimRequest, Stream
from agentserve.sim.host import HostTier
from agentserve.routing.routers import DEFAULT_ROUTER, sim_router
from agentserve.policies import get as get_policy, make_ttl
from agentserve.ttl.policy import OnlineBenefit
from agentserve.ttl.predictor import ToolDurationPredictor
from agentserve.ttl.reload import ReloadProfile
from workloads.driver import ProgramRecord, TurnRecord
from workloads.plan import TEMPLATE_TOKENS_PER_TURN, PlannedProgram

IDLE_TICK_S = 0.01  # an engine with waiting work but nothing it may run looks again this much later
MAX_IDLE_TICKS = 100_000  # ~1,000 simulated seconds of an engine that can run nothing: a stall, not a wait


@dataclass(frozen=True)
class FleetSetup:
    policy: str
    replicas: int
    kv_tokens: int  # per replica
    cost: CostModel
    router: str = DEFAULT_ROUTER
    block_size: int = 32
    max_num_seqs: int = 64
    max_batched_tokens: int = 8192
    options: ProgramOptions = field(default_factory=ProgramOptions)
    seed: int = 0
    check: bool = False  # assert the engines' invariants after every step (tests)
    turn_times: bool = False  # split each call's time in its engine by part (as `replay --turn-times`)

    @property
    def host_kv_tokens(self) -> int:
        """Each replica's host tier (0: none); the options carry it, resolved as the replay does."""
        return self.options.host.kv_tokens or 0


@dataclass(eq=False)
class _Run:
    """A program being simulated."""

    plan: PlannedProgram
    record: ProgramRecord
    stream: Stream
    workflow: str
    parent: _Run | None
    turn: int = 0
    context: int = 0  # tokens of its context so far (a sub-program starts with its parent's)
    waiting_for: int = 0  # sub-programs not ended (the join)
    tool: str = ""  # the tool call (or join) under way
    tool_started: float = 0.0
    tools_done: list[ToolRun] = field(default_factory=list)  # what the next call reports (as the SDK does)


class Fleet:
    def __init__(self, setup: FleetSetup):
        described = get_policy(setup.policy)
        self.setup = setup
        self.now = 0.0
        self.control: ControlPlane | None = None
        if described.plugin:
            o = setup.options
            predictor, benefit = ToolDurationPredictor(), OnlineBenefit()
            # the server measures this curve on its engine at start-up; here the cost model is the engine
            sizes = (256, 1024, 4096, 16384)
            reload = ReloadProfile.fit([(n, setup.cost.prefill_s(n)) for n in sizes])
            host = ReloadProfile.fit([(n, setup.cost.load_s(n)) for n in sizes]) if setup.host_kv_tokens else None
            policy = make_ttl(setup.policy, predictor=predictor, reload=reload, benefit=benefit,
                              fixed_ttl_s=o.fixed_ttl_s, max_ttl_s=o.max_ttl_s, host=host,
                              host_tokens=setup.host_kv_tokens)
            self.control = ControlPlane(ProgramTracker(o.idle_timeout_s, clock=lambda: self.now), predictor, policy,
                                        self._link, benefit)
        self.truth = Truth(self.control.policy, self.control.remaining.call_s, setup.cost.call_s) \
            if described.clairvoyant else None
        kv_tokens = setup.kv_tokens if not described.unbounded_kv else 1 << 40
        blocks = -(-kv_tokens // setup.block_size)
        self.engines = [self._engine(f"r{i}", blocks) for i in range(setup.replicas)]
        self.router = sim_router(setup.router, setup.seed)
        self._events: list[tuple[float, int, str, object]] = []
        self._seq = itertools.count()
        self._stepping: set[str] = set()
        self._idle_ticks: dict[str, int] = {}
        self._ids = itertools.count()
        self.records: list[ProgramRecord] = []
        self._queued: list[PlannedProgram] = []  # concurrency mode: programs not started yet, last first
        self.events_run = 0

    def _engine(self, name: str, blocks: int) -> SimEngine:
        s = self.setup
        book = None
        if self.control is not None:
            book = ProgramBook(s.options.scheduler_config(), total_blocks=blocks, block_size=s.block_size,
                               max_model_len=s.kv_tokens, clock=lambda: self.now)
        host = None
        if s.host_kv_tokens:  # next-use orders by the book's predictions: with the plugin only, as the server
            next_use = (s.options.host.policy == "next-use" or self.truth is not None) and book is not None
            host = HostTier(s.host_kv_tokens // s.block_size, ChunkOwners(book.next_use) if next_use else None)
        engine = SimEngine(name, num_blocks=blocks, block_size=s.block_size, max_num_seqs=s.max_num_seqs,
                           max_batched_tokens=s.max_batched_tokens, cost=s.cost, book=book, host=host,
                           turns=TurnLedger(lambda: self.now, max_finished=None) if s.turn_times else None)
        if self.truth is not None:  # the device evicts by true next use too (a shared prefix: needed now)
            book.admission = self.truth.gate(book.admission)
            engine.pool.next_use = lambda owner: 0.0 if owner.startswith("shared:") else book.next_use.seconds_until(owner)
        if book is not None:
            engine.order = ProgramFCFS(book, lambda r: r.program, lambda r: r.remaining_s)
            engine.priority_preemption = s.options.vllm_scheduling == "priority"
        return engine

    # ---- the event loop --------------------------------------------------------------------------
    def run(self, programs: list[PlannedProgram], concurrency: int | None = None) -> list[ProgramRecord]:
        """Simulate `programs`: at their planned arrivals, or `concurrency` at a time (a program starts
        when one ends, in plan order, as the replay's driver runs them)."""
        if concurrency:
            self._queued = list(reversed(programs))
            for _ in range(min(concurrency, len(programs))):
                self._at(0.0, "start", (self._queued.pop(), None))
        else:
            for p in programs:
                self._at(p.arrival_s, "start", (p, None))
        while self._events:
            self.now, _, kind, payload = heapq.heappop(self._events)
            self.events_run += 1
            if kind == "start":
                self._start(*payload)
            elif kind == "tool_end":
                self._tool_end(payload)
            elif kind == "step":
                self._step_done(payload)
            elif kind == "kick":
                self._kick(payload)
            elif kind == "arrive":
                self._arrive(*payload)
        return self.records

    def _at(self, t: float, kind: str, payload) -> None:
        heapq.heappush(self._events, (t, next(self._seq), kind, payload))

    def _start(self, plan: PlannedProgram, parent: _Run | None) -> None:
        record = ProgramRecord(id=plan.id, planned_arrival=plan.arrival_s, start=self.now, end=self.now, turns=[],
                               tool_wait_s=0.0, workflow=parent.workflow if parent else plan.id,
                               parent=parent.plan.id if parent else None)
        bs = self.setup.block_size
        shared = (plan.shared.name, plan.shared.tokens) if plan.shared is not None else None
        stream = Stream(plan.id, bs, parent.stream, parent.context) if parent else Stream(plan.id, bs, shared=shared)
        run = _Run(plan, record, stream, record.workflow, parent, context=parent.context if parent else 0)
        if self.truth is not None:
            self.truth.started(plan, run.context)
        self.records.append(record)
        self._send(run)

    def _send(self, run: _Run) -> None:
        turn = run.plan.turns[run.turn]
        prompt = run.context + turn.new_tokens + TEMPLATE_TOKENS_PER_TURN
        last = run.turn == len(run.plan.turns) - 1
        parent = run.parent.plan.id if run.parent else None
        if prompt + turn.output_tokens > self.setup.kv_tokens:
            raise ValueError(f"program {run.plan.id} turn {run.turn} needs {prompt + turn.output_tokens} tokens of "
                             f"KV, more than a replica's {self.setup.kv_tokens}: plan with max_context = kv_tokens")
        request = SimRequest(f"q{next(self._ids)}", run.plan.id if self.control else None, run.stream, prompt,
                             turn.output_tokens, self.now)
        if self.control is not None:
            xargs = self.control.begin_call(ProgramFields(
                program_id=run.plan.id, turn=run.turn, is_last_turn=last, ends_program=last, tool=turn.tool,
                parent_program_id=parent if run.turn == 0 else None, tools_done=run.tools_done or None),
                prompt, turn.output_tokens)
            run.tools_done = []
            if self.truth is not None:
                self.truth.amend(xargs, run.plan, run.turn, prompt + turn.output_tokens)
            request.xargs = xargs  # as the engine request carries them
            request.remaining_s = float(xargs.get(XARG_REMAINING, 0.0))
        request.owner = run
        run.record.turns.append(TurnRecord(sent=self.now, first_token=self.now, done=self.now, prompt_tokens=prompt,
                                           cached_tokens=None, output_tokens=turn.output_tokens))
        engine = self.router.pick(request, self.engines)
        if self.setup.cost.call_s > 0:  # the front end's time: the request reaches the engine later
            self._at(self.now + self.setup.cost.call_s, "arrive", (engine, request))
        else:
            self._arrive(engine, request)

    def _arrive(self, engine: SimEngine, request: SimRequest) -> None:
        engine.add(request)
        self._kick(engine)

    def _kick(self, engine: SimEngine) -> None:
        if engine.name in self._stepping or not engine.busy():
            return
        dt = engine.schedule(self.now)
        if not engine.batch and not engine.loaded_tokens:  # everything waits (admission, memory): look again shortly
            ticks = self._idle_ticks[engine.name] = self._idle_ticks.get(engine.name, 0) + 1
            if ticks > MAX_IDLE_TICKS:
                raise RuntimeError(f"replica {engine.name} stalled at t={self.now:.1f} s: {len(engine.waiting)} "
                                   f"waiting, {len(engine.running)} running, {engine.pool.num_free()} free blocks")
            self._at(self.now + IDLE_TICK_S, "kick", engine)
            return
        self._idle_ticks[engine.name] = 0
        self._stepping.add(engine.name)
        self._at(self.now + dt, "step", engine)

    def _step_done(self, engine: SimEngine) -> None:
        self._stepping.discard(engine.name)
        for request in engine.complete(self.now):
            run: _Run = request.owner
            record = run.record.turns[-1]
            if request.first_token_at == self.now:
                record.first_token = self.now
                record.cached_tokens = request.cached_tokens
                if self.control is not None:
                    self.control.first_token(run.plan.id, run.turn, self.now - record.sent, request.prompt_tokens,
                                             request.cached_tokens)
            if request.done_at is not None:
                record.done = self.now
                self._turn_done(run, request, engine)
        if self.setup.check:
            engine.check()
        self._kick(engine)

    def _turn_done(self, run: _Run, request: SimRequest, engine: SimEngine) -> None:
        turn = run.plan.turns[run.turn]
        run.context = request.prompt_tokens + turn.output_tokens
        if self.control is not None:
            self.control.end_call(run.plan.id, run.context)
        run.turn += 1
        if run.turn == len(run.plan.turns):
            self._end(run)
            return
        run.tool, run.tool_started = turn.tool or ("join" if turn.spawn else "tool"), self.now
        if turn.spawn:
            run.waiting_for = len(turn.spawn)
            for sub in turn.spawn:
                self._start(sub, run)
            return
        run.record.tool_wait_s += turn.tool_s
        self._at(self.now + turn.tool_s, "tool_end", run)

    def _tool_end(self, run: _Run) -> None:
        """The program's tool call (or its join) ended: its next turn goes out and reports it (the
        SDK's `tools_done`: no call of its own between turns)."""
        run.tools_done.append(ToolRun(run.tool, self.now - run.tool_started))
        self._send(run)

    def _end(self, run: _Run) -> None:
        """The last call ended, and the program with it (the SDK's `end=True`); the client goes on:
        the next queued program starts, a parent's join counts it."""
        if self.control is not None:
            completed(self.control.end_program(run.plan.id))  # its link ends it on the replicas
        self.router.end(run.plan.id)
        run.record.end = self.now
        parent = run.parent
        if parent is None and self._queued:
            self._start(self._queued.pop(), None)
        if parent is not None:
            parent.waiting_for -= 1
            if parent.waiting_for == 0:
                parent.record.tool_wait_s += self.now - parent.tool_started
                self._tool_end(parent)

    async def _link(self, command: str, payload: dict) -> dict:
        """The control plane's engine link: a command reaches every replica's book at once."""
        for engine in self.engines:
            if engine.core is not None:
                engine.command(command, payload)
            self._kick(engine)
        return {}

    # ---- what the replay reads from a server -----------------------------------------------------
    def turn_times(self) -> list[dict]:
        """Every finished request's time in its engine by part (engine/turn_ledger.py), as a real
        engine's `--turn-times` reports it."""
        return [msgspec.to_builtins(t) for engine in self.engines if engine.turns for t in engine.turns.take()]

    def server_stats(self) -> dict:
        counters: Counter[str] = Counter()
        pins = 0
        for engine in self.engines:
            if engine.book is not None:
                counters.update(engine.book.counters)
                if engine.book.admission is not None:
                    counters.update({f"admission_{k}": v for k, v in engine.book.admission.counters.items()})
                pins += len(engine.book.pins)
        stats = {"preemptions": sum(e.preemptions for e in self.engines), "pins_created": counters["pins_created"],
                 "pins_outstanding": pins, "counters": dict(counters)}
        if self.setup.host_kv_tokens:
            stats["host_hit_tokens"] = sum(e.host_hit_tokens for e in self.engines)
        return stats


def completed(coroutine):
    """Run a coroutine that never waits (the control plane's async calls over this synchronous link)."""
    try:
        coroutine.send(None)
    except StopIteration as stop:
        return stop.value
    coroutine.close()
    raise RuntimeError("a control-plane call waited on something the simulator does not provide")
