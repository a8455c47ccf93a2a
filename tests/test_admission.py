"""Program admission (agentserve/programs/admission.py): the policy alone, then on vLLM's real
scheduler (no engine): a new program waits while admitted programs' contexts fill the share, an
admitted program is never held, the hold is bounded, and ending a program lets the next one in."""

from __future__ import annotations

import time

import pytest

from agentserve.programs.admission import AdmissionGate


def test_the_gate_admits_while_contexts_fit_then_holds():
    gate = AdmissionGate(1000, 0.8, max_hold_s=10, idle_s=30)
    assert gate.admits("A", 500, 0, now=0) and gate.counters["admitted_idle"] == 1
    gate.started("A", 500, 0)
    assert gate.admits("B", 300, 0, now=1) and gate.load == 800
    gate.started("B", 300, 1)
    assert not gate.admits("C", 100, 5, now=2)  # 900 > 800
    assert gate.admits("A", 5000, 0, now=2)  # admitted programs are never held
    gate.end("B")
    assert gate.admits("C", 100, 5, now=3) and "C" in gate


def test_the_hold_is_bounded():
    gate = AdmissionGate(1000, 0.5, max_hold_s=10, idle_s=30)
    gate.admits("A", 500, 0, now=0)
    gate.started("A", 500, 0)
    assert not gate.admits("B", 100, 9.9, now=1)
    assert gate.admits("B", 100, 10.0, now=1) and gate.counters["admitted_overdue"] == 1
    unbounded = AdmissionGate(1000, 0.5, max_hold_s=0, idle_s=30)
    unbounded.admits("A", 500, 0, now=0)
    unbounded.started("A", 500, 0)
    assert not unbounded.admits("B", 100, 1e6, now=1)


def test_contexts_grow_and_idle_programs_leave():
    gate = AdmissionGate(1000, 1.0, idle_s=30)
    gate.admits("A", 200, 0, now=0)
    gate.started("A", 200, 0)
    gate.finished("A", 900, 5)  # its context grew by its turn's output and observation
    assert gate.load == 900 and not gate.admits("B", 200, 0, now=10)
    gate.started("A", 950, 11)  # still running at 50 s: not idle
    assert not gate.admits("B", 200, 0, now=50)
    gate.finished("A", 1000, 51)
    assert gate.admits("B", 200, 0, now=82) and "A" not in gate and gate.counters["expired_idle"] == 1


def test_footprints_use_the_learned_peak_of_ended_programs():
    gate = AdmissionGate(10_000, 1.0, default_peak=4000)
    assert gate.admits("A", 100, 0, now=0) and gate.load == 4000  # cold start: the default peak
    assert gate.admits("B", 100, 0, now=0) and gate.load == 8000
    assert not gate.admits("C", 100, 0, now=0)
    gate.finished("A", 1000, 1)
    gate.end("A")  # A peaked at 1,000 tokens: programs are expected to be that big now
    assert gate.expected_peak == 1000 and gate.load == 1000
    assert gate.admits("C", 100, 0, now=2) and gate.admits("D", 100, 0, now=2)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        AdmissionGate(0, 0.5)
    with pytest.raises(ValueError):
        AdmissionGate(1000, 0)


# ---- on vLLM's scheduler -------------------------------------------------------------------------

def admission_scheduler(share: float, max_hold_s: float = 60.0):
    from agentserve.engine import offline
    from agentserve.engine.settings import EngineSettings

    return offline.build_scheduler(EngineSettings(
        model="tiny", kv_tokens=4096, max_model_len=4096, max_num_seqs=8, scheduling_policy="priority",
        scheduler_cls="agentserve.engine.scheduler.ProgramScheduler",
        additional_config={"agentserve": {"pin_cap_share": 0.5, "max_wait_s": 2.0, "admission": {"mode": "on", "share": share,
                                                                                        "max_hold_s": max_hold_s}}}))


