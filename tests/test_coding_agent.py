"""The coding-agent workload (`coding:<N>[:<seed>]`): its published distributions at a fixed seed, and
its shared system prompt in the plan, the replay driver's text and the simulator's blocks."""

from __future__ import annotations

import random
import statistics

import pytest

from agentserve.sim.engine import Stream
from tests.test_sim import UNIT, fleet
from workloads import coding_agent
from workloads.driver import Driver
from workloads.filler import FALLBACK_WORDS, Filler
from workloads.formats import load_trace
from workloads.plan import ReplayConfig, plan
from workloads.schema import TraceError
from workloads.tool_times import ToolTimeModel


@pytest.fixture(scope="module")
def sessions():
    return load_trace("coding:400:7").programs


def within(value: float, target: float, share: float = 0.10) -> bool:
    return abs(value - target) <= share * target


def test_medians_match_the_published_figures(sessions):
    calls = [t for p in sessions for q in p.walk() for t in q.turns]
    assert within(statistics.median(len(p.turns) for p in sessions), coding_agent.MEDIAN_TURNS)
    assert within(statistics.median(p.context_tokens for p in sessions), coding_agent.MEDIAN_CONTEXT)
    assert within(statistics.median(t.output_tokens for t in calls), coding_agent.MEDIAN_OUTPUT)
    gaps = [t.tool_s for t in calls if t.tool_s is not None]
    for upto, seconds in ((0.865, 1.0), (0.951, 10.0)):  # vLLM router #285's two points
        assert abs(sum(g < seconds for g in gaps) / len(gaps) - upto) < 0.02
    assert within(sum(bool(p.subprograms) for p in sessions) / len(sessions), coding_agent.SUBAGENT_SHARE)


def test_sessions_share_a_system_prompt_and_their_dags_are_valid(sessions):
    assert {p.shared.name for p in sessions} == {"coding-agent-system"}
    assert all(p.check() is None and p.turns[0].new_tokens > p.shared.tokens for p in sessions)
    assert load_trace("coding:5:1").programs == coding_agent.generate(5, 1).programs  # seeded
    assert load_trace("coding:5:1").programs != load_trace("coding:5:2").programs
    for bad in ("coding:0", "coding:x", "coding:3:y"):
        with pytest.raises(TraceError, match="want coding:<N>"):
            load_trace(bad)


def test_the_plan_scales_the_shared_prefix_and_the_driver_writes_it_once_for_all():
    cfg = ReplayConfig(programs=3, rate=1.0, token_scale=0.125, max_turns=4)
    planned = plan(load_trace("coding:3"), cfg, ToolTimeModel.load(), 32_768)
    assert {p.shared.tokens for p in planned} == {coding_agent.SYSTEM_TOKENS // 8}
    driver = Driver("http://unused", "bench", Filler(list(FALLBACK_WORDS)), client="openai", seed=3)
    firsts = [driver.input_text(p, 0, random.Random(p.id)) for p in planned]
    shared = [f.split()[: planned[0].shared.tokens] for f in firsts]
    assert shared[0] == shared[1] == shared[2]
    assert all(len(f.split()) == p.turns[0].new_tokens for f, p in zip(firsts, planned))
    assert len({" ".join(f.split()[planned[0].shared.tokens:]) for f in firsts}) == 3  # then each program's own


def test_the_simulator_hits_another_programs_system_prompt():
    a, b = Stream("a", 16, shared=("sys", 40)), Stream("b", 16, shared=("sys", 40))
    assert a.keys(4)[:2] == b.keys(4)[:2] and a.key(2) != b.key(2)  # two full blocks of the 40 tokens are shared
    cfg = ReplayConfig(programs=2, rate=0.001, token_scale=0.01, max_turns=2)  # the second arrives after the first
    planned = plan(load_trace("coding:2"), cfg, ToolTimeModel.load(), 4096)
    first, second = fleet("vllm", cost=UNIT, kv_tokens=8192).run(planned)
    shared_blocks = planned[1].shared.tokens // 32 * 32
    assert first.turns[0].cached_tokens == 0 and second.turns[0].cached_tokens == shared_blocks > 0
