"""The replay harness end to end on the tiny model: every policy, results.json against its schema,
and a plain OpenAI endpoint (the session's server) driven like a stock `vllm serve`."""

from __future__ import annotations

import msgspec
import pytest

from workloads import DEFAULT_TRACE
from workloads.plan import ReplayConfig
from agentserve.options import EngineSettings
from workloads.replay import EngineSetup, replay
from workloads.report import Results, gap_captured, table

pytestmark = pytest.mark.slow

# Three short programs: small enough for CI, long enough to pin (several turns with tool waits).
CFG = ReplayConfig(programs=3, rate=2.0, token_scale=0.1, time_scale=0.3, max_turns=3, seed=1)
SETUP = EngineSetup(engine=EngineSettings(model="tiny", kv_tokens=4096, max_model_len=2048))


def check_schema(out) -> Results:
    results = msgspec.json.decode((out / "results.json").read_bytes(), type=Results, strict=True)
    assert results.config["plan"]["programs"] == 3
    assert (out / "jct_cdf.png").stat().st_size > 1000 and (out / "timeline.png").stat().st_size > 1000
    return results


# every policy, and the ordered pin mode through a policy suffix
POLICIES = ["vllm", "continuum", "fixed+pin-mode=ordered+max-wait=0", "agentserve", "oracle"]


def test_replay_every_policy(tmp_path):
    results = replay(str(DEFAULT_TRACE), policies=POLICIES, cfg=CFG, setup=SETUP, out_dir=tmp_path,
                     progress=False, log=lambda *_: None)
    results = check_schema(tmp_path)
    assert list(results.policies) == POLICIES
    calls = results.config["plan"]["llm_calls"]
    for name, r in results.policies.items():
        assert r.programs_completed == 3 and r.programs_failed == 0, (name, r.errors)
        assert r.llm_calls == calls
        assert r.jct_p50 <= r.jct_p95 <= r.jct_p99 and r.ttft_p50 <= r.ttft_p99
        assert r.pins_outstanding_at_end == 0, name  # every program ended: no pin survives it
        assert r.preemptions is not None and 0 <= r.prefix_hit_rate <= 1
    assert results.policies["vllm"].pins_created == 0 and results.policies["oracle"].pins_created == 0
    assert results.policies["fixed+pin-mode=ordered+max-wait=0"].pins_created > 0  # a 2 s TTL pins every non-final turn
    # later turns reuse earlier ones: the oracle, which evicts nothing, hits the most
    assert results.policies["oracle"].prefix_hit_rate > 0.3
    text = table(results)
    assert "agentserve/vllm" in text and "agentserve/oracle" in text
    gain = gap_captured(results)  # None when the oracle is not faster than vllm (nothing to capture)
    assert (gain is None) == ("share of the achievable gain" not in text)


def test_replay_against_a_plain_openai_endpoint_in_two_rounds(server, tmp_path):
    replay(str(DEFAULT_TRACE), policies=[], cfg=CFG, setup=SETUP, out_dir=tmp_path,
           endpoints={"stock": server.base_url}, progress=False, rounds=2, log=lambda *_: None)
    results = check_schema(tmp_path)
    r = results.policies["stock"]
    assert r.programs_completed == 6 and r.pins_created == 0  # plain requests carry no program fields
    assert results.config["rounds"] == 2
    per_round = results.rounds["stock"]
    assert [x.programs_completed for x in per_round] == [3, 3]
    assert r.makespan == pytest.approx(sum(x.makespan for x in per_round))
    assert r.llm_calls == 2 * results.config["plan"]["llm_calls"]


