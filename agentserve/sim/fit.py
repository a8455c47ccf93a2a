"""Fit the fleet simulator's cost model (agentserve/sim/costs.py) to this machine's engine steps.

Runs a model on the real engine with the timed scheduler (agentserve.engine.step_timer), sends a
seeded mix of requests that spans what a replay's steps compute (prefills alone from 32 to 4,096
tokens, decode batches of 1 to 32 sequences at contexts of 64 to 4,096 tokens, and the mixed steps
in between), records each step's shape (prefill tokens, decoding sequences, cached tokens those
decodes attend to, prefill attention pairs) and wall time, and fits

    step seconds = fixed + a x prefill tokens + b x decoding sequences + c x decode KV tokens
                   + d x prefill attention pairs

by least squares with non-negative terms (a term fitted negative is dropped and the rest refitted).
A second engine with a host tier measures the load-back price as the server does at start-up. Writes
the profile as JSON (`agentserve sim --profile PATH`) with the fit's error per step.

    python bench/fit_costs.py --model bench --out agentserve/sim/profiles/cpu-bench.json
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
from pathlib import Path

import msgspec
import numpy as np

from agentserve.engine import EngineSettings, start_engine
from agentserve.sim.costs import CostModel

TERMS = ("step_s", "prefill_token_s", "decode_seq_s", "kv_read_token_s", "prefill_pair_s")  # the shape's order


def requests(seed: int, kv_tokens: int, max_context: int = 4096, output: int = 48) -> list[list[tuple[int, int]]]:
    """Waves of (prompt tokens, output tokens), one wave at a time: each wave's requests run at once."""
    rng = random.Random(seed)
    sizes = [n for n in (32, 128, 512, 1024, 2048, 4096) if n <= max_context]
    waves = [[(n, 1)] for n in sizes for _ in range(2)]  # prefills alone
    for batch in (1, 2, 4, 8, 16, 32):
        for context in (64, 512, 2048, 4096):
            if batch * (context + output) > kv_tokens or context > max_context:
                continue
            waves.append([(context, output) for _ in range(batch)])  # decode batches at one context
    for _ in range(12):  # mixed: staggered prompts and outputs, so prefills meet decodes
        waves.append([(rng.randint(64, min(2048, max_context)), rng.randint(8, 2 * output))
                      for _ in range(rng.randint(2, 12))])
    return waves


