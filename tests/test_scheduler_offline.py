"""agentserve's scheduler plugin on vLLM's real scheduler classes, without an engine (a stub model
samples one token per computed prompt): program FCFS order, the wait bound, pin and consume."""

from __future__ import annotations

import itertools
import time

import pytest

from agentserve.engine import offline
from agentserve.engine.offline import step
from agentserve.engine.settings import EngineSettings
from agentserve.programs.fields import XARG_CONVERSATION, XARG_IS_LAST, XARG_PROGRAM, XARG_TTL

pytestmark = pytest.mark.usefixtures("both_schedulers")
PLUGIN = "agentserve.engine.scheduler.ProgramScheduler"
_tokens = itertools.count(100)


def make(max_wait_s: float = 2.0, max_num_seqs: int = 8, **options):
    """The plugin on vLLM's scheduler; `options`: more of the plugin's config (SchedulerConfig's fields)."""
    settings = EngineSettings(model="tiny", kv_tokens=4096, max_model_len=2048, max_num_seqs=max_num_seqs,
                              scheduling_policy="priority", scheduler_cls=PLUGIN,
                              additional_config={"agentserve": {"pin_cap_share": 0.5, "max_wait_s": max_wait_s,
                                                                **options}})
    return offline.build_scheduler(settings)


def request(hasher, rid: str, program: str, prompt: list[int], *, last=False, ttl=60.0, age_s=0.0, out=4):
    from vllm import SamplingParams
    from vllm.v1.request import Request

    params = SamplingParams(max_tokens=out, ignore_eos=True,
                            extra_args={XARG_PROGRAM: program, XARG_IS_LAST: last, XARG_TTL: ttl})
    return Request(rid, prompt, params, None, arrival_time=time.time() - age_s, block_hasher=hasher)


def run_until_done(scheduler, limit=200) -> list[str]:
    done = []
    for _ in range(limit):
        if not scheduler.has_requests():
            return done
        done += step(scheduler, lambda: next(_tokens) % 4000)[1]
    raise AssertionError("requests did not finish")


def prompt(n: int, base: int) -> list[int]:
    return [(base + i) % 3900 + 10 for i in range(n)]


@pytest.mark.parametrize("order, expected", [("program", ["a0", "a1", "b0"]),  # A arrived first: all of A first
                                             ("arrival", ["a0", "b0", "a1"])])  # the switch: stock vLLM's FCFS
def test_waiting_queue_is_program_fcfs(order, expected):
    s, h = make(order=order)
    for r in (request(h, "a0", "A", prompt(64, 0)), request(h, "b0", "B", prompt(64, 1000)),
              request(h, "a1", "A", prompt(64, 2000))):
        s.add_request(r)
    assert [r.request_id for r in s.waiting] == expected


def test_overdue_request_is_served_before_program_order():
    s, h = make(max_wait_s=0.5, max_num_seqs=1)
    s.add_request(request(h, "a0", "A", prompt(64, 0)))  # program A: rank 0
    s.add_request(request(h, "b0", "B", prompt(64, 1000), age_s=5.0))  # rank 1, but waited 5 s
    out, _ = step(s, lambda: 7)
    assert [r.req_id for r in out.scheduled_new_reqs] == ["b0"]
    assert s.book.counters["requests_aged"] == 1
    run_until_done(s)
    assert not s.book._aged  # no per-request state survives the request


def test_overdue_requests_are_first_come_first_served_among_themselves():
    s, h = make(max_wait_s=0.5, max_num_seqs=1)
    s.add_request(request(h, "a0", "A", prompt(64, 0), age_s=3.0))  # program A: rank 0, waited 3 s
    s.add_request(request(h, "b0", "B", prompt(64, 1000), age_s=5.0))  # rank 1, waited 5 s
    out, _ = step(s, lambda: 7)
    assert [r.req_id for r in out.scheduled_new_reqs] == ["b0"]  # the longer wait goes first
    run_until_done(s)


