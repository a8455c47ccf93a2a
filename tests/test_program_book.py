"""The program book on its own: no vLLM, no sleeps (a fake clock). Ranks, the wait bound, admission,
pins and who may take them, and the queue order over plain objects."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from agentserve.options import AdmissionOptions, SchedulerConfig
from agentserve.programs.book import ProgramBook


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def book(clock: Clock, **config) -> ProgramBook:
    return ProgramBook(SchedulerConfig(**config), total_blocks=100, block_size=32, max_model_len=4096, clock=clock)


def pinned(b: ProgramBook, program: str, rid: str, blocks: int, ttl: float = 10.0) -> None:
    """A turn of `program` arrives, finishes, and pins `blocks` blocks."""
    b.arrive(rid, program, 64)
    releases, t = b.leave(rid, program, 64, aborted=False, is_last=False, ttl_s=ttl)
    assert t == ttl
    inserted, _ = b.pin(program, list(range(blocks)), t)
    assert inserted


def test_a_program_keeps_its_arrival_rank_and_lone_requests_get_their_own():
    b = book(Clock())
    assert b.arrive("a0", "A", 10) == 0
    assert b.arrive("x", None, 10) == 1  # a lone request is a one-turn program
    assert b.arrive("b0", "B", 10) == 2
    assert b.arrive("a1", "A", 10) == 0
    b.end("A")
    assert b.arrive("a2", "A", 10) == 3  # an ended program that comes back is a new arrival


def test_a_finished_turn_pins_for_its_ttl_and_the_next_turn_consumes_it():
    clock = Clock()
    b = book(clock)
    pinned(b, "A", "a0", blocks=4, ttl=5.0)
    assert b.holds_pin("A") and b.counters["pins_created"] == 1 and b.reorder_due
    b.arrive("a1", "A", 200)
    (release,) = b.started("a1", "A", cached_tokens=128, prompt_tokens=200, arrival_time=clock.now)
    assert release.reason == "consumed" and b.counters["pinned_tokens_served"] == 128
    assert not b.holds_pin("A")


@pytest.mark.parametrize("is_last, ttl", [(True, 5.0), (False, 0.0)])
def test_a_last_turn_or_a_zero_ttl_pins_nothing_and_drops_the_old_pin(is_last, ttl):
    b = book(Clock())
    pinned(b, "A", "a0", blocks=4)
    b.arrive("a1", "A", 64)
    releases, t = b.leave("a1", "A", 64, aborted=False, is_last=is_last, ttl_s=ttl)
    assert t == 0 and [r.reason for r in releases] == ["replaced"]


def test_an_aborted_turn_releases_its_program_pin():
    b = book(Clock())
    pinned(b, "A", "a0", blocks=4)
    b.arrive("a1", "A", 64)
    releases, t = b.leave("a1", "A", 64, aborted=True, is_last=False, ttl_s=5.0)
    assert t == 0 and [r.reason for r in releases] == ["abort"] and b.idle


def test_pins_expire_on_the_clock_unless_their_program_waits():
    clock = Clock()
    b = book(clock)
    pinned(b, "A", "a0", blocks=2, ttl=1.0)
    pinned(b, "B", "b0", blocks=2, ttl=1.0)
    assert b.expire(lambda: set()) == []
    clock.now += 1.5
    released = b.expire(lambda: {"B"})  # B has a request waiting: its pin waits for it
    assert [r.pin.program_id for r in released] == ["A"] and b.holds_pin("B")


def test_soft_pins_go_latest_program_first_the_askers_own_last():
    b = book(Clock(), pin_mode="soft")
    pinned(b, "A", "a0", 2)
    pinned(b, "B", "b0", 2)
    first = b.release_for("B", 1, running=False, preempted=False, arrival_time=b.clock())
    assert first.pin.program_id == "A" and first.reason == "pressure"  # B's own pin goes last
    assert b.release_for("B", 1, running=False, preempted=False, arrival_time=b.clock()).pin.program_id == "B"
    assert b.release_for("B", 1, running=False, preempted=False, arrival_time=b.clock()) is None
    assert b.counters["pin_waits"] == 1


def test_ordered_pins_a_waiting_request_takes_only_later_programs_pins_until_overdue():
    clock = Clock()
    b = book(clock, pin_mode="ordered", max_wait_s=0.5)
    pinned(b, "A", "a0", 2)  # rank 0
    b.arrive("c0", "C", 64)  # rank 1, waiting
    asked = clock.now
    assert b.release_for("C", 1, running=False, preempted=False, arrival_time=asked) is None
    assert b.release_for("C", 1, running=True, preempted=False, arrival_time=asked) is not None  # running may
    pinned(b, "A", "a1", 2)
    clock.now += 1.0  # C is overdue now
    assert b.release_for("C", 1, running=False, preempted=False, arrival_time=asked).pin.program_id == "A"


def test_the_wait_bound_marks_requests_once_and_only_after_the_bound():
    clock = Clock()
    b = book(clock, max_wait_s=0.5)
    b.arrive("a0", "A", 10)
    b.age([("a0", clock.now)])
    assert not b.reorder_due and not b.overdue(clock.now)
    clock.now += 0.6
    b.age([("a0", clock.now - 0.6)])
    assert b.reorder_due and b.counters["requests_aged"] == 1 and b.overdue(clock.now - 0.6)
    b.reorder_due = False
    clock.now += 0.1
    b.age([("a0", clock.now - 0.7)])
    assert not b.reorder_due and b.counters["requests_aged"] == 1  # counted once


def test_no_wait_bound_means_nothing_is_overdue():
    clock = Clock()
    b = book(clock, max_wait_s=0.0)
    assert not b.overdue(clock.now - 1e6)


def test_admission_holds_a_new_program_while_admitted_contexts_fill_the_budget():
    clock = Clock()
    # budget 100 blocks x 32 = 3200 tokens; share 0.5 -> 1600; expected peak 0.25 x 4096 = 1024
    b = book(clock, admission=AdmissionOptions(mode="on", share=0.5, max_hold_s=10.0))
    b.arrive("a0", "A", 1000)
    assert b.may_start("a0", 1000, clock.now)  # nothing admitted: always
    b.arrive("b0", "B", 1000)
    assert not b.may_start("b0", 1000, clock.now) and b.counters["admission_held"] == 1
    b.arrive("b1", "B", 1000)  # a second request of the held program is held with it
    assert not b.may_start("b1", 1000, clock.now)
    assert not b.may_start("b0", 1000, clock.now) and b.counters["admission_held"] == 2  # counted per request
    clock.now += 11.0  # past the hold bound
    assert b.may_start("b0", 1000, clock.now - 11.0)
    assert [e["kind"] for e in b.stats()["events"]].count("admission_hold") == 2


def test_admission_stops_counting_an_inferred_conversation_silent_past_its_expected_next_turn():
    """Nobody ends an inferred program: counted until the control plane ends it, a finished
    conversation would hold newer programs out (the BFCL TTFT tail, docs/benchmarks.md). A named
    program idle as long still counts: its client says when it ends."""
    from agentserve.programs.book import INFERRED_QUIET_FACTOR
    from agentserve.programs.fields import XARG_INFERRED, XARG_NEXT_USE, XARG_PROGRAM

    clock = Clock()
    b = book(clock, admission=AdmissionOptions(mode="on", share=0.5, max_hold_s=10.0))
    b.arrive_request("c0", {XARG_PROGRAM: "conv-1", XARG_INFERRED: True}, 1000)
    assert b.may_start("c0", 1000, clock.now) and "conv-1" in b.admission  # gated like any program
    b.started("c0", "conv-1", 0, 1000, clock.now)
    b.leave_request("c0", {XARG_PROGRAM: "conv-1", XARG_INFERRED: True, XARG_NEXT_USE: 2.0}, 1100, aborted=False)
    b.arrive("b0", "B", 1000)
    clock.now += INFERRED_QUIET_FACTOR * 2.0 - 0.1
    assert not b.may_start("b0", 1000, clock.now - 0.1)  # within its expected gap: it keeps its room
    clock.now += 0.2
    assert b.may_start("b0", 1000, clock.now - 0.3) and "conv-1" not in b.admission  # silent past it
    # its late next turn asks again, like a new program (held: B fills the budget now)
    b.arrive_request("c1", {XARG_PROGRAM: "conv-1", XARG_INFERRED: True}, 1200)
    assert not b.may_start("c1", 1200, clock.now)

    named = book(clock, admission=AdmissionOptions(mode="on", share=0.5, max_hold_s=10.0))
    named.arrive("a0", "A", 1000)
    assert named.may_start("a0", 1000, clock.now)
    named.started("a0", "A", 0, 1000, clock.now)
    named.leave_request("a0", {XARG_PROGRAM: "A", XARG_NEXT_USE: 2.0}, 1100, aborted=False)
    named.arrive("b0", "B", 1000)
    clock.now += INFERRED_QUIET_FACTOR * 2.0 + 0.1
    assert not named.may_start("b0", 1000, clock.now) and "A" in named.admission


def test_ranks_of_idle_programs_are_forgotten_past_the_cap(monkeypatch):
    import agentserve.programs.book as module

    monkeypatch.setattr(module, "MAX_PROGRAM_RANKS", 8)
    b = book(Clock())
    pinned(b, "KEEP", "k0", 2)
    for i in range(20):
        b.arrive(f"r{i}", f"P{i}", 10)
        b.leave(f"r{i}", f"P{i}", 10, aborted=False, is_last=True, ttl_s=0.0)
    assert len(b._ranks) <= 8 and b.rank("KEEP") == 0 and b.counters["program_ranks_forgotten"] > 0


def test_the_book_tells_when_each_programs_kv_is_needed_again():
    clock = Clock()
    b = book(clock)
    b.arrive("a0", "A", 64)
    assert b.next_use.seconds_until("A") == 0.0  # in the engine
    b.leave("a0", "A", 64, aborted=False, is_last=False, ttl_s=0.0, next_use_s=30.0)
    assert b.next_use.seconds_until("A") == 30.0  # its tool is predicted to take 30 s
    b.arrive("a1", "A", 64)
    b.leave("a1", "A", 64, aborted=False, is_last=True, ttl_s=0.0)
    assert b.next_use.seconds_until("A") == math.inf  # a last turn: never
    b.arrive("b0", "B", 64)
    b.leave("b0", "B", 64, aborted=False, is_last=False, ttl_s=0.0, next_use_s=5.0)
    b.end("B")
    assert b.next_use.seconds_until("B") == math.inf


def test_every_release_is_counted_and_traced():
    b = book(Clock())
    pinned(b, "A", "a0", 2)
    pinned(b, "B", "b0", 2)
    b.end("A")
    b.release_all("program_end")
    stats = b.stats()
    assert stats["counters"]["pins_released_program_end"] == 2 and stats["pins"] == 0
    assert [e["kind"] for e in stats["events"]].count("unpin") == 2 and b.stats()["events"] == []


@dataclass
class Waiting:
    name: str
    program: str | None
    priority: int
    arrival_time: float
    num_preemptions: int = 0


def test_program_fcfs_orders_preempted_overdue_pinned_then_program_arrival():
    from agentserve.engine.program_queue import ProgramQueue
    from agentserve.programs.queue_order import ProgramFCFS

    clock = Clock()
    b = book(clock, max_wait_s=0.5)
    pinned(b, "P", "p0", 2)
    queue = ProgramQueue(ProgramFCFS(b, lambda r: r.program))
    now = clock.now
    for w in (Waiting("late", "L", 9, now), Waiting("early", "E", 1, now), Waiting("pinned", "P", 5, now),
              Waiting("overdue-2", "O", 8, now - 2.0), Waiting("overdue-1", "Q", 2, now - 1.0),
              Waiting("preempted", "R", 7, now, num_preemptions=1)):
        queue.add_request(w)
    assert [w.name for w in queue] == ["preempted", "overdue-2", "overdue-1", "pinned", "early", "late"]


def test_a_request_outliving_its_programs_end_leaves_nothing_behind():
    """The race behind a program counted live after its end: its request finished (and pinned) after
    the end, or reached the engine after it, and brought the program back."""
    b = book(Clock())
    b.arrive("r1", "A", 64, life=1)
    assert b.command("end", {"program_id": "A", "life": 1}) == []
    assert b.leave("r1", "A", 64, aborted=False, is_last=False, ttl_s=30.0) == ([], 0.0)  # no pin
    b.arrive("late", "A", 64, life=1)  # begun before the end, arrived after it
    assert b.holds("A") == [] and b.started("late", "A", 0, 64, 1000.0) == []
    assert b.leave("late", "A", 64, aborted=False, is_last=False, ttl_s=30.0) == ([], 0.0)
    assert b.holds("A") == [] and b.idle and b.counters["requests_outliving_program_end"] == 2
    b.arrive("next", "A", 64, life=2)  # the id begun again: a new life, served as a program
    assert b.leave("next", "A", 64, aborted=False, is_last=False, ttl_s=30.0)[1] == 30.0


def test_an_older_lifes_late_end_or_abort_leaves_the_newer_life_alone():
    b = book(Clock())
    pinned(b, "A", "r1", 2)
    b.arrive("r2", "A", 64, life=3)  # life 3 got here before life 2's end (another process's delay)
    assert b.command("release", {"program_id": "A", "reason": "abort", "life": 2}) == []
    assert b.command("end", {"program_id": "A", "life": 2}) == []
    assert set(b.holds("A")) == {"rank", "requests", "pin", "next_use"}
    assert b.leave("r2", "A", 64, aborted=False, is_last=False, ttl_s=5.0)[1] == 5.0
