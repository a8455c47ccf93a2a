"""The host tier's eviction order without an engine: `NextUse` (when each program's KV is needed again)
and the vLLM cache policy over it, on random program event sequences (hypothesis)."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st
from vllm.v1.kv_offload.base import ReqContext
from vllm.v1.kv_offload.cpu.policies.base import ChunkStatus

from agentserve.hosttier.policy import NextUseCachePolicy
from agentserve.programs.next_use import NEVER, NextUse
from agentserve.ttl.policy import CostBenefitTTL, OnlineBenefit, decide
from agentserve.ttl.predictor import ToolDurationPredictor
from agentserve.ttl.reload import ReloadProfile


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_next_use_orders_running_due_soon_far_and_never():
    clock = Clock()
    nu = NextUse(clock)
    for p in ("run", "soon", "far", "done"):
        nu.started(p)
    nu.finished("soon", 2.0, is_last=False)
    nu.finished("far", 60.0, is_last=False)
    nu.finished("done", 1.0, is_last=True)
    assert nu.seconds_until("run") == 0.0  # in use
    assert nu.seconds_until("soon") == 2.0 and nu.seconds_until("far") == 60.0
    assert nu.seconds_until("done") == NEVER and nu.seconds_until(None) == NEVER and nu.seconds_until("?") == NEVER
    clock.now += 10.0
    assert nu.seconds_until("soon") == 0.0  # late, not gone
    nu.ended("far")
    assert nu.seconds_until("far") == NEVER


def key(i: int) -> bytes:
    return i.to_bytes(4, "big")


events = st.lists(st.one_of(
    st.tuples(st.just("turn"), st.integers(0, 4), st.floats(0, 30), st.booleans()),  # program, gap, last
    st.tuples(st.just("store"), st.integers(-1, 4), st.integers(1, 6)),  # owner (-1: a one-off), chunks
    st.tuples(st.just("end"), st.integers(0, 4)),
    st.tuples(st.just("wait"), st.floats(0, 10)),
    st.tuples(st.just("evict"), st.integers(0, 8), st.integers(0, 3)),  # n, protected count
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(events=events)
def test_the_policy_evicts_the_furthest_next_use_first_and_never_a_protected_chunk(events):
    clock = Clock()
    nu = NextUse(clock)
    owners: dict[str, str | None] = {}
    pol = NextUseCachePolicy(cache_capacity=64)
    pol.attach(owners.get, nu)
    chunk_of: dict[bytes, str | None] = {}
    n_keys = 0
    for ev in events:
        if ev[0] == "turn":
            _, p, gap, last = ev
            nu.started(f"P{p}")
            nu.finished(f"P{p}", gap, last)
        elif ev[0] == "store":
            _, p, count = ev
            program = f"P{p}" if p >= 0 else None
            rid = f"r{n_keys}"
            owners[rid] = program
            keys = [key(n_keys + i) for i in range(count)]
            n_keys += count
            pol.on_store_miss(keys, ReqContext(rid))
            for k in keys:
                chunk = ChunkStatus(len(chunk_of))
                chunk.ref_cnt = 0
                pol.insert(k, chunk)
                chunk_of[k] = program
        elif ev[0] == "end":
            nu.ended(f"P{ev[1]}")
        elif ev[0] == "wait":
            clock.now += ev[1]
        else:
            _, n, n_protected = ev
            present = sorted(pol.chunks)
            protected = set(present[:n_protected])
            before = {k: nu.seconds_until(chunk_of[k]) for k in present}
            out = pol.evict(n, protected)
            if len(present) - len(protected & set(present)) < n:
                assert out is None and sorted(pol.chunks) == present  # atomic refusal
                continue
            evicted = {k for k, _ in out}
            assert len(evicted) == n and not evicted & protected
            kept = [k for k in pol.chunks if k not in protected]
            if evicted and kept:  # nothing kept is needed later than anything evicted
                assert min(before[k] for k in evicted) >= max(before[k] for k in kept)
            for k in evicted:
                del chunk_of[k]
    assert set(pol.chunks) == set(chunk_of)


def test_without_the_plugin_the_policy_is_lru():
    pol = NextUseCachePolicy(cache_capacity=8)
    for i in range(4):
        chunk = ChunkStatus(i)
        chunk.ref_cnt = 0
        pol.insert(key(i), chunk)
    pol.touch([key(0)], ReqContext("r"))  # 0 is now the most recently used
    assert [k for k, _ in pol.evict(2, set())] == [key(1), key(2)]


def test_the_ttl_rule_weighs_a_host_load_back_instead_of_a_re_prefill():
    p = ToolDurationPredictor()
    for _ in range(20):
        p.observe("bash", 0.5, client_measured=True)
    reload = ReloadProfile(a=2.0, b=0, c=0, max_tokens=1)  # a re-prefill costs 2 s: worth a 0.5 s pin
    load_back = ReloadProfile(a=0.02, b=0, c=0, max_tokens=1)  # a copy costs 20 ms: not worth one
    without = CostBenefitTTL(p, reload, OnlineBenefit())
    with_tier = CostBenefitTTL(p, reload, OnlineBenefit(), host=load_back, host_tokens=4096)
    assert without.ttl("bash", 1000) == 0.5 and decide(without, 0.5, 1000, False) == "device"
    assert with_tier.ttl("bash", 1000) == 0.0 and decide(with_tier, 0.0, 1000, False) == "host"
    assert with_tier.ttl("bash", 8192) == 0.5  # a context the tier cannot hold costs its re-prefill
    assert decide(with_tier, 0.0, 1000, True) == "drop" and decide(without, 0.0, 1000, False) == "drop"
    assert math.isclose(with_tier.miss_cost(1000), 0.02)
    # a copy causes no re-prefill contention: the queueing term T x eta does not apply to it
    queued = OnlineBenefit()
    queued.observe_evicted_queue_delay(5.0)
    assert CostBenefitTTL(p, reload, queued, host=load_back, host_tokens=4096).ttl("bash", 1000) == 0.0
    assert CostBenefitTTL(p, load_back, queued).ttl("bash", 1000) == 0.5  # without a tier it does


def test_a_chunk_several_programs_use_outlives_any_one_of_them():
    """A common prefix (the agents' system prompt) is needed as soon as the first user needs it: the
    program that stored it ending does not make it the first to go."""
    clock = Clock()
    nu = NextUse(clock)
    owners = {"r-a": "A", "r-b": "B", "r-c": "C"}
    pol = NextUseCachePolicy(cache_capacity=8)
    pol.attach(owners.get, nu)
    for i, rid in enumerate(("r-a", "r-c")):  # A stores the common prefix, C a context of its own
        pol.on_store_miss([key(i)], ReqContext(rid))
        chunk = ChunkStatus(i)
        chunk.ref_cnt = 0
        pol.insert(key(i), chunk)
    pol.touch([key(0)], ReqContext("r-b"))  # B reads the prefix too
    for p, gap in (("A", 1.0), ("B", 5.0), ("C", 30.0)):
        nu.started(p)
        nu.finished(p, gap, is_last=False)
    nu.ended("A")
    assert pol.seconds_until(key(0)) == 5.0  # B's next use, not A's end
    assert [k for k, _ in pol.evict(1, set())] == [key(1)]  # C's own context (30 s away) goes first


sim_events = st.lists(st.one_of(
    st.tuples(st.just("turn"), st.integers(0, 4), st.floats(0, 60), st.booleans()),
    st.tuples(st.just("store"), st.integers(-1, 4), st.integers(0, 11)),  # program (-1: a one-off), block
    st.tuples(st.just("end"), st.integers(0, 4)),
    st.tuples(st.just("wait"), st.floats(0, 30)),
), max_size=80)


@settings(max_examples=200, deadline=None)
@given(events=sim_events)
def test_the_simulators_host_tier_evicts_what_the_servers_policy_evicts(events):
    """The same stores (a new block, or one stored before and reused) on the same program events:
    the simulator's next-use tier and vLLM's cache policy with agentserve's order keep the same blocks."""
    from agentserve.hosttier.owners import ChunkOwners
    from agentserve.sim.host import HostTier

    clock = Clock()
    nu = NextUse(clock)
    sim = HostTier(6, ChunkOwners(nu))
    server = NextUseCachePolicy(cache_capacity=6)
    programs: dict[str, str | None] = {}
    server.attach(programs.get, nu)
    for n, ev in enumerate(events):
        if ev[0] == "turn":
            nu.started(f"P{ev[1]}")
            nu.finished(f"P{ev[1]}", ev[2], ev[3])
        elif ev[0] == "end":
            nu.ended(f"P{ev[1]}")
        elif ev[0] == "wait":
            clock.now += ev[1]
        else:
            program = f"P{ev[1]}" if ev[1] >= 0 else None
            rid = f"r{n}"
            programs[rid] = program
            block = key(ev[2])
            sim.store(block, program)
            if block in server.chunks:
                server.touch([block], ReqContext(rid))
            else:
                if len(server.chunks) >= 6:
                    server.evict(1, set())
                server.on_store_miss([block], ReqContext(rid))
                chunk = ChunkStatus(n)
                chunk.ref_cnt = 0
                server.insert(block, chunk)
        assert set(sim.blocks) == set(server.chunks)
    assert sim.owners.evicted_by_reason == server.evicted_by_reason
