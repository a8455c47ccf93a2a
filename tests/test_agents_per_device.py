"""Agents per device (workloads/agents_per_device.py): a sweep's answer on a tiny simulated load, by hand."""

from __future__ import annotations

import pytest

from tests.test_sim import fleet, program
from workloads.agents_per_device import Point, Targets, alone_times, point, sustained


def sweep_point(concurrency: int, alone: dict, targets: Targets) -> Point:
    # three one-call programs of 100 new tokens (+ 12 of template) and 2 output tokens, 1 ms per step and per
    # prefill token: alone a call takes 1 + 112 ms to its first token, and one decode step more (114 ms)
    programs = [program(f"p{i}", 0.0, [(100, 2, 0.0)]) for i in range(3)]
    return point(concurrency, fleet("vllm").run(programs, concurrency), alone, targets)


def test_the_sweep_answer_by_hand():
    targets = Targets(ttft_p90_s=1.0, slowdown=2.0)
    alone = alone_times(fleet("vllm").run([program(f"p{i}", 0.0, [(100, 2, 0.0)]) for i in range(3)], 1))
    assert alone == {(f"p{i}", 0): pytest.approx(0.114) for i in range(3)}
    one, two, three = (sweep_point(c, alone, targets) for c in (1, 2, 3))
    assert one.mean_slowdown == pytest.approx(1.0) and one.ttft_p90_s == pytest.approx(0.113)
    # two at once: the engine steps as soon as p0 arrives, so p0 is prefilled alone (113 ms); p1's prefill
    # rides with p0's decode (226 ms); p2 starts when p0 ends, its prefill with p1's decode (339 ms), then
    # decodes alone (340 ms). Calls: 226, 339 and 114 ms; TTFTs 113, 226, 113 ms
    assert two.mean_slowdown == pytest.approx((0.226 + 0.339 + 0.114) / 3 / 0.114) and two.meets  # 1.985x
    assert two.ttft_p90_s == pytest.approx(0.113 + 0.8 * 0.113)
    # three at once: p0 alone (113 ms), then p1 and p2 together with p0's decode (1 + 224 ms), then their
    # decode: calls of 338, 339 and 339 ms, 2.97x alone
    assert three.mean_slowdown == pytest.approx((0.338 + 0.339 * 2) / 3 / 0.114) and three.ttft_p90_s == pytest.approx(0.338)
    assert not three.meets
    assert sustained([one, two, three]) == 2
    # a tighter TTFT target: two at once (p90 0.203 s) misses it
    tight = Targets(ttft_p90_s=0.2)
    assert sustained([sweep_point(c, alone, tight) for c in (1, 2, 3)]) == 1


def test_capacity_stops_at_the_first_miss_and_failed_calls_are_left_out():
    def p(c, meets):
        return Point(concurrency=c, calls=1, ttft_p90_s=0.1, mean_slowdown=1.0, meets=meets)

    assert sustained([p(4, True), p(1, True), p(2, False)]) == 1  # 4 meets again after 2 missed: not counted
    assert sustained([p(1, False)]) is None
    records = fleet("vllm").run([program("a", 0.0, [(50, 2, 0.0)]), program("b", 0.0, [(50, 2, 0.0)])], 1)
    records[1].error = "boom"
    result = point(1, records, alone_times(records), Targets(ttft_p90_s=1.0))
    assert (result.calls, result.left_out) == (1, 1)
