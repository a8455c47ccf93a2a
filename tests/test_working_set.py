"""Working-set admission (programs/admission.py, programs/contention.py): the policy alone with an
injected clock, then through the simulator's engine, which runs the same program book as the plugin
(tests/test_core_trace.py checks that both make the same decisions, pauses included)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentserve.options import AdmissionOptions, HostTierOptions, ProgramOptions
from agentserve.programs.admission import AdmissionGate
from agentserve.programs.contention import Contention
from tests.test_sim import UNIT, fleet, program


def gate(**kw) -> AdmissionGate:
    ranks = {"A": 0, "B": 1, "C": 2, "D": 3}
    return AdmissionGate(1000, 1.0, max_hold_s=10, pause=True, rank=ranks.get, **kw)


def test_a_guest_is_paused_at_its_tool_boundary_and_resumed_when_room_frees():
    g = gate()
    assert g.admits("A", 600, 0, now=0)
    g.started("A", 600, 0)
    assert not g.admits("B", 600, 0, now=1)  # 1,200 > 1,000: held
    assert g.admits("B", 600, 10, now=11) and g.counters["admitted_overdue"] == 1  # the hold bound: a guest
    g.started("B", 600, 11)
    g.finished("A", 650, 12)
    g.rebalance(12)
    assert g.take_paused() == [] and "A" in g  # A is a member: never paused
    g.finished("B", 650, 13)
    g.rebalance(13)
    assert g.take_paused() == ["B"] and "B" not in g and "B" in g.paused  # over the limit: the guest pauses
    assert g.load == 650 and not g.admits("B", 700, 0, now=14)  # back from its tool: waits for room
    g.end("A")
    assert g.admits("B", 700, 1, now=15) and g.counters["resumed"] == 1 and not g.programs["B"].guest


def test_an_earlier_program_displaces_later_programs_in_a_tool_call_and_a_later_one_never_an_earlier():
    g = gate()
    for name, t in (("A", 0), ("C", 11)):
        assert g.admits(name, 400, 10, now=t)
        g.started(name, 400, t)
        g.finished(name, 400, t + 1)
    assert g.programs["C"].guest is False  # 800 fits: C is a member
    assert g.admits("D", 500, 10, now=20) and g.programs["D"].guest  # 1,300: D is a guest
    g.started("D", 500, 20)
    g.finished("D", 500, 21)  # D in a tool call
    assert g.admits("B", 200, 0, now=22)  # B (rank 1) displaces the latest, D (800 + 200 fits); C stays
    assert g.take_paused() == ["D"] and "C" in g and g.counters["admitted_displacing"] == 1
    assert not g.admits("D", 500, 0, now=23)  # D (rank 3) displaces no earlier program
    g.end("B")
    assert g.load == 800 and g.admits("B", 600, 0, now=25)  # B again (rank 1): C, a member, is paused for it
    assert g.take_paused() == ["C"] and set(g.programs) == {"A", "B"}


def test_contention_needs_demand_beyond_the_limit_and_lost_context_and_ends_when_demand_fits():
    c = Contention(window=8, loss_on=0.2)
    for _ in range(8):
        c.returned(1000, 1000)  # every re-needed token found
    assert not c.update(demand=5000, limit=1000)  # demand alone is a forecast
    for _ in range(8):
        c.returned(1000, 500)
    assert c.loss == 0.5 and not c.update(demand=900, limit=1000)  # losses alone: no program to hold
    assert c.update(demand=1200, limit=1000) and c.switches == 1
    for _ in range(8):
        c.returned(1000, 1000)  # with programs held nothing is lost: it stays on while demand is above
    assert c.update(demand=1200, limit=1000)
    assert not c.update(demand=899, limit=1000) and c.switches == 2 and c.loss == 0.0


def test_auto_admits_everything_until_contended_then_splits_by_rank():
    g = gate(contention=Contention(window=8))
    for t, name in enumerate("ABCD"):
        assert g.admits(name, 400, 0, now=t)
        g.started(name, 400, t)
    assert g.counters["admitted_uncontended"] == 3 and g.load == 1600  # the first one: admitted_idle
    for name in "ABCD":
        g.finished(name, 400, 5)
        g.rebalance(5)
    assert g.take_paused() == []  # no loss seen yet: not contended
    for _ in range(8):
        g.contention.returned(400, 0)  # every returning turn re-prefilled its context: thrashing
    g.rebalance(6)
    assert g.counters["contention_on"] == 1 and g.counters["guests_at_contention"] == 2
    assert g.take_paused() == ["D", "C"] and set(g.programs) == {"A", "B"}  # the latest ranks pause
    g.end("A")
    g.end("B")
    g.rebalance(7)
    assert g.counters["contention_off"] == 0 and g.contended() is False  # demand 800 fits: off


def sim(options: AdmissionOptions, host_tokens: int, programs, kv_tokens: int = 2048):
    f = fleet("agentserve", kv_tokens=kv_tokens, cost=UNIT, options=ProgramOptions(
        policy="agentserve", admission=options, host=HostTierOptions(kv_tokens=host_tokens)))
    records = {r.id: r for r in f.run(programs)}
    return records, f.server_stats()


def test_a_guest_is_paused_through_the_simulators_engine_its_blocks_demoted_and_it_completes():
    """Three programs of 1,000+ tokens on 2,048 tokens of KV, no host tier: with the hold bound short,
    the third is a guest; it is paused in its tool call (its blocks evicted first), resumes and ends."""
    plan = [program(p, 0.1 * i, [(1000, 4, 2.0), (50, 4, 2.0), (50, 4, 0.0)]) for i, p in enumerate("abc")]
    records, stats = sim(AdmissionOptions(mode="on", max_hold_s=0.5), 0, plan)
    counters = stats["counters"]
    assert counters["admission_admitted_overdue"] >= 1 and counters["admission_paused"] >= 1
    assert counters["admission_resumed"] == counters["admission_paused"] and counters["blocks_demoted"] > 0
    assert all(len(r.turns) == 3 for r in records.values())
    _, off = sim(AdmissionOptions(mode="off"), 0, plan)
    assert "admission_paused" not in off["counters"]


@settings(max_examples=40, deadline=None)
@given(programs=st.lists(st.lists(st.tuples(st.integers(50, 600), st.integers(1, 12), st.floats(0, 3)),
                                  min_size=1, max_size=5), min_size=2, max_size=10),
       mode=st.sampled_from(["on", "auto"]), max_hold=st.sampled_from([0.0, 0.3, 5.0]),
       host_blocks=st.sampled_from([0, 16, 256]))
def test_no_program_is_paused_forever_and_every_admitted_program_completes(programs, mode, max_hold, host_blocks):
    """check=True asserts the pool's invariants every step; every program finishes every turn and the
    gate is left with nothing admitted, held or paused."""
    planned = [program(f"p{i}", 0.05 * i, turns) for i, turns in enumerate(programs)]
    longest = max(sum(n + o + 12 for n, o, _ in turns) for turns in programs)
    records, stats = sim(AdmissionOptions(mode=mode, max_hold_s=max_hold), 32 * host_blocks, planned,
                         kv_tokens=max(1024, longest + 64))
    assert len(records) == len(planned)
    assert all(len(records[p.id].turns) == len(p.turns) for p in planned)
    counters = stats["counters"]
    assert counters.get("admission_paused", 0) <= counters.get("admission_resumed", 0) + len(planned)
