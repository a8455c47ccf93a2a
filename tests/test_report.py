"""Replay results without a server: pooling rounds, per-round ratios, counters over rounds."""

from __future__ import annotations

from workloads.driver import ProgramRecord, TurnRecord
from workloads.replay import sum_counters
from workloads.report import Results, round_ratios, summarize, table


def program(pid: str, start: float, end: float, ttft: float, round_: int) -> ProgramRecord:
    turn = TurnRecord(sent=start, first_token=start + ttft, done=end, prompt_tokens=100, cached_tokens=50,
                      output_tokens=10)
    return ProgramRecord(pid, start, start, end, [turn], 0.0, round=round_)


def test_rounds_pool_turns_and_add_their_makespans():
    recs = [program("a", 0, 10, 1.0, 0), program("b", 2, 12, 2.0, 0), program("a", 0, 20, 3.0, 1)]
    r = summarize(recs, {"preemptions": 3})
    # each round's clock starts at 0: makespan is 12 s + 20 s, not the longest round's 20 s
    assert r.makespan == 32 and r.throughput == 3 / 32
    assert r.programs_completed == 3 and r.llm_calls == 3
    assert r.jct_mean == (10 + 10 + 20) / 3 and r.ttft_p50 == 2.0


def test_per_round_ratios_against_stock_vllm_show_the_spread():
    def one(jct: float, ttft: float, round_: int = 0):
        return summarize([program("a", 0, jct, ttft, round_)], {})

    rounds = {"vllm": [one(10, 1.0), one(20, 2.0)], "agentserve": [one(8, 1.5), one(18, 1.0)]}
    results = Results(config={}, policies={n: rs[0] for n, rs in rounds.items()}, rounds=rounds)
    (line,) = round_ratios(results)
    assert line == ("agentserve/vllm per round: mean JCT 0.800, 0.900; p95 JCT 0.800, 0.900; "
                    "p99 TTFT 1.500, 0.500")
    assert line in table(results)
    assert round_ratios(Results(config={}, policies={})) == []  # one round: nothing to add


def test_counters_add_up_over_rounds_and_unknown_stays_unknown():
    merged = sum_counters([{"preemptions": 2, "pins_created": 1, "counters": {"pins_created": 1}},
                           {"preemptions": None, "pins_created": 4, "counters": {"pins_created": 4, "x": 1}}])
    assert merged == {"preemptions": None, "pins_created": 5, "counters": {"pins_created": 5, "x": 1},
                      "speed_probe_s": None}
    assert sum_counters([{"preemptions": 1}, {"preemptions": 2}]) == {"preemptions": 3, "speed_probe_s": None}
    # the rounds' speed probes pool to their median
    assert sum_counters([{"speed_probe_s": x} for x in (1.0, 3.0, 2.0)])["speed_probe_s"] == 2.0


def test_an_ablation_compares_every_plugin_row_with_the_baseline_and_the_default():
    """Every plugin policy (fixed and agentserve variants alike) gets intervals against vllm+offload,
    and the default against each row; bench/ablation.py reads a row's ratio to the default from
    whichever order the replay compared them in."""
    import importlib.util
    from pathlib import Path

    from workloads.intervals import compare
    from workloads.report import comparisons

    names = ["vllm+offload", "agentserve", "agentserve+order=arrival", "fixed"]
    pairs = comparisons(names)
    assert {p for p in pairs if p[1] == "vllm+offload"} == {(n, "vllm+offload") for n in names[1:]}
    assert ("agentserve", "fixed") in pairs and ("fixed", "agentserve") not in pairs
    jct = {"vllm+offload": 10.0, "agentserve": 10.0, "agentserve+order=arrival": 12.0, "fixed": 8.0}
    records = {n: [program(f"p{i}", 0, jct[n] * (1 + 0.1 * k) + i, 1.0, k) for k in range(4) for i in range(3)]
               for n in names}
    spec = importlib.util.spec_from_file_location("ablation", Path(__file__).parents[1] / "bench" / "ablation.py")
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    results = Results(config={"elapsed_s": 60}, policies={n: summarize(records[n], {}) for n in names},
                      intervals=compare(records, {}, pairs))
    r, lo, hi = ablation.ratio(results.intervals, "fixed", "agentserve", "jct_mean")
    assert lo <= r <= hi and abs(r - 1 / ablation.ratio(results.intervals, "agentserve", "fixed", "jct_mean")[0]) < 1e-9
    text = ablation.table("ablation-test", results)
    assert "| agentserve as it is |" in text and "| order=arrival |" in text and "| fixed (defaults) |" in text
    assert len([line for line in text.splitlines() if line.startswith("| ") and "---" not in line]) == 1 + 3


def test_a_programs_time_splits_into_llm_tool_and_the_clients_own_calls():
    """bench/turn_split.py: the time between turns beyond the tool's is the client's own (the SDK's
    tool events); the parts add up to the JCT."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("turn_split", Path(__file__).parents[1] / "bench" / "turn_split.py")
    turn_split = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(turn_split)
    turns = [TurnRecord(sent=0.0, first_token=0.5, done=1.0, prompt_tokens=10, cached_tokens=0, output_tokens=5),
             TurnRecord(sent=3.25, first_token=3.5, done=4.0, prompt_tokens=20, cached_tokens=10, output_tokens=5)]
    p = ProgramRecord("a", 0.0, 0.0, 4.5, turns, 2.0)  # a 2 s tool between the turns, sent 0.25 s late
    s = turn_split.split(p)
    assert (s["llm"], s["ttft"], s["after_first_token"], s["between_turns"], s["after_last_turn"]) == (1.75, 0.75, 1.0,
                                                                                                    0.25, 0.5)
    assert s["llm"] + s["tool"] + s["between_turns"] + s["after_last_turn"] == s["jct"]
    assert turn_split.mean_split([p, ProgramRecord("b", 0.0, 0.0, 1.0, [], 0.0)])["jct"] == 4.5  # no turns: left out
