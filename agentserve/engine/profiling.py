"""Start-up profiling of the running engine: the reload (re-prefill) cost curve for the TTL policy."""

from __future__ import annotations

import random
import time

from agentserve.ttl.reload import ReloadProfile

# Context sizes to time, as fractions of the largest prompt; five points fit a quadratic well.
PROFILE_FRACTIONS = (0.05, 0.15, 0.3, 0.6, 1.0)


async def _first_token_s(engine, tokens: list[int], request_id: str) -> float:
    """Seconds to the first (only) output token of a prompt."""
    from vllm import SamplingParams

    t0 = time.perf_counter()
    async for _ in engine.generate({"prompt_token_ids": tokens}, SamplingParams(max_tokens=1, temperature=0),
                                   request_id):
        pass
    return time.perf_counter() - t0


async def _fit(engine, max_tokens: int, repeats: int, seed: int, min_tokens: int, measure) -> ReloadProfile:
    """Fit t(n) through the best of `repeats` measurements `measure(fresh random tokens, name)` at each
    profiled context size (fresh tokens every time: nothing may come from an earlier measurement)."""
    rng = random.Random(seed)
    vocab = engine.model_config.get_vocab_size()
    points = []
    for i, frac in enumerate(PROFILE_FRACTIONS):
        n = max(min_tokens, int(max_tokens * frac))
        best = min([await measure([rng.randrange(10, vocab) for _ in range(n)], f"agentserve-profile-{i}-{r}")
                    for r in range(repeats)])
        points.append((n, best))
    return ReloadProfile.fit(points)


async def measure_reload_profile(engine, max_tokens: int, repeats: int = 2, seed: int = 0) -> ReloadProfile:
    """Time prefills (1 output token) of fresh random contexts up to `max_tokens`; fit t(n)."""
    return await _fit(engine, max_tokens, repeats, seed, 16, lambda tokens, rid: _first_token_s(engine, tokens, rid))


async def measure_transfer_profile(engine, max_tokens: int, repeats: int = 2, seed: int = 1) -> ReloadProfile:
    """The host tier's load-back cost curve: for fresh contexts up to `max_tokens`, the first-token time
    of a context loaded back from host memory (the device's prefix cache reset after its prefill wrote
    it to the tier) minus that of the same context hit on the device; fit t(n)."""

    async def load_back(tokens: list[int], rid: str) -> float:
        await _first_token_s(engine, tokens, rid + "-fill")  # computed, written to the tier
        await _first_token_s(engine, tokens[:1], rid + "-flush")  # a step that submits the stores
        await engine.reset_prefix_cache()  # the device forgets; the tier keeps it
        host = await _first_token_s(engine, tokens, rid + "-host")
        device = await _first_token_s(engine, tokens, rid + "-device")
        return max(0.0, host - device)

    return await _fit(engine, max_tokens, repeats, seed, 64, load_back)
