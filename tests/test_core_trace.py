"""One program-scheduling core (programs/core.py) behind both adapters: the vLLM scheduler plugin on vLLM's
real scheduler class (no model: a stub samples one token per step) and the simulator's engine. One
recorded event trace (program turns, tool gaps, one-off requests, program ends) is driven through each
on the same fake clock, and the book's decisions must be the same: which request starts when and with
what prefix hit (queue order, admission), every pin, unpin and its reason (consumed, expired, released
under pressure, program end) and the admission holds."""

from __future__ import annotations

import random

import msgspec
import pytest

from agentserve.engine import offline
from agentserve.engine.settings import EngineSettings
from agentserve.options import SchedulerConfig
from agentserve.programs.book import ProgramBook
from agentserve.programs.fields import XARG_IS_LAST, XARG_LIFE, XARG_NEXT_USE, XARG_PROGRAM, XARG_TTL
from agentserve.programs.queue_order import ProgramFCFS
from agentserve.sim.costs import CostModel
from agentserve.sim.engine import SimEngine, SimRequest, Stream

PLUGIN = "agentserve.engine.scheduler.ProgramScheduler"
KV_TOKENS, BLOCK, MAX_LEN, SEQS, BATCHED = 4096, 32, 2048, 6, 2048
STEP_S = 0.05  # the fake clock's step
CONFIG = {"pin_cap_share": 0.6, "max_wait_s": 1.0, "admission": {"mode": "on", "share": 0.9, "max_hold_s": 2.0}}
SAMPLED = 7  # the stub model's every token


class Turn(msgspec.Struct, frozen=True):
    new_tokens: int
    output_tokens: int
    ttl_s: float  # what the front end's TTL policy gave the turn's pin
    gap_s: float  # the tool call after it (the next turn arrives this long after it finished)


class Program(msgspec.Struct, frozen=True):
    id: str | None  # None: a one-off request (no program)
    arrival_s: float
    turns: list[Turn]


def trace(seed: int) -> list[Program]:
    """A recorded trace: agent programs of 2-4 turns (tool gaps, TTLs shorter and longer than them) and
    one-off requests, arriving over the first 1.5 s, contexts up to the model's length (2,048 tokens) on a
    4,096-token cache."""
    rng = random.Random(seed)
    programs = []
    for i in range(9):
        turns, context = [], 0
        for _ in range(rng.randint(2, 4)):
            turn = Turn(rng.randint(200, 600), rng.randint(3, 10), rng.choice((0.0, 0.2, 0.8, 3.0, 8.0)),
                        rng.choice((0.0, 0.1, 0.4, 1.0)))
            context += turn.new_tokens + turn.output_tokens
            if context > MAX_LEN:  # vLLM would cut the turn short at the model's length
                break
            turns.append(turn)
        programs.append(Program(f"P{i}", round(rng.uniform(0, 1.5), 2), turns))
    for i in range(2):
        programs.append(Program(None, round(rng.uniform(0, 1.5), 2), [Turn(rng.randint(100, 400), 4, 0.0, 0.0)]))
    return sorted(programs, key=lambda p: p.arrival_s)


class VllmSide:
    """The plugin on vLLM's scheduler class."""

    def __init__(self, clock):
        settings = EngineSettings(model="tiny", kv_tokens=KV_TOKENS, max_model_len=MAX_LEN, max_num_seqs=SEQS,
                                  max_num_batched_tokens=BATCHED, scheduling_policy="priority",
                                  scheduler_cls=PLUGIN, additional_config={"agentserve": CONFIG})
        self.s, self.hasher = offline.build_scheduler(settings)
        self.core = self.s.core
        self.core.book.clock = self.core.book.next_use.clock = clock

    def add(self, rid: str, tokens: list[int], out: int, xargs: dict, now: float) -> None:
        from vllm import SamplingParams
        from vllm.v1.request import Request

        params = SamplingParams(max_tokens=out, ignore_eos=True, extra_args=xargs)
        self.s.add_request(Request(rid, tokens, params, None, arrival_time=now, block_hasher=self.hasher))

    def step(self, now: float) -> list[str]:
        return offline.step(self.s, lambda: SAMPLED)[1]

    def command(self, command: str, payload: dict) -> dict:
        return self.s.command(command, payload)

    def busy(self) -> bool:
        return self.s.has_requests()