def test_no_wait_bound_keeps_program_order():
    s, h = make(max_wait_s=0.0, max_num_seqs=1)
    s.add_request(request(h, "a0", "A", prompt(64, 0)))
    s.add_request(request(h, "b0", "B", prompt(64, 1000), age_s=5.0))
    out, _ = step(s, lambda: 7)
    assert [r.req_id for r in out.scheduled_new_reqs] == ["a0"]


def test_pin_is_consumed_by_the_next_turn_and_end_leaves_nothing():
    s, h = make()
    first = prompt(256, 0)
    s.add_request(request(h, "a0", "A", first))
    run_until_done(s)
    assert len(s.book.pins) == 1 and s.book.pins.pinned_blocks == 256 // 32
    s.add_request(request(h, "a1", "A", first + prompt(40, 500), last=True))
    out, _ = step(s, lambda: 7)
    (new,) = out.scheduled_new_reqs
    assert new.num_computed_tokens == 256  # the whole pinned context came back as a prefix hit
    assert len(s.book.pins) == 0 and s.book.counters["pins_released_consumed"] == 1
    run_until_done(s)
    stats = s.command("end", {"program_id": "A"})
    assert stats["pins"] == 0 and stats["pinned_blocks"] == 0 and stats["programs"] == 0


@pytest.mark.parametrize("bad", [{"command": "nope"}])
def test_unknown_control_command_is_an_error(bad):
    s, _ = make()
    with pytest.raises(ValueError, match="unknown agentserve control command"):
        s.command(bad["command"], {})


def pressure_setup(pin_mode: str, max_wait_s: float = 2.0, cap: float = 0.5):

    settings = EngineSettings(model="tiny", kv_tokens=4096, max_model_len=4096, max_num_seqs=8,
                              scheduling_policy="priority", scheduler_cls=PLUGIN,
                              additional_config={"agentserve": {"pin_cap_share": cap, "max_wait_s": max_wait_s,
                                                                "pin_mode": pin_mode}})
    s, h = offline.build_scheduler(settings)
    s.add_request(request(h, "a0", "A", prompt(2048, 0)))  # program A: rank 0, pins 64 of 128 blocks
    run_until_done(s)
    assert s.book.pins.pinned_blocks == 64
    return s, h


def test_soft_pins_yield_to_any_request_under_pressure():
    s, h = pressure_setup("soft")
    s.add_request(request(h, "b0", "B", prompt(2500, 3000)))  # needs 79 blocks, 64 are free
    out, _ = step(s, lambda: 7)
    assert [r.req_id for r in out.scheduled_new_reqs] == ["b0"]
    assert s.book.counters["pins_released_pressure"] == 1 and len(s.book.pins) == 0


def test_ordered_pins_make_a_later_program_wait_until_its_bound():
    s, h = pressure_setup("ordered", max_wait_s=0.3)
    s.add_request(request(h, "b0", "B", prompt(2500, 3000)))
    out, _ = step(s, lambda: 7)
    assert not out.scheduled_new_reqs and len(s.book.pins) == 1  # A's KV stays; B waits
    assert s.book.counters["pin_waits"] >= 1
    time.sleep(0.35)  # B is now past the wait bound: it may free A's pin
    out, _ = step(s, lambda: 7)
    assert [r.req_id for r in out.scheduled_new_reqs] == ["b0"] and len(s.book.pins) == 0
    run_until_done(s)


def test_ordered_pins_yield_to_an_earlier_program():
    s, h = pressure_setup("ordered", max_wait_s=60, cap=1.0)
    s.add_request(request(h, "b0", "B", prompt(512, 3000), ttl=60))  # B (rank 1) runs and pins 16 blocks
    run_until_done(s)
    assert set(s.book.pins.pins) == {"A", "B"}
    # A's next turn needs more than is free: B's pin (a later program) goes, A's own stays to be hit
    s.add_request(request(h, "a1", "A", prompt(2048, 0) + prompt(1600, 7000), last=True))  # 50 new blocks, 48 free
    out, _ = step(s, lambda: 7)
    assert [r.req_id for r in out.scheduled_new_reqs] == ["a1"]
    assert s.book.counters["pins_released_pressure"] == 1 and s.book.counters["pins_released_consumed"] == 1


