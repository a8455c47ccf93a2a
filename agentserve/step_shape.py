"""What an engine step computes, in the terms of the step-cost model (sim/costs.py): prefill tokens,
decoding sequences, cached tokens those decodes read, and prefill attention pairs. One definition for
the real engine's step timer (engine/step_timer.py, which fits the model) and the simulator's engine
(which is priced by it), so the two count a step the same way.
"""

from __future__ import annotations

from collections.abc import Iterable

StepShape = tuple[int, int, int, int]  # prefill tokens, decoding sequences, KV tokens they read, prefill pairs


def prefill_pairs(context: int, tokens: int) -> int:
    """Attention pairs of a prefill chunk of `tokens` after `context` cached ones: each new token
    attends to the context and to the chunk up to itself."""
    return tokens * context + tokens * (tokens + 1) // 2


def step_shape(work: Iterable[tuple[int, int, bool]]) -> StepShape:
    """The shape of a step from each scheduled request's (tokens computed before the step, tokens
    scheduled, has it sampled a token before): one token after sampling is a decode, anything else a
    prefill (or a recompute) chunk."""
    prefill = decodes = kv = pairs = 0
    for computed, scheduled, has_output in work:
        if scheduled == 1 and has_output:
            decodes, kv = decodes + 1, kv + computed
        else:
            prefill, pairs = prefill + scheduled, pairs + prefill_pairs(computed, scheduled)
    return prefill, decodes, kv, pairs
