"""Start-up profiling of the running engine: the reload (re-prefill) cost curve for the TTL policy."""

from __future__ import annotations

import random
import time

from agentserve.ttl.reload import ReloadProfile

# Context sizes to time, as fractions of the largest prompt; five points fit a quadratic well.
PROFILE_FRACTIONS = (0.05, 0.15, 0.3, 0.6, 1.0)


async def measure_reload_profile(engine, max_tokens: int, repeats: int = 2, seed: int = 0) -> ReloadProfile:
    """Time prefills (1 output token) of fresh random contexts up to `max_tokens`; fit t(n)."""
    from vllm import SamplingParams

    rng = random.Random(seed)
    vocab = engine.model_config.get_vocab_size()
    params = SamplingParams(max_tokens=1, temperature=0)
    points = []
    for i, frac in enumerate(PROFILE_FRACTIONS):
        n = max(16, int(max_tokens * frac))
        best = float("inf")
        for r in range(repeats):
            # Fresh random tokens every time: nothing may come from the prefix cache.
            tokens = [rng.randrange(10, vocab) for _ in range(n)]
            t0 = time.perf_counter()
            async for _ in engine.generate({"prompt_token_ids": tokens}, params, f"agentserve-profile-{i}-{r}"):
                pass
            best = min(best, time.perf_counter() - t0)
        points.append((n, best))
    return ReloadProfile.fit(points)