def test_program_ranks_stay_bounded_without_program_ends(monkeypatch):
    import agentserve.programs.book as plugin

    monkeypatch.setattr(plugin, "MAX_PROGRAM_RANKS", 8)
    s, h = make()
    for i in range(20):  # a client that never ends its programs (vllm_xargs straight to the engine)
        s.add_request(request(h, f"r{i}", f"P{i}", prompt(40, 100 * i), last=True))
        run_until_done(s)
        assert len(s.book._ranks) <= 8
    assert s.book.counters["program_ranks_forgotten"] > 0 and not s.book._live


def test_live_and_pinned_programs_keep_their_rank(monkeypatch):
    import agentserve.programs.book as plugin

    monkeypatch.setattr(plugin, "MAX_PROGRAM_RANKS", 4)
    s, h = make()
    s.add_request(request(h, "keep", "KEEP", prompt(128, 0)))  # pinned after it finishes
    run_until_done(s)
    rank = s.book._ranks["KEEP"]
    for i in range(10):
        s.add_request(request(h, f"r{i}", f"P{i}", prompt(40, 300 + 100 * i), last=True))
        run_until_done(s)
    assert s.book._ranks["KEEP"] == rank and "KEEP" in s.book.pins


def test_pin_release_during_admission_keeps_the_admitted_request_at_the_head(monkeypatch):
    """vLLM peeks the waiting head, allocates for it, then pops the head: a pin released inside that
    allocation must not re-key the queue in between (here a request crosses its wait bound meanwhile
    and would jump ahead, so vLLM would run it without blocks and leave the other half-allocated)."""
    s, h = pressure_setup("soft", max_wait_s=2.0)
    s.add_request(request(h, "b0", "B", prompt(2500, 3000)))  # the head: needs A's pinned blocks
    s.add_request(request(h, "c0", "C", prompt(64, 9000), age_s=1.8))  # later program, near its bound
    allocate = s._allocate

    def slow_allocate(req, *args, **kwargs):
        if req.request_id == "b0" and len(s.book.pins):
            time.sleep(0.3)  # c0 crosses the bound while b0 is being allocated
        return allocate(req, *args, **kwargs)

    monkeypatch.setattr(s, "_allocate", slow_allocate)
    out, _ = step(s, lambda: 7)
    assert out.scheduled_new_reqs[0].req_id == "b0" and s.book.counters["pins_released_pressure"] == 1
    for new in out.scheduled_new_reqs:  # everything admitted got its blocks
        assert s.kv_cache_manager.get_blocks(new.req_id).get_block_ids()[0]
    run_until_done(s)
    s.command("release_all", {})
    assert s.kv_cache_manager.block_pool.get_num_free_blocks() == s.kv_cache_manager.block_pool.num_gpu_blocks - 1


