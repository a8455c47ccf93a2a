"""Tool-duration predictor, reload profile fit and the TTL policies, without an engine."""

import math
import random

import pytest

from agentserve.ttl.policy import (CONTINUUM_TTL_S, DEFAULT_TOOL_MEAN_S, ETA_MIN_PROGRAMS, ETA_PRIOR,
                                   ContinuumDemoTTL, FixedTTL,
                                   OnlineBenefit, CostBenefitTTL)
from agentserve.policies import make_ttl
from agentserve.ttl.predictor import ToolDurationPredictor
from agentserve.ttl.reload import ReloadProfile


def predictor_with(samples, tool="bash", client=True, min_samples=5):
    p = ToolDurationPredictor(window=50, min_samples=min_samples)
    for s in samples:
        p.observe(tool, s, client_measured=client)
    return p


def test_client_measurements_replace_server_gaps():
    p = predictor_with([5.0] * 10, client=False)
    assert p.distribution("bash").source == "gap"
    for _ in range(5):
        p.observe("bash", 0.5, client_measured=True)
    d = p.distribution("bash")
    assert d.source == "client" and d.mean() == pytest.approx(0.5)
    p.observe("bash", 99.0, client_measured=False)  # ignored once the client measures this tool
    assert p.distribution("bash").mean() == pytest.approx(0.5)


def test_cold_tool_uses_global_then_none():
    p = ToolDurationPredictor(window=50, min_samples=5)
    assert p.distribution("grep").source == "none" and p.predict_mean("grep") is None
    for _ in range(5):
        p.observe("bash", 1.0, client_measured=True)
    assert p.distribution("grep").source == "global"


def test_summary_says_per_tool_what_it_holds_and_predicts_from():
    p = ToolDurationPredictor(window=50, min_samples=3)
    p.observe("bash", 2.0, client_measured=False)
    for d in (1.0, 2.0, 3.0):
        p.observe("pytest", d, client_measured=True)
    assert p.summary() == {
        "bash": {"samples": 1, "measured_by": "gap", "mean_s": 2.0, "predicts_from": "global"},
        "pytest": {"samples": 3, "measured_by": "client", "mean_s": 2.0, "predicts_from": "client"}}


def test_window_forgets_old_samples_and_refuses_bad_durations():
    p = predictor_with([10.0] * 50 + [1.0] * 50)
    assert p.predict_mean("bash") == pytest.approx(1.0)
    with pytest.raises(ValueError):
        p.observe("bash", -1, client_measured=True)
    with pytest.raises(ValueError):
        p.observe("bash", float("nan"), client_measured=True)


def test_reload_fit_recovers_a_quadratic():
    pts = [(n, 0.01 + 2e-5 * n + 3e-9 * n * n) for n in (100, 500, 1000, 2000, 4000)]
    prof = ReloadProfile.fit(pts)
    assert prof.seconds(3000) == pytest.approx(0.01 + 2e-5 * 3000 + 3e-9 * 9e6, rel=1e-6)
    with pytest.raises(ValueError):
        ReloadProfile.fit(pts[:2])


def test_continuum_demo_rule():
    p = predictor_with([0.5] * 5 + [1.0] * 5)
    pol = ContinuumDemoTTL(p)
    assert pol.ttl("bash", 1000) == CONTINUUM_TTL_S  # short tool
    assert pol.ttl("never-seen", 1000) == CONTINUUM_TTL_S  # global mean is short too
    long = predictor_with([5.0] * 10, tool="build")
    assert ContinuumDemoTTL(long).ttl("build", 1000) == 0.0


def test_optimal_ttl_is_the_argmax_of_the_paper_rule():
    durations = [0.2, 0.4, 0.6, 3.0, 8.0]
    p = predictor_with(durations)
    reload = ReloadProfile(a=2.0, b=0.0, c=0.0, max_tokens=1)  # B = 2 s
    pol = CostBenefitTTL(p, reload, OnlineBenefit())
    # value(tau) = CDF(tau) * 2 - tau: 0.2 -> 0.2, 0.4 -> 0.4, 0.6 -> 0.6, 3.0 -> -1.4
    assert pol.ttl("bash", 100) == pytest.approx(0.6)
    brute = max([0.0] + durations, key=lambda t: (sum(d <= t for d in durations) / 5) * 2 - t)
    assert pol.ttl("bash", 100) == brute


def test_optimal_ttl_cold_start_is_exponential_optimum():
    reload = ReloadProfile(a=3.0, b=0.0, c=0.0, max_tokens=1)
    pol = CostBenefitTTL(ToolDurationPredictor(), reload, OnlineBenefit())
    assert pol.ttl(None, 10) == pytest.approx(DEFAULT_TOOL_MEAN_S * math.log(3.0 / DEFAULT_TOOL_MEAN_S))
    cheap = CostBenefitTTL(ToolDurationPredictor(), ReloadProfile(a=0.5, b=0, c=0, max_tokens=1), OnlineBenefit())
    assert cheap.ttl(None, 10) == 0.0


def test_online_benefit_learns_T_and_eta():
    b = OnlineBenefit()
    assert b.T == 0 and b.eta == ETA_PRIOR  # no finished program yet: the fixed-turn-count prior
    for _ in range(ETA_MIN_PROGRAMS):
        b.observe_finished_program(10)  # fixed turn counts: eta = 1
    b.observe_evicted_queue_delay(2.0)
    b.observe_evicted_queue_delay(4.0)
    assert b.eta == pytest.approx(1.0) and b.T == pytest.approx(3.0)
    geometric, rng = OnlineBenefit(), random.Random(0)
    for _ in range(300):  # geometric turn counts: turns left unrelated to turns served, eta ~ 0
        n = 1
        while rng.random() < 0.8:
            n += 1
        geometric.observe_finished_program(n)
    assert geometric.eta < 0.2


def test_make_ttl_validates():
    p = ToolDurationPredictor()
    assert isinstance(make_ttl("fixed", predictor=p, reload=None, fixed_ttl_s=3), FixedTTL)
    with pytest.raises(ValueError, match="reload profile"):
        make_ttl("agentserve", predictor=p, reload=None)
    with pytest.raises(ValueError, match="unknown"):
        make_ttl("lru", predictor=p, reload=None)
    with pytest.raises(ValueError):
        FixedTTL(-1)


@pytest.mark.parametrize("name", ["fixed", "continuum", "agentserve"])
def test_max_ttl_bounds_every_policy(name):
    """--max-ttl says "whatever the policy": the fixed and Continuum rules obey it too."""
    p = ToolDurationPredictor()
    for _ in range(5):
        p.observe("bash", 0.5, client_measured=True)
    reload = ReloadProfile(a=50.0, b=0, c=0, max_tokens=1)  # a reload so costly the rule pins long
    bounded = make_ttl(name, predictor=p, reload=reload, fixed_ttl_s=30.0, max_ttl_s=0.25)
    free = make_ttl(name, predictor=p, reload=reload, fixed_ttl_s=30.0, max_ttl_s=1000.0)
    assert free.ttl("bash", 1000) > 0.25  # the rule alone would pin longer ...
    assert bounded.ttl("bash", 1000) <= 0.25  # ... than the bound lets it