async def measure(args) -> list[tuple[tuple[int, int, int, int], float]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    settings = EngineSettings(model=args.model, kv_tokens=args.kv_tokens, prefix_caching=False,
                              scheduler_cls="agentserve.engine.step_timer.TimedScheduler").for_device()
    steps = []
    async with start_engine(settings) as engine:
        vocab = engine.model_config.get_vocab_size()
        core = engine.engine_core
        rng = random.Random(args.seed)

        async def one(prompt: int, output: int, rid: str) -> None:
            tokens = [rng.randrange(10, vocab) for _ in range(prompt)]
            params = SamplingParams(max_tokens=output, ignore_eos=True, temperature=0)
            async for _ in engine.generate(TokensPrompt(prompt_token_ids=tokens), params, request_id=rid):
                pass

        await one(64, 4, "warmup")
        await core.call_utility_async("agentserve_step_times")  # drop start-up steps
        for r in range(args.rounds):
            for w, wave in enumerate(requests(args.seed + r, args.kv_tokens, args.max_context, args.output)):
                # staggered by a few ms, so a wave's later prompts arrive while earlier ones decode
                async def late(i: int, prompt: int, output: int) -> None:
                    await asyncio.sleep(0.003 * i * (w % 3))
                    await one(prompt, output, f"r{r}w{w}q{i}")

                await asyncio.gather(*(late(i, p, o) for i, (p, o) in enumerate(wave)))
            times = await core.call_utility_async("agentserve_step_times")
            steps += [(tuple(shape), t) for shape, t in zip(times["step_shapes"], times["step"]) if any(shape)]
    return steps


async def measure_load(args) -> tuple[float, list[tuple[int, float]]]:
    """Seconds per token of a load-back from the host tier: the server's own start-up measurement
    (engine/profiling.py), fitted through the origin."""
    from agentserve.engine.profiling import measure_transfer_profile
    from agentserve.engine.settings import kv_bytes_per_token, resolve_model
    from agentserve.hosttier.config import offloading_config
    from agentserve.options import HostTierOptions

    settings = EngineSettings(model=args.model, kv_tokens=args.kv_tokens).for_device()
    tier = offloading_config(HostTierOptions(kv_tokens=4 * args.kv_tokens), block_size=settings.block_size,
                             kv_bytes_per_token=kv_bytes_per_token(resolve_model(args.model)[0], settings.dtype),
                             programs=False)
    async with start_engine(msgspec.structs.replace(settings, kv_transfer_config=tier)) as engine:
        profile = await measure_transfer_profile(engine, max_tokens=args.max_context)
    points = profile.points
    return sum(n * t for n, t in points) / sum(n * n for n, _ in points), points


def fit(steps: list[tuple[tuple[int, int, int, int], float]]) -> tuple[dict[str, float], dict]:
    x = np.array([[1.0, *shape] for shape, _ in steps])
    y = np.array([t for _, t in steps])
    keep = list(range(len(TERMS)))
    while True:
        coef, *_ = np.linalg.lstsq(x[:, keep], y, rcond=None)
        if (coef >= 0).all():
            break
        keep.pop(int(np.argmin(coef)))
    terms = dict.fromkeys(TERMS, 0.0)
    for i, c in zip(keep, coef):
        terms[TERMS[i]] = float(c)
    predicted = x @ np.array([terms[t] for t in TERMS])
    rel = np.abs(predicted - y) / y
    error = {"steps": len(steps), "median_rel_error": float(np.median(rel)), "p90_rel_error": float(np.quantile(rel, 0.9)),
             "total_time_error": float(predicted.sum() / y.sum() - 1),
             "r2": float(1 - ((predicted - y) ** 2).sum() / ((y - y.mean()) ** 2).sum())}
    # where the linear model errs: its total time against the measured one, by kind of step
    kinds = {"prefill only": (x[:, 1] > 0) & (x[:, 2] == 0), "decode only": (x[:, 1] == 0) & (x[:, 2] > 0),
             "mixed": (x[:, 1] > 0) & (x[:, 2] > 0)}
    error["by_kind"] = {kind: {"steps": int(m.sum()), "total_time_error": float(predicted[m].sum() / y[m].sum() - 1)}
                        for kind, m in kinds.items() if m.any()}
    return terms, error


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bench")
    ap.add_argument("--kv-tokens", type=int, default=16384)
    ap.add_argument("--max-context", type=int, default=4096, help="longest prompt measured")
    ap.add_argument("--output", type=int, default=48, help="output tokens of a decode wave")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default=None, help="profile name (default: cpu-MODEL)")
    ap.add_argument("--out", required=True, help="profile JSON to write")
    ap.add_argument("--steps", default=None, help="also write the measured steps, the fit and its errors here")
    return ap


def fit_profile(args: argparse.Namespace) -> CostModel:
    """Measure, fit, and write the profile to args.out."""
    steps = asyncio.run(measure(args))
    terms, error = fit(steps)
    if args.steps:
        Path(args.steps).write_bytes(msgspec.json.encode({"terms": terms, "error": error, "steps": steps}))
    load_token_s, points = asyncio.run(measure_load(args))
    print("host tier load-back (tokens, s):", [(n, round(t, 4)) for n, t in points])
    model = CostModel(name=args.name or f"cpu-{args.model}", **terms, host_load_token_s=load_token_s,
                      source=f"bench/fit_costs.py --model {args.model}: {error['steps']} engine steps, median "
                      f"relative error {error['median_rel_error']:.3f}, p90 {error['p90_rel_error']:.3f}, "
                      f"total time {error['total_time_error']:+.3f}, R2 {error['r2']:.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_bytes(msgspec.json.format(msgspec.json.encode(model), indent=2) + b"\n")
    print(model.source)
    print("total time error by kind of step:", {k: f"{v['total_time_error']:+.3f} ({v['steps']} steps)"
                                                for k, v in error["by_kind"].items()})
    prefill_only = [t / s[0] for s, t in steps if s[1] == 0 and s[0] >= 1024]
    if prefill_only:
        print(f"measured prefill alone (>= 1,024 tokens): {1e3 * statistics.median(prefill_only):.3f} ms/token")
    return model


def main() -> None:
    fit_profile(parser().parse_args())
