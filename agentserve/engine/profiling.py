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


async def measure_transfer_profile(engine, max_tokens: int, repeats: int = 2, seed: int = 1) -> ReloadProfile:
    """The host tier's load-back cost curve: for fresh contexts up to `max_tokens`, the first-token time
    of a context loaded back from host memory (the device's prefix cache reset after its prefill wrote
    it to the tier) minus that of the same context hit on the device; fit t(n)."""
    from vllm import SamplingParams

    rng = random.Random(seed)
    vocab = engine.model_config.get_vocab_size()
    params = SamplingParams(max_tokens=1, temperature=0)

    async def first_token(tokens: list[int], rid: str) -> float:
        t0 = time.perf_counter()
        async for _ in engine.generate({"prompt_token_ids": tokens}, params, rid):
            pass
        return time.perf_counter() - t0

    points = []
    for i, frac in enumerate(PROFILE_FRACTIONS):
        n = max(64, int(max_tokens * frac))
        best = float("inf")
        for r in range(repeats):
            tokens = [rng.randrange(10, vocab) for _ in range(n)]
            await first_token(tokens, f"agentserve-transfer-{i}-{r}-fill")  # computed, written to the tier
            await first_token(tokens[:1], f"agentserve-transfer-{i}-{r}-flush")  # a step that submits the stores
            await engine.reset_prefix_cache()  # the device forgets; the tier keeps it
            host = await first_token(tokens, f"agentserve-transfer-{i}-{r}-host")
            device = await first_token(tokens, f"agentserve-transfer-{i}-{r}-device")
            best = min(best, max(0.0, host - device))
        points.append((n, best))
    return ReloadProfile.fit(points)