def test_bad_policy_and_bad_trace_fail_before_any_server_starts(tmp_path):
    with pytest.raises(ValueError, match="unknown policy 'magic'"):
        replay(str(DEFAULT_TRACE), policies=["vllm", "magic"], cfg=CFG, setup=SETUP, out_dir=tmp_path)
    with pytest.raises(ValueError, match="bad policy option"):
        replay(str(DEFAULT_TRACE), policies=["agentserve+colour=red"], cfg=CFG, setup=SETUP, out_dir=tmp_path)
    with pytest.raises(ValueError, match="rounds must be at least 1"):
        replay(str(DEFAULT_TRACE), policies=["vllm"], cfg=CFG, setup=SETUP, out_dir=tmp_path, rounds=0)
    with pytest.raises(ValueError, match="takes no options"):
        replay(str(DEFAULT_TRACE), policies=["vllm+max-wait=1"], cfg=CFG, setup=SETUP, out_dir=tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        replay(str(bad), fmt="minisweagent", policies=["vllm"], cfg=CFG, setup=SETUP, out_dir=tmp_path)


def test_a_fork_join_workflow_replays_through_the_sdk(server):
    """A planner spawns two workers on the session's server (the SDK's spawn): every program of the
    workflow completes, each worker's first turn hits the planner's KV (their shared prefix), and no
    program of the workflow is left on the server after the join."""
    import asyncio
    import urllib.error
    import urllib.request

    from agentserve.engine.settings import resolve_model
    from workloads.driver import Driver
    from workloads.filler import Filler, single_token_words
    from workloads.formats import load_trace
    from workloads.plan import plan
    from workloads.report import summarize
    from workloads.tool_times import ToolTimeModel

    trace = load_trace(f"fanout:2:{DEFAULT_TRACE}")
    cfg = ReplayConfig(programs=1, rate=1.0, token_scale=0.1, time_scale=0.2, max_turns=3, seed=2)
    (workflow,) = plan(trace, cfg, ToolTimeModel.load(), 2048)
    filler = Filler(single_token_words(resolve_model("tiny")[0]))
    driver = Driver(server.base_url, "tiny", filler, client="agentserve", seed=cfg.seed)
    records = asyncio.run(driver.run([workflow]))
    assert [r.error for r in records] == [None, None, None]
    root, *workers = records
    assert root.parent is None and {w.parent for w in workers} == {workflow.id}
    assert {r.workflow for r in records} == {workflow.id} and len(root.turns) == 2
    planner_prompt = root.turns[0].prompt_tokens
    for w in workers:
        assert w.turns[0].prompt_tokens > planner_prompt
        assert w.turns[0].cached_tokens >= 16  # at least a block of the planner's prefix came from cache
    assert summarize(records, {}).workflows_completed == 1
    for r in records:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{server.base_url}/v1/programs/replay-{r.id}")
        assert e.value.code == 404  # ended


def test_replay_keeps_the_engine_turn_split_of_every_call(tmp_path):
    """`--turn-times`: each policy's engine (stock vLLM's scheduler and the plugin) times every call of
    the plan, and only those (the speed probe's are dropped); bench/turn_split.py reads them."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from turn_split import engine_split, load

    setup = msgspec.structs.replace(SETUP, engine=msgspec.structs.replace(SETUP.engine, turn_times=True))
    results = replay(str(DEFAULT_TRACE), policies=["vllm+offload", "agentserve"], cfg=CFG, setup=setup,
                     out_dir=tmp_path, progress=False, log=lambda *_: None)
    records, turns = load(tmp_path)
    for name in ("vllm+offload", "agentserve"):
        assert len(turns[name]) == results.config["plan"]["llm_calls"], name
        assert sorted(t.prompt_tokens for t in turns[name]) == sorted(
            t.prompt_tokens for r in records[name] for t in r.turns)
        assert all(t.prefill > 0 and not t.aborted for t in turns[name])
        assert all(t.decode_steps == t.output_tokens - 1 for t in turns[name] if not t.preemptions)
        split = engine_split(turns[name], records[name])
        assert split["calls"] == len(turns[name]) and split["front_end"] > 0  # the client sees more than the engine
    assert {t.program for t in turns["vllm+offload"]} == {None}  # plain OpenAI calls name no program
    assert all(t.program for t in turns["agentserve"])


@pytest.mark.parametrize("trace", ["coding:2", "workloads/data/tracelab_example.jsonl"])
def test_the_realistic_loads_replay_end_to_end(trace, tmp_path):
    """The coding-agent sessions (a shared system prompt, sub-agents) and TraceLab's rows (a compacted
    session continued as a new program) through stock vLLM, vllm+offload, agentserve and the oracle."""
    cfg = ReplayConfig(programs=3, rate=2.0, token_scale=0.01 if trace.startswith("coding") else 0.1,
                       time_scale=0.1, max_turns=6, seed=1)
    policies = ["vllm", "vllm+offload", "agentserve", "oracle"]
    replay(trace, policies=policies, cfg=cfg, setup=SETUP, out_dir=tmp_path, progress=False, log=lambda *_: None)
    results = msgspec.json.decode((tmp_path / "results.json").read_bytes(), type=Results, strict=True)
    planned = results.config["plan"]
    calls = planned["llm_calls"]
    assert calls >= 6
    for name in policies:
        r = results.policies[name]
        assert r.programs_failed == 0 and r.llm_calls == calls, (name, r.errors)
        assert r.programs_completed == planned["programs"] + planned["sub_programs"]
        assert r.prefix_hit_rate > 0  # later calls reuse earlier ones (and the coding sessions a shared prompt)
