"""Fork/join workflows in the replay: the schema's sub-programs, the fan-out adapter, the plan, the
workflow JCT of the report (no engine)."""

from __future__ import annotations

import msgspec
import pytest

from workloads import DEFAULT_TRACE
from workloads.adapters.fanout import HANDOFF_TOKENS, JOIN_TOOL, PLAN_TOKENS, TASK_SHARE
from workloads.driver import ProgramRecord, TurnRecord
from workloads.formats import load_trace
from workloads.plan import TEMPLATE_TOKENS_PER_TURN, ReplayConfig, plan
from workloads.report import Results, summarize, table
from workloads.schema import Program, Trace, TraceError, Turn
from workloads.tool_times import ToolTimeModel


def test_fanout_groups_consecutive_programs_into_planner_workers_reviewer():
    base = load_trace(DEFAULT_TRACE)
    trace = load_trace(f"fanout:4:{DEFAULT_TRACE}")
    assert len(trace.programs) == len(base.programs) // 4
    for i, wf in enumerate(trace.programs):
        workers = base.programs[4 * i:4 * i + 4]
        assert wf.check() is None and len(wf.subprograms) == 4
        plan_turn, review = wf.turns
        task = int(TASK_SHARE * min(w.turns[0].new_tokens for w in workers))
        assert plan_turn.new_tokens == task and plan_turn.output_tokens == PLAN_TOKENS
        assert plan_turn.tool == JOIN_TOOL and plan_turn.spawn == [s.id for s in wf.subprograms]
        assert review.new_tokens == sum(w.turns[-1].output_tokens for w in workers) + 4 * HANDOFF_TOKENS
        assert not review.spawn
        for sub, src in zip(wf.subprograms, workers):
            # the worker's own prompt is its original one minus the task it now shares with the planner
            assert sub.turns[0].new_tokens == max(1, src.turns[0].new_tokens - task)
            assert sub.turns[1:] == src.turns[1:] and sub.source == src.source


def test_fanout_waves_spawn_one_after_another_and_each_turn_reads_the_last_waves_answers():
    base = load_trace(DEFAULT_TRACE)
    trace = load_trace(f"fanout:2x3:{DEFAULT_TRACE}")
    assert trace.name.startswith("fanout2x3-") and len(trace.programs) == len(base.programs) // 6
    for i, wf in enumerate(trace.programs):
        src = base.programs[6 * i:6 * i + 6]
        assert wf.check() is None and len(wf.subprograms) == 6 and len(wf.turns) == 4
        waves = [wf.subprograms[0:2], wf.subprograms[2:4], wf.subprograms[4:6]]
        for turn, wave in zip(wf.turns, waves):
            assert turn.tool == JOIN_TOOL and turn.spawn == [s.id for s in wave]
        for turn, done in zip(wf.turns[1:], [src[0:2], src[2:4], src[4:6]]):
            assert turn.new_tokens == sum(w.turns[-1].output_tokens for w in done) + 2 * HANDOFF_TOKENS
        assert wf.turns[1].output_tokens == PLAN_TOKENS and not wf.turns[-1].spawn
    assert load_trace(f"fanout:4x1:{DEFAULT_TRACE}") == load_trace(f"fanout:4:{DEFAULT_TRACE}")


def test_fanout_rejects_bad_specs():
    for spec in ("fanout:x:bfcl:base", "fanout:4x:bfcl:base", "fanout:4xa:bfcl:base", "fanout:4x2"):
        with pytest.raises(TraceError, match="fanout:<K>:<trace>"):
            load_trace(spec)
    with pytest.raises(TraceError, match="fan-out and waves must be at least 1"):
        load_trace(f"fanout:0:{DEFAULT_TRACE}")
    with pytest.raises(TraceError, match="fan-out and waves must be at least 1"):
        load_trace(f"fanout:2x0:{DEFAULT_TRACE}")
    with pytest.raises(TraceError, match="needs at least 99"):
        load_trace(f"fanout:99:{DEFAULT_TRACE}")
    with pytest.raises(TraceError, match="needs at least 20"):
        load_trace(f"fanout:10x2:{DEFAULT_TRACE}")


def turn(spawn=()):
    return Turn(new_tokens=10, output_tokens=5, tool="t", spawn=list(spawn))


