"""Coding-agent sessions (Claude Code-like), generated from published distributions: `coding:<N>[:<seed>]`.

No trace data is copied; the shape follows these published figures, and every other number is an
assumption, marked as one:
- Turns per session: median 43 (SemiAnalysis AgentX, on Claude Code traces).
- The context a session reaches: median 142k tokens (AgentX's "142k input tokens per session", read as
  the prompt of the session's last call: each call re-sends the whole conversation).
- Output per call: median 150 tokens (AA-AgentPerf; it also gives inputs of 1k-131k tokens per call).
- The gap before a session's next call: 86.5 % under 1 s and 95.1 % under 10 s (vLLM router issue
  #285, on production sessions). Drawn log-uniformly within each of the three bands those two figures
  make, so both points hold exactly; the band ends (0.05 s and 300 s) are assumptions.
- 44 % of sessions spawn sub-agents (AgentX).
Assumptions: a shared prefix (system prompt and tool definitions) of `SYSTEM_TOKENS`, the same for
every session; lognormal spreads (`*_SIGMA`); 1-3 sub-agents per spawning session, all spawned by one
call, each with a median of `SUBAGENT_TURNS` turns and `SUBAGENT_APPEND` new tokens a call; contexts of at most about `MAX_CONTEXT` (a 200k window);
tool names by gap band (a quick read or edit under 1 s, a command above), so a per-tool predictor can
learn what a real agent's tool names tell it. A sub-agent here reads its parent's conversation (this
schema's spawn); Claude Code's start from the system prompt, so they share less KV than these do.

Sizes are the original ones, for the simulator; on the bench model (32,768 positions) replay with
`--token-scale 0.125` (a 142k context becomes 17.75k) and the plan cuts a call that would not fit.
"""

from __future__ import annotations

import math
import random

from workloads.schema import Program, SharedPrefix, Trace, Turn

SOURCE = "coding-agent"
MEDIAN_TURNS = 43  # AgentX
MEDIAN_CONTEXT = 142_000  # AgentX
MEDIAN_OUTPUT = 150  # AA-AgentPerf
GAP_BANDS = ((0.865, 0.05, 1.0), (0.951, 1.0, 10.0), (1.0, 10.0, 300.0))  # (cumulative share, from s, to s): #285
SUBAGENT_SHARE = 0.44  # AgentX
SYSTEM_TOKENS = 16_000  # assumption
MAX_CONTEXT = 200_000  # assumption: the model's window
SUBAGENT_TURNS = 8  # assumption
SUBAGENT_APPEND = 1500  # assumption: what a sub-agent's call adds, tokens (a main session's: about 3k)
TURNS_SIGMA, CONTEXT_SIGMA, OUTPUT_SIGMA, APPEND_SIGMA = 0.6, 0.5, 0.8, 1.0  # assumptions
TOOLS_BY_BAND = (("Read", "Edit", "Grep"), ("Bash",), ("Bash", "WebFetch"))  # assumption


def generate(sessions: int, seed: int = 0) -> Trace:
    if sessions < 1:
        raise ValueError("want at least one session")
    rng = random.Random(f"coding-agent/{seed}")
    return Trace(name=f"coding:{sessions}:{seed}", programs=[_session(f"coding-{seed}-{i}", rng) for i in range(sessions)])


def _lognormal(rng: random.Random, median: float, sigma: float) -> float:
    return median * math.exp(rng.gauss(0.0, sigma))


def gap(rng: random.Random) -> tuple[str, float]:
    """A tool's name and the seconds until the session's next call."""
    u = rng.random()
    low = 0.0
    for band, (upto, a, b) in enumerate(GAP_BANDS):
        if u < upto or band == len(GAP_BANDS) - 1:
            share = (u - low) / (upto - low)
            return rng.choice(TOOLS_BY_BAND[band]), a * (b / a) ** share
        low = upto
    raise AssertionError("unreachable")


def _turns(rng: random.Random, n: int, start: int, context: int) -> list[Turn]:
    """`n` calls whose prompts grow from `start` tokens (turn 0's input) to about `context`."""
    outputs = [max(1, min(8192, round(_lognormal(rng, MEDIAN_OUTPUT, OUTPUT_SIGMA)))) for _ in range(n)]
    room = max(0, context - start - sum(outputs[:-1]))
    weights = [_lognormal(rng, 1.0, APPEND_SIGMA) for _ in range(n - 1)]  # tool results: a few large, most small
    total = sum(weights) or 1.0
    appended = [round(room * w / total) for w in weights]
    turns = []
    for k in range(n):
        tool, seconds = gap(rng) if k < n - 1 else (None, None)
        turns.append(Turn(new_tokens=start if k == 0 else appended[k - 1], output_tokens=outputs[k], tool=tool, tool_s=seconds))
    return turns


def _session(sid: str, rng: random.Random) -> Program:
    n = max(2, round(_lognormal(rng, MEDIAN_TURNS, TURNS_SIGMA)))
    context = min(MAX_CONTEXT, round(_lognormal(rng, MEDIAN_CONTEXT, CONTEXT_SIGMA)))
    task = max(1, round(_lognormal(rng, 500, 0.5)))  # assumption: the user's request after the system prompt
    turns = _turns(rng, n, SYSTEM_TOKENS + task, max(context, SYSTEM_TOKENS + task))
    subs: list[Program] = []
    if rng.random() < SUBAGENT_SHARE:
        at = rng.randrange(0, max(1, int(0.8 * (n - 1))))  # never the last call: a later one joins them
        for j in range(rng.randint(1, 3)):
            sub_n = max(2, round(_lognormal(rng, SUBAGENT_TURNS, TURNS_SIGMA)))
            sub_task = max(1, round(_lognormal(rng, 300, 0.5)))
            sub_context = sub_task + round(_lognormal(rng, SUBAGENT_APPEND * (sub_n - 1), CONTEXT_SIGMA))
            subs.append(Program(id=f"{sid}/sub{j}", turns=_turns(rng, sub_n, sub_task, sub_context), source=SOURCE))
        spawner = turns[at]
        turns[at] = Turn(new_tokens=spawner.new_tokens, output_tokens=spawner.output_tokens, tool="Task",
                         spawn=[s.id for s in subs])
    return Program(id=sid, turns=turns, source=SOURCE, subprograms=subs,
                   shared=SharedPrefix(name="coding-agent-system", tokens=SYSTEM_TOKENS))
