"""What each policy implies, read from one table (agentserve/policies.py), checked against every
consumer: the replay's serve arguments, the engine settings, the simulator, the TTL rule and the
report. A new row of the table is checked here without a test of its own."""

from __future__ import annotations

import pytest

from agentserve import policies
from agentserve.engine.settings import SCHEDULER_CLS, EngineSettings, engine_settings_for
from agentserve.options import HostTierOptions, ProgramOptions
from agentserve.ttl.predictor import ToolDurationPredictor
from agentserve.ttl.reload import ReloadProfile

ROWS = [p.name for p in policies.TABLE]


def test_the_table_names_every_policy_once_and_the_serve_options_take_the_serve_policies():
    assert len(set(ROWS)) == len(ROWS) and {"vllm", "agentserve", "vllm+offload", "oracle"} <= set(ROWS)
    assert all(policies.get(p.serves).serves is None for p in policies.TABLE if p.serves)
    for name in policies.SERVE_POLICIES:
        assert ProgramOptions(policy=name).policy == name
    with pytest.raises(ValueError, match="unknown policy"):
        policies.get("lru")
    assert policies.split("vllm+offload+replicas=2") == (policies.get("vllm+offload"), ["replicas=2"])


@pytest.mark.parametrize("name", ROWS)
def test_every_consumer_reads_the_row(name):
    from agentserve.cli import build_parser
    from agentserve.options import from_flags
    from agentserve.sim.cli import policy_options
    from agentserve.sim.costs import load_profile
    from agentserve.sim.fleet import Fleet, FleetSetup
    from workloads.replay import EngineSetup
    from workloads.report import _plugin

    row = policies.get(name)
    served = row.serves or name
    # the replay serves it as its serve policy, with the host tier and the KV budget the row says; a
    # clairvoyant row knows the plan's future, which a served engine cannot: the replay refuses it
    setup = EngineSetup(engine=EngineSettings(kv_tokens=4096), program=ProgramOptions(host=HostTierOptions(kv_tokens=65536)))
    if row.clairvoyant:
        with pytest.raises(ValueError, match="simulator only"):
            setup.serve_args(name, programs=4)
    else:
        parsed = build_parser().parse_args(["serve", *setup.serve_args(name, programs=4)])
        served_options = from_flags(ProgramOptions, parsed)
        assert served_options.policy == served and (served_options.host.kv_tokens != 0) == row.host_tier
        assert (from_flags(EngineSettings, parsed).kv_tokens > 4096) == row.unbounded_kv
    # the engine runs the plugin exactly when the row says
    settings = engine_settings_for(EngineSettings(model="tiny"), ProgramOptions(policy=served, host=HostTierOptions(
        kv_tokens=0)), "cpu")
    assert (settings.scheduler_cls == SCHEDULER_CLS) == row.plugin
    # the simulator: the same host tier, a control plane with the plugin, an unbounded pool for the oracle
    _, options, _ = policy_options(name, ProgramOptions(), 8192)
    assert options.policy == served and (options.host.kv_tokens > 0) == row.host_tier
    fleet = Fleet(FleetSetup(policy=name, replicas=1, kv_tokens=8192, cost=load_profile("cpu-bench"), options=options))
    assert (fleet.control is not None) == row.plugin
    assert (fleet.engines[0].pool.num_blocks > 8192 // 32) == row.unbounded_kv
    assert (fleet.engines[0].host is not None) == row.host_tier
    assert (fleet.truth is not None) == row.clairvoyant == (fleet.engines[0].pool.next_use is not None)
    # a TTL rule exactly for the plugin policies; one that needs the measured reload curve refuses without it
    p = ToolDurationPredictor()
    rule = policies.make_ttl(name, predictor=p, reload=ReloadProfile(a=1.0, b=0, c=0, max_tokens=1))
    assert (rule is not None) == (row.ttl is not None) and (row.ttl is None or row.plugin)
    if row.reload_profile:
        with pytest.raises(ValueError, match="reload profile"):
            policies.make_ttl(name, predictor=p, reload=None)
    assert _plugin(name) == row.plugin
