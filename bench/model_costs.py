"""Measure what a turn costs on this machine for a built-in model: re-prefill of a context, decode of
an output, so `bench`'s size can be checked against the GPU ratios it stands in for (docs/models.md).

    python bench/model_costs.py --models tiny,bench --context 4096 --output 69
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from agentserve.engine import EngineSettings, start_engine


async def measure(model: str, context: int, output: int, repeats: int) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    settings = EngineSettings(model=model, kv_tokens=max(2 * context, 8192), prefix_caching=False)
    prefill, decode = [], []
    async with start_engine(settings) as engine:
        vocab = engine.model_config.get_vocab_size()

        async def one(tokens: list[int], max_tokens: int, rid: str) -> tuple[float, float]:
            t0 = time.perf_counter()
            first = None
            params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0)
            async for _ in engine.generate(TokensPrompt(prompt_token_ids=tokens), params, request_id=rid):
                if first is None:
                    first = time.perf_counter()
            return first - t0, time.perf_counter() - first

        await one([5] * 64, 4, "warmup")
        for r in range(repeats):
            ctx = [(7 * i + r) % (vocab - 10) + 5 for i in range(context)]
            ttft, _ = await one(ctx, 1, f"p{r}")
            prefill.append(ttft)
            _, dec = await one(ctx[:64], output + 1, f"d{r}")
            decode.append(dec / output)
    return {
        "model": model,
        "context": context,
        "prefill_s": statistics.median(prefill),
        "prefill_tok_s": context / statistics.median(prefill),
        "decode_s_per_token": statistics.median(decode),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,bench", help="comma-separated models, measured in one run")
    ap.add_argument("--context", type=int, default=4096, help="context tokens to re-prefill")
    ap.add_argument("--output", type=int, default=69, help="output tokens to decode")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    for model in args.models.split(","):
        report(asyncio.run(measure(model, args.context, args.output, args.repeats)), args.output)


def report(r: dict, output: int) -> None:
    decode_turn = r["decode_s_per_token"] * output
    print(f"model={r['model']} context={r['context']}: prefill {r['prefill_s']:.3f} s "
          f"({r['prefill_tok_s']:.0f} tok/s), decode {1000 * r['decode_s_per_token']:.1f} ms/token, "
          f"{output}-token output {decode_turn:.3f} s, prefill/decode per turn "
          f"{r['prefill_s'] / decode_turn:.2f}")


if __name__ == "__main__":
    main()
