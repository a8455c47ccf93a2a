"""The predictor's accuracy replay (agentserve/ttl/accuracy.py), by hand on a tiny sequence."""

from __future__ import annotations

import random

import pytest

from agentserve.ttl.accuracy import evaluate
from agentserve.ttl.predictor import ToolDurationPredictor


def test_errors_and_calibration_by_hand():
    calls = [("a", 1.0), ("a", 3.0), ("b", 10.0), ("a", 5.0), ("b", 20.0)]
    acc = evaluate(calls, ToolDurationPredictor(min_samples=2), taus=(4.0,), bins=2)
    # call 3 (b, 10): global [1, 3] -> mean 2, P(<= 4) = 1; baseline (every earlier call) 2 too
    # call 4 (a, 5): a's own [1, 3] -> mean 2, P = 1; baseline mean(1, 3, 10) = 14/3
    # call 5 (b, 20): global [1, 3, 5, 10] -> mean 4.75, P = 2/4; baseline mean(1, 3, 10, 5) = 4.75
    a, b = acc.tools
    assert (a.tool, a.calls, a.predicted, a.mae_s, a.baseline_mae_s) == ("a", 3, 1, 3.0, pytest.approx(1 / 3))
    assert (b.calls, b.predicted, b.mae_s) == (2, 2, pytest.approx((8 + 15.25) / 2))
    assert acc.overall.predicted == 3 and acc.overall.mean_s == pytest.approx(39 / 5)
    (cal,) = acc.calibration
    # predicted 1, 1, 0.5; observed 0, 0, 0 (no call of the three ended within 4 s)
    assert cal.calls == 3 and cal.brier == pytest.approx((1 + 1 + 0.25) / 3)
    # all three in the upper bin [0.5, 1]; the empty lower bin is left out
    assert [(x.low, x.calls, x.predicted, x.observed) for x in cal.bins] == [(0.5, 3, pytest.approx(2.5 / 3), 0.0)]
    assert cal.ece == pytest.approx(2.5 / 3)


def test_a_stationary_tool_is_calibrated_and_beats_the_tool_blind_baseline():
    rng = random.Random(0)
    calls = [("fast", rng.expovariate(2.0)) if rng.random() < 0.5 else ("slow", rng.expovariate(0.05))
             for _ in range(3000)]
    acc = evaluate(calls)
    assert all(c.ece < 0.05 for c in acc.calibration)
    fast = next(t for t in acc.tools if t.tool == "fast")
    assert fast.mae_s < 0.2 * fast.baseline_mae_s
