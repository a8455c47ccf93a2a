"""The Ray Serve app's shared program control plane, without Ray: placement, per-replica command
outboxes, moves, dead replicas, and the invariant that no pin survives its program."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from agentserve.programs.fields import XARG_TTL, ProgramFields
from agentserve.rayserve import control_plane as cp_module
from agentserve.rayserve.control_plane import ClusterControlPlane

FIXED = {"policy": "fixed", "fixed_ttl_s": 30.0}


def fields(program: str, last: bool = False) -> bytes:
    return msgspec.json.encode(ProgramFields(program_id=program, is_last_turn=last))


def stats(free: int = 90, total: int = 100, queued: int = 0, pins: int = 0, events=()) -> dict:
    return {"pins": pins, "pinned_blocks": pins, "pin_cap_blocks": 50, "programs": 0, "free_blocks": free,
            "total_blocks": total, "queued": queued, "counters": {}, "events": list(events)}


def run(coro):
    return asyncio.run(coro)


def test_program_commands_go_to_the_replica_that_served_it():
    cp = ClusterControlPlane(FIXED)
    for r in ("r1", "r2"):
        cp.register(r, None)
        cp.sync(r, stats())
    xargs = cp.begin_call("r2", fields("p"), 100, 10)
    assert xargs[XARG_TTL] == 30.0
    cp.end_call("p", 110)
    assert cp.place("p", ["r1", "r2"])[0] == "r2"  # its KV is on r2
    assert run(cp.end_program("p")) == {"ok": None}
    assert cp.sync("r1", stats()) == [] and cp.sync("r2", stats()) == [("end", {"program_id": "p", "life": 1})]
    assert cp.sync("r2", stats()) == [] and not cp.affinity.home and len(cp.control.tracker) == 0


def test_stats_say_how_many_commands_a_replica_has_not_carried_out():
    """An end reaches its replica at the replica's next sync, and shows in its stats one sync later:
    until then the stats count it as pending, so a reader knows they may still hold the program's pin."""
    cp = ClusterControlPlane(FIXED)
    cp.sync("r1", {**stats(pins=1), "commands_done": 0})
    cp.begin_call("r1", fields("p"), 100, 10)
    cp.end_call("p", 110)
    run(cp.end_program("p"))
    assert cp.live()["r1"]["commands_pending"] == 1 and run(cp.control.tick())["commands_pending"] == 1
    assert cp.sync("r1", {**stats(pins=1), "commands_done": 0}) == [("end", {"program_id": "p", "life": 1})]
    assert cp.live()["r1"]["commands_pending"] == 1  # handed over; these stats were taken before it ran
    cp.sync("r1", {**stats(pins=0), "commands_done": 1})
    assert cp.live()["r1"]["commands_pending"] == 0 and "commands_done" not in cp.live()["r1"]
    assert run(cp.control.tick())["commands_pending"] == 0


def test_a_program_served_elsewhere_releases_its_old_pin():
    cp = ClusterControlPlane(FIXED)
    for r in ("r1", "r2"):
        cp.sync(r, stats())
    cp.begin_call("r1", fields("p"), 100, 10)
    cp.end_call("p", 110)
    fallbacks = REGISTRY.get_sample_value("agentserve_routing_decisions_total", {"decision": "fallback"}) or 0.0
    cp.begin_call("r2", fields("p"), 120, 10)  # a fallback under backpressure, say
    assert cp.sync("r1", stats()) == [("release", {"program_id": "p", "reason": "moved"})]
    assert cp.affinity.home["p"] == "r2"
    assert REGISTRY.get_sample_value("agentserve_routing_decisions_total", {"decision": "fallback"}) == fallbacks + 1
    homes = REGISTRY.get_sample_value("agentserve_routing_decisions_total", {"decision": "home"}) or 0.0
    assert cp.place("p", ["r1", "r2"])[0] == "r2"
    assert REGISTRY.get_sample_value("agentserve_routing_decisions_total", {"decision": "home"}) == homes + 1