@pytest.mark.parametrize("program, problem", [
    (Program(id="a", turns=[turn(["b"]), turn()], subprograms=[]), "each must be spawned exactly once"),
    (Program(id="a", turns=[turn(), turn()], subprograms=[Program(id="b", turns=[turn()])]),
     "each must be spawned exactly once"),
    (Program(id="a", turns=[turn(), turn(["b"])], subprograms=[Program(id="b", turns=[turn()])]),
     "spawns on its last turn"),
    (Program(id="a", turns=[turn(["b", "b"]), turn()],
             subprograms=[Program(id="b", turns=[turn()]), Program(id="b", turns=[turn()])]), "two sub-programs"),
])
def test_a_malformed_dag_is_refused_with_its_reason(tmp_path, program, problem):
    assert problem in program.check()
    path = tmp_path / "t.json"
    path.write_bytes(msgspec.json.encode(Trace(name="t", programs=[program])))
    with pytest.raises(TraceError, match=problem):
        load_trace(path)


def test_native_trace_with_sub_programs_round_trips(tmp_path):
    trace = load_trace(f"fanout:2:{DEFAULT_TRACE}")
    path = tmp_path / "wf.json"
    path.write_bytes(msgspec.json.encode(trace))
    assert load_trace(path).programs == trace.programs


@pytest.mark.parametrize("max_context", [8192, 1500])
def test_plan_nests_sub_programs_with_the_parents_context_as_their_prefix(max_context):
    trace = load_trace(f"fanout:4:{DEFAULT_TRACE}")
    cfg = ReplayConfig(programs=3, rate=1.0, token_scale=0.25, max_turns=6, seed=1)
    planned = plan(trace, cfg, ToolTimeModel.load(), max_context)
    assert planned == plan(trace, cfg, ToolTimeModel.load(), max_context)
    if max_context < 8192:  # tight: the workers are cut, and only the prefix makes them need to be
        assert any(sub.cut_for_context for wf in planned for sub in wf.turns[0].spawn)
    for wf in planned:
        first, review = wf.turns
        assert len(first.spawn) == 4 and first.tool_s == 0 and not review.spawn and review.tool is None
        prefix = first.new_tokens + first.output_tokens + TEMPLATE_TOKENS_PER_TURN
        for sub in first.spawn:
            assert sub.arrival_s == wf.arrival_s and len(sub.turns) <= 6 and sub.turns[-1].tool_s == 0
            context = prefix + sum(t.new_tokens + t.output_tokens for t in sub.turns)
            assert context + TEMPLATE_TOKENS_PER_TURN * len(sub.turns) <= max_context
        assert len(list(wf.walk())) == 5


def test_plan_of_a_workflow_cut_at_its_spawn_drops_the_spawn():
    trace = load_trace(f"fanout:2:{DEFAULT_TRACE}")
    (wf,) = plan(Trace(name="t", programs=trace.programs[:1]), ReplayConfig(programs=1, rate=1.0, max_turns=1),
                 ToolTimeModel.load(), 8192)
    assert len(wf.turns) == 1 and not wf.turns[0].spawn and wf.cut_for_context


def record(pid, start, end, workflow, parent=None, error=None):
    t = TurnRecord(sent=start, first_token=start + 0.1, done=end, prompt_tokens=10, cached_tokens=0, output_tokens=1)
    return ProgramRecord(pid, start, start, end, [t], 0.0, error=error, workflow=workflow, parent=parent)


def test_workflow_jct_is_the_roots_and_a_failed_member_fails_its_workflow():
    recs = [record("w1", 0, 30, "w1"), record("w1.a", 1, 20, "w1", "w1"), record("w1.b", 1, 25, "w1", "w1"),
            record("w2", 5, 15, "w2"), record("w2.a", 6, 9, "w2", "w2", error="boom"),
            record("solo", 0, 7, "solo")]
    r = summarize(recs, {})
    assert r.workflows_completed == 1 and r.workflow_jct_mean == 30  # w2 had a failed member; solo spawned nothing
    assert r.programs_completed == 5 and r.programs_failed == 1
    text = table(Results(config={}, policies={"vllm": r, "agentserve": r}))
    assert "mean wf JCT s" in text and "mean workflow JCT 1.000" in text
    plain = summarize([record("solo", 0, 7, "solo")], {})
    assert plain.workflow_jct_mean is None and "wf JCT" not in table(Results(config={}, policies={"vllm": plain}))