class SimSide:
    """The simulator's engine, the same book configuration."""

    def __init__(self, clock):
        book = ProgramBook(msgspec.convert(CONFIG, SchedulerConfig), total_blocks=KV_TOKENS // BLOCK,
                           block_size=BLOCK, max_model_len=MAX_LEN, clock=clock)
        self.engine = SimEngine("r", num_blocks=KV_TOKENS // BLOCK, block_size=BLOCK, max_num_seqs=SEQS,
                                max_batched_tokens=BATCHED, book=book,
                                cost=CostModel(name="unit", step_s=STEP_S, prefill_token_s=0.0, decode_seq_s=0.0,
                                               kv_read_token_s=0.0))
        self.engine.order = ProgramFCFS(book, lambda r: r.program)
        self.core = self.engine.core
        self.streams: dict[str, Stream] = {}

    def add(self, rid: str, tokens: list[int], out: int, xargs: dict, now: float) -> None:
        owner = xargs.get(XARG_PROGRAM) or rid
        stream = self.streams.setdefault(owner, Stream(owner, BLOCK))
        self.engine.add(SimRequest(rid, xargs.get(XARG_PROGRAM), stream, len(tokens), out, now, xargs=xargs))

    def step(self, now: float) -> list[str]:
        self.engine.schedule(now)
        done = [r.request_id for r in self.engine.complete(now) if r.done_at is not None]
        self.engine.check()
        return done

    def command(self, command: str, payload: dict) -> dict:
        return self.engine.command(command, payload)

    def busy(self) -> bool:
        return self.engine.busy()


def replay(side_cls, programs: list[Program]) -> dict:
    """Drive the trace through one adapter: each program's next turn arrives its tool gap after the
    previous one finished, and the front end ends a program after its last turn. Returns the decisions."""
    now = [0.0]
    side = side_cls(lambda: now[0])
    book = side.core.book
    starts = []
    started = book.started

    def record_start(request_id, program, cached_tokens, prompt_tokens, arrival_time):
        starts.append((round(now[0], 3), request_id, cached_tokens))
        return started(request_id, program, cached_tokens, prompt_tokens, arrival_time)

    book.started = record_start
    events = []
    pending = [(p.arrival_s, p, 0) for p in programs]  # (when, program, turn)
    contexts: dict[str, list[int]] = {}
    keys: dict[str, int] = {}  # program (or one-off request) -> its token range
    running: dict[str, tuple[Program, int]] = {}
    serial = 0
    for step in range(2000):
        for due in [e for e in pending if e[0] <= now[0] + 1e-9]:
            pending.remove(due)
            _, program, k = due
            turn, serial = program.turns[k], serial + 1
            rid = f"{program.id or 'one-off'}-{k}-{serial}"
            key = program.id or rid
            base = 1000 * keys.setdefault(key, len(keys))  # no two programs' contexts share a prefix
            context = contexts.setdefault(key, [])
            context += [base + (len(context) + i) % 997 + 1 for i in range(turn.new_tokens)]
            last = k == len(program.turns) - 1
            xargs = {} if program.id is None else {
                XARG_PROGRAM: program.id, XARG_IS_LAST: last, XARG_TTL: turn.ttl_s, XARG_LIFE: 0,
                **({} if last else {XARG_NEXT_USE: turn.gap_s})}
            side.add(rid, list(context), turn.output_tokens, xargs, now[0])
            running[rid] = (program, k)
        if side.busy():
            for rid in side.step(now[0]):
                program, k = running.pop(rid)
                turn = program.turns[k]
                key = program.id or rid
                contexts[key] += [SAMPLED] * turn.output_tokens
                if k + 1 < len(program.turns):
                    pending.append((now[0] + turn.gap_s, program, k + 1))
                elif program.id is not None:
                    events += side.command("end", {"program_id": program.id, "life": 0})["events"]
        elif not pending:
            break
        if step % 4 == 3:  # the front end's control tick
            events += side.command("tick", {})["events"]
        now[0] = round(now[0] + STEP_S, 6)
    else:
        raise AssertionError("the trace did not finish")
    events += book.stats()["events"]
    counters = dict(book.counters)
    return {"starts": starts, "events": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in e.items()}
                                         for e in events], "counters": counters}


@pytest.mark.parametrize("seed", range(4))
def test_one_trace_gives_the_same_decisions_through_the_plugin_and_the_simulator(seed):
    programs = trace(seed)
    real, sim = replay(VllmSide, programs), replay(SimSide, programs)
    assert real["starts"] == sim["starts"]
    assert real["events"] == sim["events"]
    assert real["counters"] == sim["counters"]


def test_the_traces_exercise_every_decision():
    """Otherwise the comparison above could pass on traces where nothing is decided."""
    seen = {}
    for seed in range(4):
        for key, n in replay(SimSide, trace(seed))["counters"].items():
            seen[key] = seen.get(key, 0) + n
    for decision in ("pins_created", "pins_released_consumed", "pins_released_expired", "pins_released_pressure",
                     "admission_held", "blocks_evicted_first"):
        assert seen.get(decision, 0) > 0, (decision, seen)