def test_dead_replica_is_forgotten_and_its_programs_move(monkeypatch):
    cp = ClusterControlPlane(FIXED)
    cp.sync("r1", stats(pins=3))
    cp.sync("r2", stats())
    cp.begin_call("r1", fields("p"), 100, 10)
    cp.end_call("p", 110)
    run(cp.control.abort_call("p"))  # queues a release for r1 ...
    assert cp.replica_gone("r1") == ["p"]  # ... which dies with it
    assert "r1" not in cp.outbox and cp.place("p", ["r2"]) == ["r2"] and cp.affinity.home["p"] == "r2"
    # a replica that stops syncing leaves the cluster's stats, and is back when it syncs again
    cp.sync("r2", stats(pins=2))
    cp.begin_call("r2", fields("q"), 100, 10)
    run(cp.end_program("q"))  # queued for r2
    now = time.monotonic()
    monkeypatch.setattr(cp_module.time, "monotonic", lambda: now + cp_module.REPLICA_SILENT_S + 1)
    assert run(cp.control.tick())["pins"] == 0 and not cp.live()
    assert cp.sync("r2", stats(pins=0)) == [("end", {"program_id": "q", "life": 2})]  # nothing lost meanwhile
    assert list(cp.live()) == ["r2"]


def test_program_route_errors_stay_client_errors():
    cp = ClusterControlPlane(FIXED)
    status, message = run(cp.describe("nope"))["error"]
    assert status == 404 and "nope" in message
    assert run(cp.tool_event("nope", "bash", "end", 1.0))["error"][0] == 404
    stats_ = run(cp.stats())["ok"]
    assert stats_["policy"] == "fixed" and stats_["programs"] == 0 and stats_["routed_programs"] == 0


def test_agentserve_policy_waits_for_a_measured_reload_profile():
    cp = ClusterControlPlane({"policy": "agentserve"})
    assert cp.control.policy is None and cp.register("r1", None) is True
    assert "agentserve_ttl_s" not in cp.begin_call("r1", fields("p"), 100, 10)  # no policy yet: no pin
    profile = {"a": 0.01, "b": 1e-4, "c": 0.0, "max_tokens": 4096, "points": []}
    assert cp.register("r1", profile) is False and cp.control.policy.name == "agentserve"
    assert cp.register("r2", None) is False  # already set


def test_vllm_policy_tracks_and_routes_but_never_pins():
    cp = ClusterControlPlane({"policy": "vllm"})
    assert XARG_TTL not in cp.begin_call("r1", fields("p"), 100, 10)
    run(cp.end_program("p"))
    assert cp.sync("r1", stats()) == []


class FakeReplica:
    """A replica's pins as the scheduler plugin keeps them: one per program, made when a non-final
    call with a TTL ends, dropped by end / release commands."""

    def __init__(self):
        self.pins: set[str] = set()

    def apply(self, commands) -> None:
        for command, payload in commands:
            if command == "release_all":
                self.pins.clear()
            else:
                self.pins.discard(payload["program_id"])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["call", "last", "end", "gone", "sync"]),
                          st.integers(0, 4), st.integers(0, 2)), max_size=60))
def test_no_pin_survives_its_program(ops):
    cp = ClusterControlPlane(FIXED)
    replicas = {f"r{i}": FakeReplica() for i in range(3)}
    for r in replicas:
        cp.sync(r, stats())
    live: set[str] = set()
    for op, p, r in ops:
        program, replica = f"p{p}", f"r{r}"
        if op in ("call", "last"):
            candidates = list(replicas)
            if not candidates:
                continue
            target = cp.place(program, candidates)[0]
            xargs = cp.begin_call(target, fields(program, last=op == "last"), 50, 5)
            cp.end_call(program, 55)
            live.add(program)
            if xargs.get(XARG_TTL):
                replicas[target].pins.add(program)
        elif op == "end" and program in live:
            run(cp.end_program(program))
            live.discard(program)
        elif op == "gone" and replica in replicas and len(replicas) > 1:
            del replicas[replica]  # its pins die with it
            cp.replica_gone(replica)
        elif op == "sync" and replica in replicas:
            replicas[replica].apply(cp.sync(replica, stats()))
    for program in list(live):
        run(cp.end_program(program))
    for r, fake in replicas.items():
        fake.apply(cp.sync(r, stats()))
        assert not fake.pins, f"{r} still pins {fake.pins} after every program ended"
    assert not cp.affinity.home and len(cp.control.tracker) == 0


def test_ready_once_every_replica_started_and_stays_ready():
    cp = ClusterControlPlane(FIXED, replicas=2)
    cp.register("r1", None)
    cp.replica_started("r1")
    assert not cp.ready()
    cp.replica_started("r2")
    assert cp.ready()
    cp.replica_gone("r2")  # Serve replaces it; the app keeps serving on r1 meanwhile
    assert cp.ready()
