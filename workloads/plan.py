"""The replay plan: which programs run, when they arrive, and every turn's exact token counts and tool
time, fixed before any policy runs so all policies replay the same thing.

Scaling knobs (applied identically to every policy and printed in the report): `token_scale`
multiplies every token count (at least 1 token per output, 0 kept 0 for inputs), `time_scale` every tool
duration, `max_turns` cuts programs after that many LLM calls, `programs` picks that many programs
(a seeded sample without replacement; the whole trace in file order when it asks for all of them;
cycling when it asks for more). A program is also cut before the turn whose prompt plus output would
not fit the engine's context (`max_context`); the cuts are counted. Arrivals: Poisson at `rate`
programs/s, or a fixed `concurrency` (a program starts when one ends).

A workflow (a program with sub-programs) arrives as one program; its sub-programs are planned inside
the turns that spawn them, each with the spawning parent's context as its prompt's prefix (so the
context check counts it), and cut by the same knobs.
"""

from __future__ import annotations

import random
from typing import Annotated

import msgspec

from workloads.schema import Program, SharedPrefix, Trace
from workloads.tool_times import ToolTimeModel

Positive = Annotated[float, msgspec.Meta(gt=0)]
# Chat-template tokens a turn adds around its two messages (ChatML: role headers, end markers, the
# generation prompt), kept free when checking that a turn fits the context.
TEMPLATE_TOKENS_PER_TURN = 12


class ReplayConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    programs: Annotated[int, msgspec.Meta(ge=1)] = 8
    rate: Positive | None = 0.5  # programs/s (Poisson); None: use concurrency
    concurrency: Annotated[int, msgspec.Meta(ge=1)] | None = None
    token_scale: Positive = 0.25
    time_scale: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    max_turns: Annotated[int, msgspec.Meta(ge=1)] | None = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("give exactly one of rate (programs/s) and concurrency")
        # msgspec checks the Meta constraints only when decoding; the CLI constructs directly.
        if self.programs < 1 or (self.concurrency is not None and self.concurrency < 1):
            raise ValueError("programs and concurrency must be >= 1")
        if (self.rate is not None and self.rate <= 0) or self.token_scale <= 0 or self.time_scale < 0:
            raise ValueError("rate and token_scale must be > 0, time_scale >= 0")
        if self.max_turns is not None and self.max_turns < 1:
            raise ValueError("max_turns must be >= 1")


class PlannedTurn(msgspec.Struct, frozen=True):
    new_tokens: int
    output_tokens: int
    tool: str | None
    tool_s: float  # 0 for the last turn and for a spawning turn (its wait is the join)
    tool_measured: bool  # False: sampled from the tool-time model
    spawn: tuple["PlannedProgram", ...] = ()  # sub-programs started after this turn, joined before the next


class PlannedProgram(msgspec.Struct, frozen=True):
    id: str
    source: str
    arrival_s: float  # offset from the replay's start (rate mode; 0 in concurrency mode)
    turns: list[PlannedTurn]
    cut_for_context: bool  # turns were dropped because the context would not fit
    shared: SharedPrefix | None = None  # the start of turn 0's input shared with other programs (scaled)

    def walk(self):
        """This program and every sub-program its turns spawn, depth first."""
        yield self
        for turn in self.turns:
            for sub in turn.spawn:
                yield from sub.walk()


def scale_tokens(n: int, scale: float, minimum: int) -> int:
    return max(minimum, round(n * scale)) if n > 0 or minimum > 0 else 0


def plan(trace: Trace, cfg: ReplayConfig, tools: ToolTimeModel, max_context: int) -> list[PlannedProgram]:
    rng = random.Random(cfg.seed)
    pool = trace.programs
    if cfg.programs <= len(pool):
        chosen = pool if cfg.programs == len(pool) else rng.sample(pool, cfg.programs)
    else:
        chosen = [pool[i % len(pool)] for i in range(cfg.programs)]
    out, t = [], 0.0
    for i, prog in enumerate(chosen):
        if cfg.rate is not None and i > 0:
            t += rng.expovariate(cfg.rate)
        suffix = "" if cfg.programs <= len(pool) else f"#{i // len(pool)}"
        out.append(_program(prog, suffix, t if cfg.rate is not None else 0.0, cfg, tools, max_context, 0))
    return out


def _program(prog: Program, suffix: str, arrival_s: float, cfg: ReplayConfig, tools: ToolTimeModel,
             max_context: int, prefix: int) -> PlannedProgram:
    """`prog` planned, its context starting after `prefix` tokens (a sub-program: its parent's context)."""
    pid = prog.id + suffix
    subs = {s.id: s for s in prog.subprograms}
    source = prog.turns[: cfg.max_turns] if cfg.max_turns else prog.turns
    turns: list[PlannedTurn] = []
    context = prefix
    cut = False
    for k, turn in enumerate(source):
        new = scale_tokens(turn.new_tokens, cfg.token_scale, 1 if k == 0 else 0)
        output = scale_tokens(turn.output_tokens, cfg.token_scale, 1)
        if context + new + output + TEMPLATE_TOKENS_PER_TURN * (k + 1) > max_context:
            cut = True
            break
        context += new + output
        if turn.spawn:
            tool_s, measured = 0.0, True
            spawn = tuple(_program(subs[name], suffix, arrival_s, cfg, tools, max_context,
                                   context + TEMPLATE_TOKENS_PER_TURN * (k + 1)) for name in turn.spawn)
        elif turn.tool_s is not None:
            tool_s, measured, spawn = turn.tool_s, True, ()
        else:
            tool_s, measured, spawn = tools.sample(prog.source, turn.tool, f"{pid}/{k}", cfg.seed), False, ()
        turns.append(PlannedTurn(new, output, turn.tool, tool_s * cfg.time_scale, measured, spawn))
    if not turns:  # not even the first prompt fits: keep a first turn cut to the context
        first = source[0]
        room = max_context - prefix
        output = max(1, min(scale_tokens(first.output_tokens, cfg.token_scale, 1), room // 4))
        turns, cut = [PlannedTurn(max(1, room - output - 1 - TEMPLATE_TOKENS_PER_TURN), output, None, 0.0, True)], True
    last = turns[-1]
    if last.spawn:  # cut right after a spawn: the join needs a turn after it, so the spawn goes too
        cut = True
    turns[-1] = PlannedTurn(last.new_tokens, last.output_tokens, None, 0.0, True)
    shared = None
    if prog.shared is not None and prefix == 0:  # a sub-program's prompt starts with its parent's
        tokens = min(scale_tokens(prog.shared.tokens, cfg.token_scale, 1), turns[0].new_tokens)
        shared = SharedPrefix(prog.shared.name, tokens)
    return PlannedProgram(pid, prog.source, arrival_s, turns, cut, shared)
