"""The engine's turn split (engine/turn_ledger.py, engine/turn_timer.py): the ledger alone, then on vLLM's
real scheduler classes without an engine, with a fake clock that the stub model advances."""

from __future__ import annotations

import time

import msgspec
import pytest

from agentserve.engine import offline
from agentserve.engine.settings import SCHEDULER_CLS, TURN_TIMED, EngineSettings, engine_settings_for, with_turn_timer
from agentserve.engine.turn_ledger import PARTS, TurnLedger, scheduled_part
from agentserve.options import ProgramOptions

STEP_S, GAP_S = 1.0, 0.25  # the stub model's step, the engine core's time between steps


def test_a_step_recomputes_below_what_was_computed_else_prefills_or_decodes():
    assert scheduled_part(0, 0, has_output=False) == "prefill"
    assert scheduled_part(63, 0, has_output=False) == "prefill"  # a full prefix hit recomputes one token
    assert scheduled_part(64, 64, has_output=True) == "decode"
    assert scheduled_part(32, 65, has_output=True) == "recompute"  # preempted: from its cached blocks on
    assert scheduled_part(0, 40, has_output=False) == "recompute"  # preempted inside its prompt


def test_ledger_puts_each_interval_in_the_part_it_was_in():
    now = [0.0]
    ledger = TurnLedger(lambda: now[0])
    ledger.arrive("a", "P", 10)
    ledger.scheduled("a", 0, 10, False, 2.0)  # queued 0-2
    ledger.enter("a", "between_steps", 3.0)  # prefilled 2-3
    ledger.scheduled("a", 10, 11, True, 3.5)
    now[0] = 4.5
    ledger.finish("a", output_tokens=2, preemptions=0, aborted=False)
    [t] = ledger.take()
    assert (t.queue, t.prefill, t.between_steps, t.decode, t.decode_steps) == (2.0, 1.0, 0.5, 1.0, 1)
    assert t.total == 4.5 and t.program == "P" and t.cached_tokens == 0
    assert ledger.take() == [] and not ledger.open


def options_for(policy: str) -> ProgramOptions:
    options = ProgramOptions(policy=policy)
    return msgspec.structs.replace(options, host=msgspec.structs.replace(options.host, kv_tokens=0))


def timed(scheduler_cls: str | None, max_num_seqs: int = 1):
    """A turn-timed scheduler (stock or the plugin, as `serve --turn-times` builds it) on a fake clock;
    `step` advances the clock as an engine would: a gap, then the stub model's step."""
    settings = engine_settings_for(EngineSettings(model="tiny", kv_tokens=4096, max_model_len=4096,
                                                  max_num_seqs=max_num_seqs, turn_times=True),
                                   options_for("vllm" if scheduler_cls is None else "agentserve"), "cpu")
    s, hasher = offline.build_scheduler(settings)
    now = [0.0]
    s.turn_clock = lambda: now[0]

    def model() -> int:
        now[0] += STEP_S / max_num_seqs  # a sampled token's share of the step
        return 7

    def step():
        now[0] += GAP_S
        return offline.step(s, model)

    return s, hasher, now, step


def add(s, hasher, rid: str, n: int, out: int, base: int = 0):
    from vllm import SamplingParams
    from vllm.v1.request import Request

    params = SamplingParams(max_tokens=out, ignore_eos=True)
    s.add_request(Request(rid, [(base + i) % 3900 + 10 for i in range(n)], params, None,
                          arrival_time=time.time(), block_hasher=hasher))


@pytest.mark.parametrize("scheduler_cls", TURN_TIMED)
def test_each_part_is_what_the_request_waited_for(scheduler_cls):
    """One request at a time: A prefills in one step and decodes three; B queues behind all of A."""
    s, h, now, step = timed(scheduler_cls)
    assert type(s).__name__ == TURN_TIMED[scheduler_cls].rsplit(".", 1)[1]
    add(s, h, "a", 64, 4)
    add(s, h, "b", 64, 4, base=1000)
    while len(s.turns.finished) < 2:
        step()
    turns = {t.request_id: t for t in s.turns.take()}
    a, b = turns["a"], turns["b"]
    assert (a.queue, a.prefill, a.decode, a.between_steps, a.decode_steps) == (GAP_S, STEP_S, 3 * STEP_S, 3 * GAP_S, 3)
    assert b.queue == 4 * (STEP_S + GAP_S) + GAP_S  # A's four steps and the gaps before them, then its own gap
    assert (b.prefill, b.decode, b.recompute, b.load_back) == (STEP_S, 3 * STEP_S, 0.0, 0.0)
    assert a.total + 4 * (STEP_S + GAP_S) == b.total == now[0]  # each part measured, none missing
    assert (a.prompt_tokens, a.output_tokens, a.preemptions, a.aborted) == (64, 4, 0, False)