@pytest.mark.usefixtures("both_schedulers")
def test_a_new_program_waits_for_an_admitted_one_to_end():
    from tests.test_scheduler_offline import prompt, request, run_until_done, step

    s, h = admission_scheduler(0.5)  # 2048 of 4096 tokens
    s.add_request(request(h, "a0", "A", prompt(1500, 0)))
    s.add_request(request(h, "b0", "B", prompt(800, 2000)))  # 1500 + 800 > 2048: B waits
    out, _ = step(s, lambda: 7)
    assert [r.req_id for r in out.scheduled_new_reqs] == ["a0"]
    assert s.book.counters["admission_held"] == 1 and len(s.waiting) == 1
    finished = []
    for _ in range(20):  # A runs to completion; B is still held (A's context still counts)
        finished += step(s, lambda: 7)[1]
    assert "a0" in finished and [r.request_id for r in s.waiting] == ["b0"]
    s.add_request(request(h, "a1", "A", prompt(1500, 0) + prompt(100, 3000), last=True))
    out, _ = step(s, lambda: 7)
    assert [r.req_id for r in out.scheduled_new_reqs] == ["a1"]  # an admitted program is never held
    for _ in range(20):
        step(s, lambda: 7)
    s.command("end", {"program_id": "A"})
    out, _ = step(s, lambda: 7)
    assert [r.req_id for r in out.scheduled_new_reqs] == ["b0"]
    run_until_done(s)
    stats = s.command("tick", {})
    assert stats["counters"]["admission_admitted_idle"] == 2 and stats["counters"]["admission_ended"] == 1  # A, then B


@pytest.mark.usefixtures("both_schedulers")
def test_a_held_program_is_admitted_past_the_hold_bound():
    from tests.test_scheduler_offline import prompt, request, step

    s, h = admission_scheduler(0.5, max_hold_s=0.3)
    s.add_request(request(h, "a0", "A", prompt(1500, 0)))
    s.add_request(request(h, "b0", "B", prompt(800, 2000)))
    step(s, lambda: 7)
    time.sleep(0.35)
    admitted = []
    for _ in range(5):
        admitted += [r.req_id for r in step(s, lambda: 7)[0].scheduled_new_reqs]
    assert "b0" in admitted and s.book.admission.counters["admitted_overdue"] == 1


@pytest.mark.usefixtures("both_schedulers")
def test_without_a_share_every_program_starts_at_once():
    from tests.test_scheduler_offline import prompt, request, step

    s, h = admission_scheduler(0.0)
    s.add_request(request(h, "a0", "A", prompt(1500, 0)))
    s.add_request(request(h, "b0", "B", prompt(800, 2000)))
    out, _ = step(s, lambda: 7)
    assert {r.req_id for r in out.scheduled_new_reqs} == {"a0", "b0"} and s.book.admission is None


@pytest.mark.usefixtures("both_schedulers")
def test_a_second_request_of_a_held_program_is_held_too():
    from tests.test_scheduler_offline import prompt, request, step

    s, h = admission_scheduler(0.5)
    s.add_request(request(h, "a0", "A", prompt(1500, 0)))
    s.add_request(request(h, "b0", "B", prompt(800, 2000)))
    step(s, lambda: 7)
    s.add_request(request(h, "b1", "B", prompt(100, 3000)))  # B's parallel call: B is not admitted yet
    out, _ = step(s, lambda: 7)
    assert "b1" not in [r.req_id for r in out.scheduled_new_reqs] and "B" not in s.book.admission


def test_a_host_tier_holds_waiting_programs_so_admission_counts_only_what_it_cannot():
    """Programs in a tool call count for the part of their footprint the host tier cannot hold."""
    gate = AdmissionGate(10_000, 1.0, default_peak=0, host_tokens=6_000)
    for name in ("a", "b"):
        assert gate.admits(name, 4_000, 0.0, 0.0)
        gate.started(name, 4_000, 0.0)
    assert gate.load == 8_000  # both running: all of it on the device
    gate.finished("a", 4_000, 1.0)
    gate.finished("b", 4_000, 1.0)
    assert gate.load == 2_000  # both in tool calls: the tier holds 6,000 of their 8,000
    assert gate.admits("c", 7_000, 0.0, 1.0)  # fits next to what the tier cannot hold
    no_tier = AdmissionGate(10_000, 1.0, default_peak=0)
    for name in ("a", "b"):
        no_tier.admits(name, 4_000, 0.0, 0.0)
        no_tier.started(name, 4_000, 0.0)
        no_tier.finished(name, 4_000, 1.0)
    assert no_tier.load == 8_000 and not no_tier.admits("c", 7_000, 0.0, 1.0)
