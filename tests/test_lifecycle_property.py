"""The program lifecycle under every interleaving, on the plain objects: the control plane (tracker,
predictor, TTL policy) linked to one engine's program book, with engine requests played as the
scheduler plugin plays them (arrive, start, leave, pin). A hypothesis state machine interleaves calls
that begin and end, arrive late at the engine, are aborted or disconnected; tool reports; program ends;
sub-agent spawns; idle expiry; calls after the end. After every step: no ended program is live in the
book, and no rank, pin or next use (the host tier's order) of one remains; a pin belongs to its
program's current life."""

from __future__ import annotations

import asyncio
import itertools

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from agentserve.options import SchedulerConfig
from agentserve.programs.book import ProgramBook
from agentserve.programs.control import ControlPlane
from agentserve.programs.fields import ProgramFields
from agentserve.programs.tracker import ProgramError, ProgramTracker
from agentserve.ttl.policy import FixedTTL
from agentserve.ttl.predictor import ToolDurationPredictor

PROGRAMS = ("a", "b", "c")
IDLE_S = 60.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Lifecycle(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.book = ProgramBook(SchedulerConfig(), total_blocks=64, block_size=32, max_model_len=4096,
                                clock=self.clock)
        self.loop = asyncio.new_event_loop()

        async def link(command: str, payload: dict) -> dict:
            self.book.command(command, payload)
            return self.book.stats()

        self.control = ControlPlane(ProgramTracker(IDLE_S, clock=self.clock), ToolDurationPredictor(),
                                    FixedTTL(30.0), link)
        self.ids = itertools.count()
        # request -> [fields, xargs, where]: "front" (not in the engine yet), "queued", "running"
        self.requests: dict[str, list] = {}
        self.lives: dict[str, object] = {}  # request -> the tracker's Program its call began
        self.pinned_by: dict[str, object] = {}  # program -> the Program whose request made its pin

    def run(self, awaitable):
        return self.loop.run_until_complete(awaitable)

    def teardown(self) -> None:
        self.loop.close()

    # ---- calls -----------------------------------------------------------------------------------
    @rule(program=st.sampled_from(PROGRAMS), parent=st.sampled_from((None, *PROGRAMS)), last=st.booleans(),
          ends=st.booleans(), tool=st.sampled_from((None, "bash")))
    def begin_call(self, program, parent, last, ends, tool):
        """A call arrives at the front end (a sub-agent's first call names its parent; a call may come
        after its program's end)."""
        parent = parent if parent != program else None
        if parent is not None and self.control.lineage_error(program, parent) is not None:
            return  # the middleware refuses it
        fields = ProgramFields(program_id=program, parent_program_id=parent, is_last_turn=last,
                               ends_program=ends and last, tool=tool)
        xargs = self.control.begin_call(fields, 100, 10)
        rid = f"r{next(self.ids)}"
        self.requests[rid] = [fields, xargs, "front"]
        self.lives[rid] = self.control.tracker.programs[program]

    def _pick(self, data, where: tuple[str, ...]) -> str | None:
        rids = sorted(r for r, v in self.requests.items() if v[2] in where)
        return data.draw(st.sampled_from(rids)) if rids else None

    @rule(data=st.data())
    def engine_arrival(self, data):
        """The engine gets the request (possibly after the program ended at the front end)."""
        rid = self._pick(data, ("front",))
        if rid is not None:
            fields, xargs, _ = self.requests[rid]
            self.book.arrive_request(rid, xargs, 100)
            self.requests[rid][2] = "queued"

    @rule(data=st.data())
    def engine_start(self, data):
        rid = self._pick(data, ("queued",))
        if rid is not None:
            fields, xargs, _ = self.requests[rid]
            self.book.started(rid, xargs["agentserve_program_id"], 0, 100, self.clock())
            self.requests[rid][2] = "running"

    @rule(data=st.data(), aborted=st.booleans())
    def call_ends(self, data, aborted):
        """A call finishes, or is aborted / its client disconnects (in the engine or before it got
        there); the front end then reports its end, the abort, and the program's end if the call said so."""
        rid = self._pick(data, ("front", "queued", "running"))
        if rid is None:
            return
        fields, xargs, where = self.requests.pop(rid)
        life = self.lives.pop(rid)
        if where != "front":
            _, ttl = self.book.leave_request(rid, xargs, 200, aborted=aborted)
            if ttl > 0 and self.book.pin(fields.program_id, [object() for _ in range(4)], ttl)[0]:
                self.pinned_by[fields.program_id] = life
        self.control.end_call(fields.program_id, 200, **self._life_kwargs(xargs))
        if aborted:
            self.run(self.control.abort_call(fields.program_id, **self._life_kwargs(xargs)))
        if fields.ends_program and not aborted:
            self._end(fields.program_id)

    @staticmethod
    def _life_kwargs(xargs: dict) -> dict:
        return {"life": xargs["agentserve_life"]} if "agentserve_life" in xargs else {}

    # ---- program events ----------------------------------------------------------------------------
    @rule(program=st.sampled_from(PROGRAMS), event=st.sampled_from(("start", "end")))
    def tool_event(self, program, event):
        try:
            self.control.tool_event(program, "bash", event, None)
        except ProgramError:
            pass  # unknown program, or an end without a start: a 4xx

    @rule(program=st.sampled_from(PROGRAMS))
    def end_program(self, program):
        self._end(program)

    def _end(self, program: str) -> None:
        try:
            self.run(self.control.end_program(program))
        except ProgramError:
            pass  # ended already (404)

    @rule(seconds=st.sampled_from((1.0, 31.0, IDLE_S + 1)))
    def time_passes(self, seconds):
        """Pins expire, idle programs are reaped (the control tick), the engine steps."""
        self.clock.now += seconds
        self.run(self.control.tick())
        self.book.expire(lambda: {v[1]["agentserve_program_id"] for v in self.requests.values() if v[2] == "queued"})

    @rule()
    def memory_pressure(self):
        self.book.release_for(None, 10**9, running=True, preempted=False, arrival_time=self.clock())

    # ---- invariants -------------------------------------------------------------------------------
    @invariant()
    def nothing_of_an_ended_program_remains(self):
        live = self.control.tracker.programs
        for program in PROGRAMS:
            if program in live:
                continue
            assert self.book.holds(program) == [], f"ended program {program} holds {self.book.holds(program)}"

    @invariant()
    def a_pin_belongs_to_its_programs_current_life(self):
        for program in self.book.pins.pins:
            assert self.pinned_by.get(program) is self.control.tracker.programs.get(program), program

    @invariant()
    def a_live_program_counts_the_calls_of_its_own_life(self):
        for program, p in self.control.tracker.programs.items():
            assert p.active_calls == sum(1 for life in self.lives.values() if life is p), program

    @precondition(lambda self: not self.requests)
    @invariant()
    def an_engine_without_requests_is_idle(self):
        assert self.book.idle


TestLifecycle = Lifecycle.TestCase
TestLifecycle.settings = settings(max_examples=2000, stateful_step_count=40, deadline=None,
                                  suppress_health_check=list(HealthCheck))
