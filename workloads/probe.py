"""An engine speed probe: the wall time of one fixed batch (prefill and decode), run on a server right
before a policy's replay, so a run on a slow spell of the machine can be told from a slow policy.

The batch is the same every time (the same text, length and output), under a fresh `cache_salt` so
no probe hits the cache of another; its KV is one-off work that any eviction order drops first.
"""

from __future__ import annotations

import random
import statistics
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from workloads.filler import Filler

PROBE_REQUESTS = 4  # concurrent, so the probe batches as a replay does
PROBE_PROMPT_TOKENS = 512
PROBE_OUTPUT_TOKENS = 32
PROBE_REPEATS = 3  # timed batches after one untimed one; the median is the probe
PROBE_TIMEOUT_S = 120.0


def speed_probe(base_url: str, model: str, filler: Filler, repeats: int = PROBE_REPEATS) -> float:
    """Seconds for the fixed batch: the median of `repeats` batches, after a warm-up batch."""
    import httpx

    prompt = filler.text(PROBE_PROMPT_TOKENS, random.Random(0))
    with httpx.Client(base_url=base_url, timeout=PROBE_TIMEOUT_S) as client:
        def one(salt: str) -> None:
            r = client.post("/v1/completions", json={
                "model": model, "prompt": prompt, "max_tokens": PROBE_OUTPUT_TOKENS, "min_tokens": PROBE_OUTPUT_TOKENS,
                "ignore_eos": True, "temperature": 0.0, "cache_salt": salt})
            if r.status_code != 200:
                raise RuntimeError(f"speed probe: {base_url} answered {r.status_code}: {r.text[:200]}")

        def batch() -> float:
            t0 = time.perf_counter()
            with ThreadPoolExecutor(PROBE_REQUESTS) as pool:
                list(pool.map(one, [uuid.uuid4().hex for _ in range(PROBE_REQUESTS)]))
            return time.perf_counter() - t0

        batch()
        return statistics.median(batch() for _ in range(repeats))
