"""Intervals over rounds (workloads/intervals.py) on constructed results: a known ratio and spread
recovered, coverage with round effects, speed normalization, and the replay's alternating order."""

from __future__ import annotations

import math
import random

import pytest

from workloads.driver import ProgramRecord, TurnRecord
from workloads.intervals import (compare, coverage, ratio_intervals, run_sample, speed_factors, synthetic_runs,
                                 t975)
from workloads.replay import round_order


def _mean_jct(intervals):
    return next(i for i in intervals if i.metric == "jct_mean")


def test_the_bootstrap_recovers_a_known_ratio_and_a_known_spread():
    rng = random.Random(1)
    a, b = synthetic_runs(40, ratio=0.8, run_sd=0.1, program_sd=0.3, noise_sd=0.05, rng=rng)
    iv = _mean_jct(ratio_intervals(a, b, samples=1000))
    assert iv.rounds == 40 and iv.lo < 0.8 < iv.hi
    assert iv.ratio == pytest.approx(0.8, rel=0.06)
    # the spread of a round's log ratio is sqrt(2) x 0.1 (each run its own speed) and a little program
    # noise, so the 95 % half width over 40 rounds is about t(39) x 0.143 / sqrt(40) = 0.046
    expected = t975(39) * math.sqrt(2 * 0.1 ** 2 + 2 * 0.05 ** 2 / 16) / math.sqrt(40)
    assert iv.half_width == pytest.approx(expected, rel=0.3)
    # without round effects the same bootstrap is much narrower: the width comes from the rounds
    a0, b0 = synthetic_runs(40, ratio=0.8, run_sd=0.0, program_sd=0.3, noise_sd=0.05, rng=rng)
    assert _mean_jct(ratio_intervals(a0, b0, samples=1000)).half_width < expected / 3


def test_every_metric_is_recovered_and_one_round_has_no_interval():
    rng = random.Random(2)
    a, b = synthetic_runs(30, ratio=1.25, run_sd=0.05, rng=rng)
    by_metric = {i.metric: i for i in ratio_intervals(a, b, samples=500)}
    for m in ("jct_mean", "jct_p95", "ttft_p99"):
        assert by_metric[m].lo < 1.25 < by_metric[m].hi, m
    assert by_metric["throughput"].lo < 1 / 1.25 < by_metric["throughput"].hi  # makespan scales as the JCT
    one = ratio_intervals(a[:1], b[:1])
    assert all(i.lo is None and i.hi is None and i.rounds == 1 for i in one)


def test_the_t_interval_covers_with_few_rounds_where_percentiles_do_not():
    t_cov, _ = coverage(5, trials=80, samples=200, method="t", seed=3)
    p_cov, _ = coverage(5, trials=80, samples=200, method="percentile", seed=3)
    assert t_cov >= 0.88
    assert p_cov < t_cov


def test_mismatched_or_disjoint_rounds_are_refused():
    rng = random.Random(4)
    a, b = synthetic_runs(3, ratio=1.0, rng=rng)
    with pytest.raises(ValueError, match="same number"):
        ratio_intervals(a, b[:2])
    with pytest.raises(ValueError, match="unknown interval method"):
        ratio_intervals(a, b, method="bca")


def _record(pid: str, round_: int, llm_s: float, tool_s: float = 5.0, error: str | None = None) -> ProgramRecord:
    turns = [TurnRecord(sent=0.0, first_token=llm_s / 4, done=llm_s / 2, prompt_tokens=10, cached_tokens=0,
                        output_tokens=5),
             TurnRecord(sent=llm_s / 2 + tool_s, first_token=llm_s * 3 / 4 + tool_s, done=llm_s + tool_s,
                        prompt_tokens=10, cached_tokens=0, output_tokens=5)]
    return ProgramRecord(pid, 0.0, 0.0, llm_s + tool_s, turns, tool_s, error=error, round=round_)


def test_speed_normalization_is_a_no_op_on_identical_runs():
    records = {name: [_record(f"p{i}", k, 10.0 + i) for k in range(3) for i in range(4)]
               for name in ("agentserve", "vllm+offload")}
    probes = {name: [1.7, 1.7, 1.7] for name in records}
    assert speed_factors(probes) == {name: [1.0, 1.0, 1.0] for name in records}
    out = compare(records, probes, [("agentserve", "vllm+offload")])
    raw = [(i.metric, i.ratio, i.lo, i.hi) for i in out if not i.normalized]
    normalized = [(i.metric, i.ratio, i.lo, i.hi) for i in out if i.normalized]
    assert len(raw) == 5 and raw == normalized


def test_speed_normalization_takes_out_a_slow_spell_of_the_machine():
    # agentserve's round 2 ran on a machine half as fast: its LLM time doubled and so did its probe
    records = {"vllm+offload": [_record(f"p{i}", k, 10.0) for k in range(3) for i in range(4)],
               "agentserve": [_record(f"p{i}", k, 20.0 if k == 1 else 10.0) for k in range(3) for i in range(4)]}
    probes = {"vllm+offload": [1.0, 1.0, 1.0], "agentserve": [1.0, 2.0, 1.0]}
    out = {(i.metric, i.normalized): i for i in compare(records, probes, [("agentserve", "vllm+offload")])}
    assert out["jct_mean", False].ratio > 1.2
    assert out["jct_mean", True].ratio == pytest.approx(1.0)
    assert out["ttft_p99", True].ratio == pytest.approx(1.0)
    # a run without a probe: nothing is normalized
    assert not any(i.normalized for i in compare(records, {"agentserve": [1.0, None, 1.0]},
                                                 [("agentserve", "vllm+offload")]))


def test_a_run_sample_leaves_out_failed_programs_and_pairs_the_rest():
    run = run_sample([_record("p0", 0, 10.0), _record("p1", 0, 10.0, error="boom")])
    assert set(run.jct) == {"p0"} and run.completed == 1
    records = {"a": [_record("p0", 0, 10.0), _record("p1", 0, 30.0, error="boom")],
               "b": [_record("p0", 0, 10.0), _record("p1", 0, 10.0)]}
    (iv, *_) = compare(records, {}, [("a", "b")])
    assert iv.metric == "jct_mean" and iv.ratio == pytest.approx(1.0)  # p1 failed in a: not compared


def test_policies_alternate_their_order_round_by_round():
    runs = ["vllm+offload", "agentserve", "oracle"]
    assert [round_order(runs, k)[0] for k in range(4)] == ["vllm+offload", "oracle", "vllm+offload", "oracle"]
    assert round_order(runs, 1) == runs[::-1]
