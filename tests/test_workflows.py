"""Multi-agent workflows driving scheduling, without an engine (fake clocks): the program forest's
workflow and depth, refused lineages, workflow ranks, least attained service, the critical-path queue
order, the remaining-work prediction, the join's TTL, and no state outliving its workflow."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from hypothesis import given, settings, strategies as st

from agentserve.engine.program_queue import ProgramQueue
from agentserve.programs.queue_order import ProgramFCFS
from agentserve.options import SchedulerConfig
from agentserve.programs.book import ProgramBook
from agentserve.programs.control import ControlPlane
from agentserve.programs.fields import (JOIN_TOOL, XARG_DEPTH, XARG_NEXT_USE, XARG_REMAINING, XARG_TTL,
                                       XARG_WORKFLOW, ProgramFields)
from agentserve.programs.remaining import DEFAULT_CALL_S, MIN_HISTORY, RemainingWork
from agentserve.programs.tracker import ProgramError, ProgramTracker
from agentserve.server.middleware import Incoming, apply, rewriters
from agentserve.ttl.policy import DEFAULT_TOOL_MEAN_S, CostBenefitTTL, OnlineBenefit
from agentserve.ttl.predictor import ToolDurationPredictor
from agentserve.ttl.reload import ReloadProfile


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def book(order: str, clock: Clock | None = None, **config) -> ProgramBook:
    return ProgramBook(SchedulerConfig(order=order, **config), total_blocks=100, block_size=32, max_model_len=4096,
                       clock=clock or Clock())


# ---- the program forest ---------------------------------------------------------------------------

def test_sub_agents_belong_to_their_roots_workflow_at_their_depth():
    t = ProgramTracker()
    t.llm_start("root")
    t.llm_start("a", parent="root")
    t.llm_start("a1", parent="a")
    assert [(t.programs[p].workflow, t.programs[p].depth) for p in ("root", "a", "a1")] == \
        [("root", 0), ("root", 1), ("root", 2)]
    assert t.programs["root"].children == {"a"} and t.programs["a"].children == {"a1"}
    t.llm_start("a", parent="root")  # a retried first call names the same parent: fine
    t.llm_start("a1")  # later calls need not name it


@pytest.mark.parametrize("program, parent, status", [
    ("c", "nobody", 404),  # never started
    ("c", "gone", 404),  # ended
    ("c", "c", 409),  # its own parent
    ("a", "b", 409),  # a second parent (b is a's child: this would be a cycle)
])
def test_a_bad_lineage_is_refused_and_changes_nothing(program, parent, status):
    t = ProgramTracker()
    for pid, up in (("root", None), ("a", "root"), ("b", "a"), ("gone", None)):
        t.llm_start(pid, parent=up)
    t.end("gone")
    before = {p: (q.parent, q.llm_calls, set(q.children)) for p, q in t.programs.items()}
    assert t.lineage_error(program, parent)[0] == status
    with pytest.raises(ProgramError) as e:
        t.llm_start(program, parent=parent)
    assert e.value.status == status
    assert {p: (q.parent, q.llm_calls, set(q.children)) for p, q in t.programs.items()} == before


def test_the_middleware_refuses_a_bad_parent_before_vllm_sees_the_request():
    t = ProgramTracker()
    t.llm_start("root")
    steps = rewriters("/v1/chat/completions", lineage_error=t.lineage_error)

    def send(program, parent):
        body = ('{"model": "m", "messages": [], "agentserve": {"program_id": "%s", "parent_program_id": "%s"}}'
                % (program, parent)).encode()
        return apply(Incoming.decode(body), steps)

    assert send("child", "root") is None
    error = send("child", "ghost")
    assert error.status_code == 404 and b"parent program 'ghost' is unknown" in error.body
    assert send("root", "root").status_code == 409


# ---- ranks by workflow, least attained service ------------------------------------------------------

def test_a_sub_agent_keeps_its_roots_rank_under_workflow_orders_and_not_under_program_order():
    for order in ("workflow", "critical-path", "las"):
        b = book(order)
        b.arrive("r0", "R", 100, workflow="R")
        b.arrive("l0", "L", 100, workflow="L")  # a later workflow
        assert b.arrive("c0", "C", 100, workflow="R") == b.rank("R") == b.rank("C")
        assert b.rank("C") < b.rank("L") or order == "las"
    b = book("program")
    b.arrive("r0", "R", 100, workflow="R")
    b.arrive("l0", "L", 100, workflow="L")
    assert b.arrive("c0", "C", 100, workflow="R") > b.rank("L")  # a new, later program


def test_las_ranks_by_the_workflows_attained_service_at_arrival():
    b = book("las")
    assert b.arrive("r0", "R", 100, workflow="R") == 0
    b.leave("r0", "R", 150, aborted=False, is_last=False, ttl_s=0, computed_tokens=150)
    assert b.arrive("n0", "N", 100, workflow="N") == 0  # a new workflow has attained nothing: first
    assert b.arrive("c0", "C", 100, workflow="R") == 150  # R's child carries R's service
    b.leave("c0", "C", 300, aborted=False, is_last=True, ttl_s=0, computed_tokens=200)
    assert b.arrive("r1", "R", 400, workflow="R") == 350


def test_a_workflows_rank_lasts_until_its_last_program_ends_and_nothing_outlives_it():
    b = book("critical-path")
    b.arrive("r0", "R", 10, workflow="R")
    b.arrive("c0", "C", 10, workflow="R")
    rank = b.rank("R")
    b.end("R")  # the root ends first (a detached child): the child keeps the rank
    assert b.rank("C") == rank
    b.leave("r0", "R", 10, aborted=False, is_last=True, ttl_s=0)
    b.leave("c0", "C", 10, aborted=False, is_last=True, ttl_s=0)
    b.end("C")
    assert not (b._ranks or b._key or b._members or b._service or b._size) and b.idle


def test_a_parents_pin_outlives_its_ttl_while_a_sub_agent_is_live_and_still_yields_to_pressure():
    """The parent's context is the prefix its sub-agents fork from: its join pin does not expire while
    any sub-agent is live; it expires at the first tick after the last one ends."""
    clock = Clock()
    b = book("critical-path", clock)
    b.arrive("r0", "R", 64, workflow="R")
    b.leave("r0", "R", 64, aborted=False, is_last=False, ttl_s=2.0, computed_tokens=64)
    assert b.pin("R", [1, 2], 2.0)[0]
    for child in ("A", "B"):
        b.arrive(f"{child}0", child, 64, workflow="R", parent="R")
        b.leave(f"{child}0", child, 64, aborted=False, is_last=False, ttl_s=0, computed_tokens=64)
    clock.now += 10
    assert b.expire(lambda: ()) == [] and "R" in b.pins
    assert b.counters["pins_held_for_sub_agents"] == 1
    b.expire(lambda: ())
    assert b.counters["pins_held_for_sub_agents"] == 1  # counted once per pin
    b.end("A")
    assert b.expire(lambda: ()) == []  # B still reads the prefix
    b.end("B")
    assert [r.reason for r in b.expire(lambda: ())] == ["expired"]
    # under pressure it goes as any pin does
    b.arrive("r1", "R", 64, workflow="R")
    b.leave("r1", "R", 64, aborted=False, is_last=False, ttl_s=2.0, computed_tokens=64)
    b.pin("R", [3], 2.0)
    b.arrive("C0", "C", 64, workflow="R", parent="R")
    assert b.release_for("C", b.rank("C"), running=True, preempted=False, arrival_time=clock.now).reason == "pressure"
    assert "R" not in b.pins


def test_admission_weighs_a_workflow_by_its_expected_size_and_never_holds_its_sub_agents():
    from agentserve.options import AdmissionOptions

    clock = Clock()
    # budget 100 blocks x 32 = 3200 tokens, half of it admits: 1600; every program's footprint >= 400
    b = book("critical-path", clock, admission=AdmissionOptions(mode="on", share=0.5, default_peak_share=400 / 4096))
    assert b.expected_workflow_size == 1.0
    assert b.arrive("r0", "R", 400, workflow="R") == 0 and b.may_start("r0", 400, clock.now)
    for k in range(3):  # R's three sub-agents join its admission without a check
        b.arrive(f"c{k}", f"R.{k}", 400, workflow="R")
        assert b.may_start(f"c{k}", 400, clock.now)
    assert b.admission.counters["joined_workflow"] == 3 and b.admission.load == 1600  # all four count
    for p, rid in (("R.0", "c0"), ("R.1", "c1"), ("R.2", "c2"), ("R", "r0")):
        b.leave(rid, p, 400, aborted=False, is_last=True, ttl_s=0)
        b.end(p)
    assert b.expected_workflow_size == 4.0  # the workflow that ended had four programs
    b.arrive("x0", "X", 400, workflow="X")  # a single program, alone: admitted (nothing else is)
    assert b.may_start("x0", 400, clock.now)
    b.arrive("y0", "Y", 400, workflow="Y")  # 400 + 4 x 400 > 1600: a workflow of the expected size won't fit
    assert not b.may_start("y0", 400, clock.now)
    assert b.counters["admission_held"] == 1


@dataclass
class Waiting:
    name: str
    program: str
    priority: int
    arrival_time: float
    remaining: float = 0.0
    num_preemptions: int = 0


def test_critical_path_serves_a_workflows_longest_sub_agent_first_and_keeps_the_wait_bound():
    clock = Clock()
    for order, expected in (("critical-path", ["overdue", "long", "mid", "short", "later-workflow"]),
                            ("workflow", ["overdue", "short", "mid", "long", "later-workflow"])):
        b = book(order, clock, max_wait_s=0.5)
        queue = ProgramQueue(ProgramFCFS(b, lambda r: r.program, lambda r: r.remaining))
        now = clock.now
        for w in (Waiting("short", "a", 1, now - 0.3, remaining=2.0), Waiting("mid", "b", 1, now - 0.2, remaining=5.0),
                  Waiting("long", "c", 1, now - 0.1, remaining=9.0),
                  Waiting("later-workflow", "d", 2, now - 0.4, remaining=50.0),
                  Waiting("overdue", "e", 3, now - 1.0, remaining=0.0)):
            queue.add_request(w)
        assert [w.name for w in queue] == expected, order


def test_srpt_serves_the_least_remaining_work_first_across_workflows():
    clock = Clock()
    b = book("srpt", clock, max_wait_s=0.5)
    queue = ProgramQueue(ProgramFCFS(b, lambda r: r.program, lambda r: r.remaining))
    now = clock.now
    for w in (Waiting("early-long", "a", 1, now - 0.3, remaining=9.0), Waiting("late-short", "d", 2, now - 0.1, remaining=1.0),
              Waiting("overdue", "e", 3, now - 1.0, remaining=99.0)):
        queue.add_request(w)
    assert [w.name for w in queue] == ["overdue", "late-short", "early-long"]


# ---- remaining work and the join -----------------------------------------------------------------

def test_remaining_calls_are_the_conditional_mean_of_finished_programs():
    r = RemainingWork()
    assert r.calls_left(1, 0) == 1.0 and r.call_s() == DEFAULT_CALL_S  # no history
    for n in (2, 4, 10):
        r.observe_program(0, n)  # too few at depth 0 and none at depth 1: all depths are used
    assert r.calls_left(1, 0) == pytest.approx((2 + 4 + 10) / 3)
    assert r.calls_left(1, 3) == pytest.approx((1 + 7) / 2)  # only programs longer than 3 calls
    assert r.calls_left(1, 10) == 1.0  # longer than anything seen: one more
    for _ in range(MIN_HISTORY):
        r.observe_program(1, 3)
    assert r.calls_left(1, 0) == 3.0  # enough history at depth 1: its own
    r.observe_call(0.5)
    r.observe_call(1.5)
    assert r.seconds(1, 1, tool_s=2.0) == pytest.approx(2.0 * (1.0 + 2.0))


def control_plane(policy=None, link=None) -> ControlPlane:
    return ControlPlane(ProgramTracker(), ToolDurationPredictor(), policy, link)


async def _link(command, payload):
    return {"pins": 0, "counters": {}, "events": []}


def test_every_call_carries_its_workflow_depth_and_remaining_work():
    c = control_plane()
    root = c.begin_call(ProgramFields(program_id="root", tool=JOIN_TOOL), 100, 10)
    child = c.begin_call(ProgramFields(program_id="w", parent_program_id="root"), 100, 10)
    assert (root[XARG_WORKFLOW], root[XARG_DEPTH]) == ("root", 0)
    assert (child[XARG_WORKFLOW], child[XARG_DEPTH]) == ("root", 1) and child[XARG_REMAINING] > 0
    for n in (3, 3, 9):
        c.remaining.observe_program(1, n)
    c.end_call("w", 110)
    later = c.begin_call(ProgramFields(program_id="w"), 120, 10)  # its second call: fewer calls left
    assert later[XARG_REMAINING] < c.begin_call(ProgramFields(program_id="v", parent_program_id="root"), 100,
                                                10)[XARG_REMAINING]
    view = c.describe("root")
    assert view["workflow"] == "root" and view["depth"] == 0 and view["critical_path"][0] == "root"
    assert view["critical_path"][1] == "v"  # the sibling with more calls left


def test_an_llm_calls_time_feeds_the_remaining_work_prediction():
    clock = Clock()
    c = ControlPlane(ProgramTracker(clock=clock), ToolDurationPredictor(), None, None)
    c.begin_call(ProgramFields(program_id="p"), 100, 10)
    clock.now += 2.5
    c.end_call("p", 110)
    assert c.remaining.call_s() == pytest.approx(2.5)


def test_a_join_is_pinned_for_its_children_predicted_work_not_a_shell_tools_cold_start():
    reload = ReloadProfile(a=0.0, b=0.01, c=0.0, max_tokens=8192)  # 10 ms per token: a costly miss
    c = control_plane(CostBenefitTTL(ToolDurationPredictor(), reload, OnlineBenefit()), _link)
    for _ in range(MIN_HISTORY):
        c.remaining.observe_program(1, 4)
    for _ in range(4):
        c.remaining.observe_call(1.0)
    xargs = c.begin_call(ProgramFields(program_id="root", tool=JOIN_TOOL), 900, 100)
    expected = 4 * (1.0 + 0.0)  # four calls of a child, 1 s each, no tool history yet
    gain = reload.seconds(1000)
    assert xargs[XARG_NEXT_USE] == pytest.approx(expected)
    assert xargs[XARG_TTL] == pytest.approx(expected * __import__("math").log(gain / expected))
    shell = c.begin_call(ProgramFields(program_id="other", tool="bash"), 900, 100)
    assert shell[XARG_TTL] == pytest.approx(DEFAULT_TOOL_MEAN_S * __import__("math").log(gain / DEFAULT_TOOL_MEAN_S))


# ---- property: nothing outlives its workflow --------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.sampled_from(["call", "pin", "end"])),
                min_size=1, max_size=60),
       st.sampled_from(["program", "workflow", "critical-path", "las"]))
def test_no_rank_key_service_or_pin_outlives_its_workflow(events, order):
    """Random calls, pins and ends over 4 workflows of 4 programs each (program 0 the root); then every
    program ends. Nothing of any workflow is left, and no pin ever belongs to an ended program."""
    clock = Clock()
    b = book(order, clock)
    ended: set[str] = set()
    live: set[str] = set()
    seq = 0
    for wf, k, what in events:
        program, workflow = f"w{wf}.p{k}", f"w{wf}.p0"
        clock.now += 0.1
        if what == "end":
            if program in live and k % 2:  # a request still in the engine when its program ends, leaving after
                b.arrive(f"late{seq}", program, 64, workflow=workflow)
                b.end(program)
                b.leave(f"late{seq}", program, 64, aborted=True, is_last=False, ttl_s=0, computed_tokens=64)
            else:
                b.end(program)
            ended.add(program)
            live.discard(program)
            assert all(b.rank(p) is not None for p in live)  # ending one (even twice) keeps the others' ranks
            continue
        ended.discard(program)  # a program id that comes back is a new program
        live.add(program)
        seq += 1
        rid = f"r{seq}"
        b.arrive(rid, program, 64, workflow=workflow, parent=workflow if k else None)
        _, ttl = b.leave(rid, program, 64, aborted=False, is_last=False, ttl_s=5.0, computed_tokens=64)
        if what == "pin" and ttl > 0:
            b.pin(program, list(range(2)), ttl)
        b.expire(lambda: ())
        assert not any(p in b.pins for p in ended)
    for wf in range(4):
        for k in range(4):
            b.end(f"w{wf}.p{k}")
    assert not (b._ranks or b._key or b._members or b._service or b._size) and len(b.pins) == 0 and b.idle
    assert not (b._parent or b._sub_agents or b._held_for_sub_agents)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0, 100), min_size=1, max_size=80), st.sampled_from(["workflow", "critical-path", "las", "srpt"]))
def test_a_late_workflows_request_is_served_within_the_wait_bound_under_a_stream_of_earlier_ones(remaining, order):
    """Every tick an earlier workflow's sub-agent arrives (rank 0, any predicted remaining work) and one
    request is served. A later workflow's request (rank 9) still goes once it is overdue: the first
    overdue request, served first come first served."""
    clock = Clock()
    b = book(order, clock, max_wait_s=0.5)
    queue = ProgramQueue(ProgramFCFS(b, lambda r: r.program, lambda r: r.remaining))
    queue.add_request(Waiting("late", "L", 9, clock.now))
    served_at = None
    for tick, work in enumerate(remaining):
        clock.now += 0.1
        queue.add_request(Waiting(f"s{tick}", f"R.{tick}", 0, clock.now, remaining=work))
        queue.reorder()  # the scheduler re-keys when requests cross the bound
        if queue.pop_request().name == "late":
            served_at = tick
            break
    if served_at is None:
        assert len(remaining) <= 6  # never overdue within the run: 0.5 s is 5 ticks
    else:
        assert served_at <= 6