@pytest.mark.usefixtures("both_schedulers")
@pytest.mark.parametrize("scheduler_cls", TURN_TIMED)
def test_a_preempted_request_recomputes(scheduler_cls):
    """Two long decodes outgrow 128 blocks: vLLM preempts one, whose re-prefill is recompute, not prefill;
    under async scheduling too, where parts shift by a step but still sum to the request's time."""
    s, h, now, step = timed(scheduler_cls, max_num_seqs=8)
    add(s, h, "l", 1800, 400)
    step()
    add(s, h, "c", 1800, 400, base=2000)
    arrived = now[0]
    while len(s.turns.finished) < 2:
        step()
    turns = {t.request_id: t for t in s.turns.take()}
    hit = [t for t in turns.values() if t.preemptions]
    assert len(hit) == 1 and hit[0].recompute > 0
    assert all(t.recompute == 0 for t in turns.values() if not t.preemptions)
    assert all(min(getattr(t, p) for p in PARTS) >= 0 and t.output_tokens == 400 for t in turns.values())
    assert turns["c"].total == pytest.approx(now[0] - arrived)


def test_an_aborted_request_is_kept_as_aborted():
    from vllm.v1.request import RequestStatus

    s, h, now, step = timed(None)
    add(s, h, "a", 64, 50)
    step()
    now[0] += 2.0
    s.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    [t] = s.turns.take()
    assert t.aborted and (t.queue, t.prefill, t.between_steps, t.output_tokens) == (GAP_S, STEP_S, 2.0, 1)


def test_turn_times_picks_the_timed_variant_of_the_scheduler_the_policy_runs():
    for policy, expected in (("vllm", TURN_TIMED[None]), ("agentserve", TURN_TIMED[SCHEDULER_CLS])):
        settings = engine_settings_for(EngineSettings(model="tiny", turn_times=True), options_for(policy), "cpu")
        assert settings.scheduler_cls == expected
    assert engine_settings_for(EngineSettings(model="tiny"), options_for("vllm"), "cpu").scheduler_cls is None
    with pytest.raises(ValueError, match="no variant"):
        with_turn_timer(EngineSettings(model="tiny", turn_times=True, scheduler_cls="x.Other"))


def hand_timed_run() -> dict:
    """The tiny model on an in-process engine with turn times on, one request at a time: every engine
    step timed by hand around `EngineCore.step`, with the requests each step gave a token to. Runs in
    a spawned process (it starts an engine in the calling process)."""
    import os

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import SamplingParams
    from vllm.v1.engine.llm_engine import LLMEngine

    from agentserve.engine.settings import engine_args

    settings = engine_settings_for(EngineSettings(model="tiny", kv_tokens=4096, max_model_len=4096, max_num_seqs=1,
                                                  turn_times=True), options_for("vllm"), "cpu")
    engine = LLMEngine.from_engine_args(engine_args(settings))
    core = engine.engine_core.engine_core
    added = {}
    for rid, n, base in (("a", 1500, 0), ("b", 300, 2000)):  # A's prompt is long, so its prefill shows
        engine.add_request(rid, {"prompt_token_ids": [(base + i) % 3900 + 10 for i in range(n)]},
                           SamplingParams(max_tokens=8, ignore_eos=True))
        added[rid] = time.perf_counter()
    steps = []
    while engine.has_unfinished_requests() and len(steps) < 100:
        t0 = time.perf_counter()
        outputs, _ = core.step()
        t1 = time.perf_counter()
        # the engine's ids are ours plus a suffix
        got = [o.request_id.split("-")[0] for batch in outputs.values() for o in batch.outputs if o.new_token_ids]
        steps.append((t0, t1, got))
        engine.output_processor.process_outputs([o for b in outputs.values() for o in b.outputs])
    turns = core.scheduler.take_turn_times()
    return {"added": added, "steps": steps, "turns": {t["request_id"].split("-")[0]: t for t in turns}}


@pytest.mark.slow
def test_turn_split_matches_a_hand_timed_engine_run():
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        run = pool.submit(hand_timed_run).result(timeout=600)
    steps, turns = run["steps"], run["turns"]
    for rid in ("a", "b"):
        mine = [(t0, t1) for t0, t1, got in steps if rid in got]
        assert len(mine) == 8  # one token a step: the prefill's, then seven decodes
        expected = {"queue": mine[0][0] - run["added"][rid], "prefill": mine[0][1] - mine[0][0],
                    "decode": sum(t1 - t0 for t0, t1 in mine[1:]), "recompute": 0.0, "load_back": 0.0}
        t = turns[rid]
        for part, seconds in expected.items():
            # each part of the hand timing also holds the engine core's own work around the scheduler
            assert abs(t[part] - seconds) <= 0.005 + 0.002 * len(mine) + 0.1 * seconds, (rid, part, t, expected)
        assert t["decode_steps"] == 7 and t["output_tokens"] == 8
    assert turns["a"]["prefill"] > 5 * turns["a"]["decode"] / 7  # the long prompt's step is the long one
    assert turns["b"]["queue"] > turns["a"]["prefill"] + turns["a"]["decode"]  # B waited for all of A