@pytest.mark.parametrize("one_off_blocks", ["evict-first", "lru"])
def test_a_last_turns_blocks_are_evicted_before_a_returning_programs(one_off_blocks):
    """vLLM frees blocks to the back of its LRU queue in finishing order; the plugin moves the blocks
    nobody asks for again (a last turn's) to the front, ahead of a program that will come back. The
    switch `lru` leaves vLLM's order."""
    s, h = make(one_off_blocks=one_off_blocks)
    s.add_request(request(h, "done0", "DONE", prompt(96, 0), last=True, out=8))  # finishes last
    s.add_request(request(h, "back0", "BACK", prompt(96, 1000), ttl=0.0, out=2))  # no pin, but returns
    step(s, lambda: 7)
    done_blocks = {b.block_id for b in s.kv_cache_manager.get_blocks("done0").blocks[0] if b.block_hash is not None}
    back_blocks = {b.block_id for b in s.kv_cache_manager.get_blocks("back0").blocks[0] if b.block_hash is not None}
    assert len(done_blocks) == len(back_blocks) == 3  # the prompts' full blocks, prefix-cached
    run_until_done(s)
    order = [b.block_id for b in s.kv_cache_manager.block_pool.free_block_queue.get_all_free_blocks()]
    if one_off_blocks == "lru":  # finishing order: back0 (2 tokens out) before done0 (8)
        assert max(order.index(b) for b in back_blocks) < min(order.index(b) for b in done_blocks)
        assert s.book.counters["blocks_evicted_first"] == 0
        return
    assert max(order.index(b) for b in done_blocks) < min(order.index(b) for b in back_blocks)
    assert s.book.counters["blocks_evicted_first"] == len(done_blocks)


def test_a_first_turn_that_may_return_keeps_vllms_order_and_a_one_off_goes_first():
    """A request of no program is a one-off (its blocks first to go), unless the front end says it may be a
    conversation's first turn (XARG_CONVERSATION): its next turn may need them, so they keep vLLM's order."""
    from vllm import SamplingParams
    from vllm.v1.request import Request

    s, h = make()
    for rid, base, xargs, out in (("maybe0", 0, {XARG_CONVERSATION: "conv-1"}, 2), ("once0", 1000, {}, 8)):
        s.add_request(Request(rid, prompt(96, base), SamplingParams(max_tokens=out, ignore_eos=True, extra_args=xargs),
                              None, arrival_time=time.time(), block_hasher=h))
    step(s, lambda: 7)
    blocks = {rid: {b.block_id for b in s.kv_cache_manager.get_blocks(rid).blocks[0] if b.block_hash is not None}
              for rid in ("maybe0", "once0")}
    run_until_done(s)
    order = [b.block_id for b in s.kv_cache_manager.block_pool.free_block_queue.get_all_free_blocks()]
    assert max(order.index(b) for b in blocks["once0"]) < min(order.index(b) for b in blocks["maybe0"])
    assert s.book.counters["blocks_evicted_first"] == len(blocks["once0"]) == 3


@pytest.mark.parametrize("order, expected", [("critical-path", ["c-long", "c-short", "l0"]),
                                             ("workflow", ["c-short", "c-long", "l0"]),
                                             ("program", ["l0", "c-short", "c-long"])])
def test_a_workflows_sub_agents_overtake_a_later_workflows_turns(order, expected):
    """Workflow R starts, then workflow L; then R's two sub-agents arrive. With a workflow order they
    keep R's rank and go before L (the longer first under critical-path); under program order they
    are new programs, after L."""
    from vllm import SamplingParams
    from vllm.v1.request import Request

    from agentserve.programs.fields import XARG_REMAINING, XARG_WORKFLOW

    settings = EngineSettings(model="tiny", kv_tokens=4096, max_model_len=2048, max_num_seqs=1,
                              scheduling_policy="priority", scheduler_cls=PLUGIN,
                              additional_config={"agentserve": {"max_wait_s": 0.0, "order": order}})
    s, h = offline.build_scheduler(settings)

    def add(rid, program, workflow, base, remaining=0.0):
        params = SamplingParams(max_tokens=2, ignore_eos=True, extra_args={
            XARG_PROGRAM: program, XARG_IS_LAST: False, XARG_TTL: 0.0, XARG_WORKFLOW: workflow,
            XARG_REMAINING: remaining})
        s.add_request(Request(rid, prompt(64, base), params, None, arrival_time=time.time(), block_hasher=h))

    add("r0", "R", "R", 0)
    run_until_done(s)  # R's first turn: it spawns
    add("l0", "L", "L", 1000)  # a later workflow's first turn arrives first ...
    add("c-short", "R.a", "R", 2000, remaining=3.0)  # ... then R's sub-agents
    add("c-long", "R.b", "R", 3000, remaining=9.0)
    started = []
    while s.has_requests():
        out, _ = step(s, lambda: 7)
        started += [r.req_id for r in out.scheduled_new_reqs]
    assert started == expected


