"""The clairvoyant policy (simulator only): its block pool evicts by true next use, and on any access
sequence that never misses more than LRU does (Belady's optimality, by owner); it is told the plan's
truth; a replay refuses it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentserve.programs.fields import XARG_NEXT_USE, XARG_REMAINING, XARG_TTL
from agentserve.sim.clairvoyant import PIN_SLACK_S, Truth
from agentserve.sim.pool import BlockPool
from tests.test_sim import fleet, program
from workloads.replay import EngineSetup


def misses(capacity: int, accesses: list[tuple[str, int]], clairvoyant: bool) -> int:
    """Serve `accesses` (owner, its context in blocks; a context only grows) one at a time, each
    releasing its blocks when done, as a finished call leaves its KV cached; count blocks computed."""
    position = {"now": 0}

    def next_use(owner: str) -> float:
        later = [i for i in range(position["now"] + 1, len(accesses)) if accesses[i][0] == owner]
        return later[0] if later else float("inf")

    pool = BlockPool(capacity, next_use if clairvoyant else None)
    sizes: dict[str, int] = {}
    computed = 0
    for i, (owner, grow) in enumerate(accesses):
        position["now"] = i
        sizes[owner] = min(capacity, sizes.get(owner, 0) + grow)
        keys = [(owner, b) for b in range(sizes[owner])]
        hit = pool.cached_prefix(keys)
        pool.touch(keys[:hit])
        assert pool.take(len(keys) - hit)
        for key in keys[hit:]:
            pool.fill(key)
        computed += len(keys) - hit
        pool.release(keys)
        pool.check()
    return computed


@settings(max_examples=300, deadline=None)
@given(capacity=st.integers(2, 12),
       accesses=st.lists(st.tuples(st.sampled_from("abcde"), st.integers(1, 4)), min_size=1, max_size=40))
def test_eviction_by_true_next_use_never_computes_more_than_lru(capacity, accesses):
    assert misses(capacity, accesses, clairvoyant=True) <= misses(capacity, accesses, clairvoyant=False)


def test_the_pool_evicts_the_owner_needed_furthest_ahead_tail_first():
    due = {"a": 5.0, "b": 50.0}
    pool = BlockPool(4, due.__getitem__)
    assert pool.take(4)
    for key in [("a", 0), ("a", 1), ("b", 0), ("b", 1)]:
        pool.fill(key)
    pool.release([("b", 0), ("b", 1)])
    pool.release([("a", 0), ("a", 1)])  # a is the newer, so LRU would evict b first too: swap the dues
    due.update(a=60.0, b=5.0)
    assert pool.take(1)
    assert ("a", 1) not in pool.ref and ("a", 0) in pool.ref and ("b", 1) in pool.ref


class _Rule:
    max_ttl_s = 10.0

    def gain(self, context_tokens: int) -> float:
        return context_tokens / 1000  # 1 s a thousand tokens


def test_the_truth_told_per_call():
    plan = program("p", 0.0, [(100, 2, 3.0), (10, 2, 20.0), (10, 2, 0.0)])
    truth = Truth(_Rule(), lambda: 0.5, front_end_s=0.0)
    xargs = {XARG_TTL: 7.0}
    truth.amend(xargs, plan, 0, context_tokens=5000)  # gain 5 s > 3 s of tool: pin for the tool time
    assert xargs == {XARG_TTL: pytest.approx(3.0 + PIN_SLACK_S), XARG_NEXT_USE: 3.0,
                     XARG_REMAINING: pytest.approx(23.0 + 3 * 0.5)}
    xargs = {XARG_TTL: 7.0}
    truth.amend(xargs, plan, 1, context_tokens=5000)  # a 20 s tool: the pin is not worth it
    assert xargs[XARG_TTL] == 0.0 and xargs[XARG_NEXT_USE] == 20.0
    xargs = {}
    truth.amend(xargs, plan, 2, context_tokens=5000)  # the last call: no next use
    assert xargs == {XARG_REMAINING: 0.5}


def test_the_simulator_runs_it_and_a_replay_refuses_it():
    programs = [program(f"p{i}", 0.1 * i, [(300, 4, 0.5), (40, 4, 0.0)]) for i in range(6)]
    records = fleet("clairvoyant", kv_tokens=1024).run(programs)
    assert all(r.error is None and len(r.turns) == 2 for r in records)
    with pytest.raises(ValueError, match="simulator only"):
        EngineSetup().serve_args("clairvoyant", 4)


def test_the_truth_gate_counts_each_programs_true_peak_from_its_first_request():
    from agentserve.programs.admission import AdmissionGate
    from agentserve.sim.clairvoyant import TruthGate, peak_tokens

    plan = program("big", 0.0, [(100, 10, 1.0), (900, 10, 0.0)])
    assert peak_tokens(plan, 50) == 50 + 100 + 10 + 900 + 10 + 2 * 12  # a sub-program's prefix, then each call
    online = AdmissionGate(1500, 1.0)
    online.admits("first", 800, 0.0, 0.0)
    assert online.admits("big", 112, 0.0, 0.0)  # the online gate sees a 112-token prompt and lets it in
    truth = TruthGate(AdmissionGate(1500, 1.0), {"big": peak_tokens(plan, 0), "first": 800})
    assert truth.admits("first", 800, 0.0, 0.0)
    assert not truth.admits("big", 112, 0.0, 0.0)  # 800 + its peak of 1044 tokens > 1500: held
    truth.end("first")
    assert truth.admits("big", 112, 1.0, 1.0) and truth.load == 1044
