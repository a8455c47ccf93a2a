"""The soak's short version (make soak MINUTES=30 is the long one): two minutes of mixed agent traffic
against a real server with the host tier, then nothing may be left: no program, pin, host chunk in use
or open stream, no 5xx, and the server alive. `--policy fixed` pins every turn for 10 s: at this scale the
default TTL rule pins none (the tier holds contexts for less than a hold costs), and pins must not leak."""

from __future__ import annotations

import pytest

from workloads.soak import JOBS, SoakConfig, soak

pytestmark = pytest.mark.slow


def test_two_minutes_of_mixed_traffic_leave_nothing_behind(tmp_path):
    result = soak(SoakConfig(minutes=2.0, sample_s=30.0, serve_args=("--policy", "fixed", "--fixed-ttl", "10")),
                  tmp_path)
    tally = result["tally"]
    assert result["server_alive"]
    assert tally["server_errors"] == 0 and not tally["errors"], tally
    assert set(tally["jobs"]) == set(JOBS) and tally["calls"] >= 40, tally  # every kind of client ran
    assert tally["client_gone"] > 0
    assert not any(result["leaks"].values()), result["leaks"]
    middle = result["samples"][1:-1]
    assert any(s["programs"] > 0 for s in middle), "the samples saw no live program: the probe reads nothing"
    assert any(s["pins"] > 0 for s in middle), "no pin was seen: the leak check of pins would be vacuous"
    assert any(s["host_chunks"] > 0 for s in result["samples"]), "the host tier was never used"
    assert all(s["streams_open"] >= 0 for s in result["samples"]), "the open-streams gauge is not exported"
    for name in ("soak.json", "soak.md", "soak.png"):
        assert (tmp_path / name).stat().st_size > 0