@pytest.mark.parametrize("policy, preempted", [("priority", "l0"), ("fcfs", "c0")])
def test_vllm_scheduling_decides_whom_memory_pressure_preempts(policy, preempted):
    """Workflow R's sub-agent C keeps R's rank, ahead of the later workflow L, but is scheduled after L.
    When their decodes run out of blocks, vLLM's priority policy (the plugin's default) preempts the
    later program, L; the switch `fcfs` gives vLLM's own choice: the request it scheduled last, C."""
    from vllm import SamplingParams
    from vllm.v1.core.sched.request_queue import SchedulingPolicy
    from vllm.v1.request import Request

    from agentserve.programs.fields import XARG_WORKFLOW

    settings = EngineSettings(model="tiny", kv_tokens=4096, max_model_len=4096, max_num_seqs=8,
                              scheduling_policy=policy, scheduler_cls=PLUGIN,
                              additional_config={"agentserve": {"max_wait_s": 0.0}})
    s, h = offline.build_scheduler(settings)
    assert s.policy == SchedulingPolicy(policy)

    def add(rid, program, workflow, base, n, out):
        params = SamplingParams(max_tokens=out, ignore_eos=True, extra_args={
            XARG_PROGRAM: program, XARG_IS_LAST: False, XARG_TTL: 0.0, XARG_WORKFLOW: workflow})
        s.add_request(Request(rid, prompt(n, base), params, None, arrival_time=time.time(), block_hasher=h))

    add("r0", "R", "R", 0, 64, 2)
    run_until_done(s)  # R's first turn: R's rank is the earliest
    add("l0", "L", "L", 1000, 1800, 400)
    step(s, lambda: 7)  # L runs first ...
    add("c0", "R.c", "R", 3000, 1800, 400)  # ... then R's sub-agent joins it: 2 x 57 of 128 blocks
    for _ in range(400):
        step(s, lambda: 7)
        hit = [r for r in ("l0", "c0") if s.requests.get(r) is not None and s.requests[r].num_preemptions]
        if hit:
            break
    assert hit == [preempted]
    run_until_done(s, limit=2000)


def test_requests_waiting_for_their_kv_keep_their_programs_pin_and_age():
    """vLLM's second waiting queue (`kv_holding_waiting`: requests whose KV a connector is loading, e.g.
    from the host tier) counts for pin expiry and the wait bound, as `waiting` does."""
    s, h = make(max_wait_s=1.0)
    now = [time.time()]
    s.book.clock = lambda: now[0]
    s.add_request(request(h, "a0", "A", prompt(128, 0), ttl=2.0))
    run_until_done(s)
    assert "A" in s.book.pins
    held = request(h, "a1", "A", prompt(128, 0) + prompt(40, 700))
    s.add_request(held)
    s.waiting.remove_request(held)
    s.kv_holding_waiting.add_request(held)  # where vLLM queues it while a connector loads its KV
    now[0] += 5.0  # past the pin's TTL and the request's wait bound
    s.command("tick", {})
    assert "A" in s.book.pins, "the pin of a program whose next turn waits does not expire"
    step(s, lambda: 7)
    assert s.book.counters["requests_aged"] == 1
    assert isinstance(s.kv_holding_waiting, type(s.waiting))  # program order in both queues


def test_the_plugin_follows_vllms_async_decision(both_schedulers):
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler

    from agentserve.engine.scheduler import ProgramScheduler

    s, _ = make()
    assert isinstance(s, ProgramScheduler)
    assert isinstance(s, AsyncScheduler) == (both_schedulers == "async")
