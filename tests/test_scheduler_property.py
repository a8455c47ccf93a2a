"""The scheduler plugin on vLLM's real scheduler over random program traffic (hypothesis): any mix of
turns, TTLs, tool pauses, memory pressure and slow steps (the clock moving while vLLM is inside its
waiting loop), with or without program admission, leaves vLLM's allocator consistent, finishes every request, and leaves no pin and no
block behind once the programs end. A fake clock drives the plugin's wait bound and pin expiry."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

import agentserve.engine.scheduler as plugin
from agentserve.engine.offline import build_scheduler, step
from agentserve.engine.settings import EngineSettings
from agentserve.programs.fields import XARG_IS_LAST, XARG_PROGRAM, XARG_TTL

MAX_CONTEXT = 1800  # tokens; the engine below holds 2048 (64 blocks)


class FakeClock:
    """The program book's clock (injected), moved by the test."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def time(self) -> float:
        return self.now


def check_allocator(s) -> None:
    """vLLM's own bookkeeping after a step: a waiting request holds no blocks, a running one does."""
    (manager,) = s.kv_cache_manager.coordinator.single_type_managers
    for request in s.waiting.unordered():
        assert not manager.req_to_blocks.get(request.request_id), f"waiting {request.request_id} holds blocks"
    for request in s.running:
        assert manager.req_to_blocks.get(request.request_id), f"running {request.request_id} has no blocks"


def scheduler_for(pin_mode: str, admission_share: float = 0.0, async_scheduling: bool = False):
    """A fresh scheduler per example, so a failing example shrinks on its own state."""
    return build_scheduler(EngineSettings(
        model="tiny", kv_tokens=2048, max_model_len=2048, max_num_seqs=6, scheduling_policy="priority",
        scheduler_cls=plugin.__name__ + ".ProgramScheduler",
        additional_config={"agentserve": {"pin_cap_share": 0.6, "max_wait_s": 1.0, "pin_mode": pin_mode,
                                          "admission": {"mode": "on" if admission_share else "off", "share": admission_share or 1.0, "max_hold_s": 2.0}}}),
        async_scheduling=async_scheduling)


turn = st.tuples(st.integers(0, 3),            # program
                 st.integers(8, 900),          # new prompt tokens
                 st.booleans(),                # is the last turn
                 st.floats(0, 4),              # TTL the frontend chose
                 st.floats(0, 3),              # clock advance before this turn arrives (tool time)
                 st.sampled_from([0.0, 0.0, 0.4, 0.7, 1.2]))  # clock move per allocation in the next step


@settings(max_examples=300, deadline=None)
@given(turns=st.lists(turn, min_size=1, max_size=16), pin_mode=st.sampled_from(["soft", "ordered"]),
       burst=st.integers(1, 6), admission_share=st.sampled_from([0.0, 0.5, 1.0]), async_scheduling=st.booleans())
def test_random_program_traffic_keeps_the_allocator_consistent(turns, pin_mode, burst, admission_share,
                                                               async_scheduling):
    from vllm import SamplingParams
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.request import Request

    clock = FakeClock()
    s, hasher = scheduler_for(pin_mode, admission_share, async_scheduling)
    assert isinstance(s, AsyncScheduler) == async_scheduling
    s.book.clock = clock.time
    allocate = s._allocate
    slow = {"s": 0.0}

    def maybe_slow_allocate(request, *args, **kwargs):
        clock.now += slow["s"]  # waiting requests cross the wait bound while vLLM holds a peek
        return allocate(request, *args, **kwargs)

    s._allocate = maybe_slow_allocate
    contexts: dict[str, list[int]] = {}
    ids = itertools.count()
    tokens = itertools.count(11)
    pending = []
    for i, (prog, new, last, ttl, pause, slow_s) in enumerate(turns):
        program = f"P{prog}"
        context = contexts.get(program, [])
        if len(context) + new > MAX_CONTEXT:
            last, new = True, max(1, MAX_CONTEXT - len(context))
        prompt = context + [(next(tokens) * 7) % 3900 + 10 for _ in range(new)]
        contexts[program] = [] if last else prompt
        clock.now += pause
        params = SamplingParams(max_tokens=3, ignore_eos=True,
                                extra_args={XARG_PROGRAM: program, XARG_IS_LAST: last, XARG_TTL: ttl})
        pending.append(Request(f"r{next(ids)}", prompt, params, None, arrival_time=clock.now,
                               block_hasher=hasher))
        if len(pending) >= burst or i == len(turns) - 1:
            for request in pending:
                s.add_request(request)
            pending = []
            slow["s"] = slow_s
            step(s, lambda: 7)
            slow["s"] = 0.0
            check_allocator(s)
    for _ in range(400):
        if not s.has_requests():
            break
        clock.now += 0.05
        step(s, lambda: 7)
        check_allocator(s)
    assert not s.has_requests(), "every request is eventually scheduled and finishes"
    assert s.book.pins.pinned_blocks <= s.book.pins.cap_blocks
    for program in contexts:
        s.command("end", {"program_id": program})
    pool = s.kv_cache_manager.block_pool
    assert len(s.book.pins) == 0 and s.book.idle
    assert s.book.admission is None or not s.book.admission.programs
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1  # no block held by anyone
