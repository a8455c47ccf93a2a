"""Program-affinity routing policy, without Ray."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agentserve.routing.affinity import ProgramAffinity, ReplicaLoad


def load(rid: str, free: int, queue: int = 0, total: int = 100) -> ReplicaLoad:
    return ReplicaLoad(rid, free, total, queue)


def test_new_program_goes_to_most_free_kv_then_stays():
    a = ProgramAffinity()
    a.report([load("r1", 20), load("r2", 80)])
    first = a.place("p", ["r1", "r2"])
    assert first.ranked == ["r2", "r1"] and first.moved_from is None and first.decision == "new"
    a.report([load("r1", 90), load("r2", 10)])  # r1 is emptier now, but p's KV is on r2
    again = a.place("p", ["r1", "r2"])
    assert again.ranked == ["r2", "r1"] and again.decision == "home"
    assert a.place("q", ["r1", "r2"]).ranked[0] == "r1"  # a new program follows load


def test_queue_counts_against_free_kv():
    a = ProgramAffinity(queue_weight=0.05)
    a.report([load("r1", 60, queue=10), load("r2", 50, queue=0)])  # 0.60 - 0.5 < 0.50
    assert a.place("p", ["r1", "r2"]).ranked[0] == "r2"


def test_placements_since_the_last_report_spread_new_programs():
    a = ProgramAffinity()
    a.report([load("r1", 50), load("r2", 50)])
    homes = {a.place(f"p{i}", ["r1", "r2"]).ranked[0] for i in range(6)}
    assert homes == {"r1", "r2"}
    counts = [r for p, r in a.home.items()]
    assert abs(counts.count("r1") - counts.count("r2")) <= 1


def test_program_moves_when_its_replica_is_gone():
    a = ProgramAffinity()
    a.report([load("r1", 90), load("r2", 10)])
    assert a.place("p", ["r1", "r2"]).ranked[0] == "r1"
    assert a.replica_gone("r1") == ["p"]
    moved = a.place("p", ["r2"])
    assert moved.ranked == ["r2"] and moved.moved_from == "r1" and moved.decision == "moved"
    settled = a.place("p", ["r2"])
    assert settled.moved_from is None and settled.decision == "home"  # settled on r2


def test_program_whose_home_is_not_a_candidate_moves():
    a = ProgramAffinity()
    a.place("p", ["r1"])
    placed = a.place("p", ["r2", "r3"])  # r1 not accepting (backpressure or drained)
    assert placed.moved_from == "r1" and placed.ranked[0] in ("r2", "r3")


def test_requests_without_program_and_no_replicas():
    a = ProgramAffinity()
    a.report([load("r1", 10), load("r2", 70)])
    unnamed = a.place(None, ["r1", "r2"])
    assert unnamed.ranked[0] == "r2" and unnamed.decision == "unnamed" and not a.home
    assert a.place("p", []).ranked == []


def test_end_forgets_and_map_is_bounded():
    a = ProgramAffinity(max_programs=3)
    for i in range(10):
        a.place(f"p{i}", ["r1", "r2"])
    assert len(a.home) == 3 and list(a.home) == ["p7", "p8", "p9"]
    a.end("p9")
    assert "p9" not in a.home


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["place", "gone", "end", "report"]), st.integers(0, 5),
                          st.integers(0, 3), st.integers(0, 100)), max_size=60))
def test_programs_stay_on_a_live_replica(events):
    """Invariant: a program's turns stay on one replica for as long as it is a candidate; every
    placement ranks only candidates, each once."""
    a = ProgramAffinity()
    live = {"r0", "r1", "r2", "r3"}
    for kind, p, r, free in events:
        replica = f"r{r}"
        if kind == "gone":
            live.discard(replica)
            a.replica_gone(replica)
        elif kind == "report" and replica in live:
            a.report([load(replica, free, queue=free % 7)])
        elif kind == "end":
            a.end(f"p{p}")
        elif kind == "place":
            before = a.home.get(f"p{p}")
            placed = a.place(f"p{p}", sorted(live))
            assert sorted(placed.ranked) == sorted(live)
            if live:
                assert a.home[f"p{p}"] == placed.ranked[0]
                if before in live:
                    assert placed.ranked[0] == before and placed.moved_from is None
