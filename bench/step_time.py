"""Scheduler step time: agentserve's scheduler plugin vs stock vLLM on the same workload, one run.

Both sides run the same timed wrapper (`agentserve.engine.step_timer`) around the scheduler, on the
same engine build, model and KV budget, with the same seeded multi-turn program workload sent straight
to the engine (no HTTP, so nothing but the scheduler differs). The plugin side pins every non-final
turn for `--ttl` seconds so that the pin, unpin, expiry, pressure-release and queue-reorder paths all
run; the KV budget is small enough that pins meet memory pressure.

    python bench/step_time.py --programs 48 --turns 6 --concurrency 16 --kv-tokens 8192

`--host-kv-tokens N` gives every side the same host KV tier (vLLM's offloading connector with
agentserve's copy worker); the plugin side then also runs its host policy (`--host-policy`).

Reports the scheduler's own time per engine step (schedule + update_from_output, plus add_request per
request) and the whole step (time between two schedule() calls) for both, and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

import msgspec
from agentserve.engine import EngineSettings, start_engine
from agentserve.programs.fields import XARG_IS_LAST, XARG_PROGRAM, XARG_TTL

SIDES = {
    "vllm": ("agentserve.engine.step_timer.TimedScheduler", "fcfs"),
    "agentserve": ("agentserve.engine.step_timer.TimedProgramScheduler", "priority"),
    # stock vLLM with its priority policy (what the plugin builds on), every request at priority 0
    "vllm-priority": ("agentserve.engine.step_timer.TimedScheduler", "priority"),
}


def workload(programs: int, turns: int, first: int, grow: int, output: int, seed: int) -> list[list[dict]]:
    """Per program, its turns: new input tokens, output length, tool pause after it (seconds)."""
    rng = random.Random(seed)
    return [[{"new": first if t == 0 else grow, "output": output, "pause": rng.expovariate(1 / 0.3)}
             for t in range(turns)] for _ in range(programs)]


async def run_side(side: str, args, programs: list[list[dict]]) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    scheduler_cls, policy = SIDES[side]
    settings = EngineSettings(model=args.model, kv_tokens=args.kv_tokens, scheduler_cls=scheduler_cls,
                              scheduling_policy=policy, max_model_len=args.max_model_len,
                              additional_config={"agentserve": {"pin_cap_share": 0.5,
                                                                "host_tokens": args.host_kv_tokens}}).for_device()
    settings = msgspec.structs.replace(settings, kv_transfer_config=host_tier(args, settings.block_size,
                                                                             programs=side == "agentserve"))
    async with start_engine(settings) as engine:
        vocab = engine.model_config.get_vocab_size()
        core = engine.engine_core
        gate = asyncio.Semaphore(args.concurrency)

        async def program(pid: int, turns: list[dict]) -> None:
            rng = random.Random(pid)
            tokens: list[int] = []
            async with gate:
                for t, turn in enumerate(turns):
                    tokens += [rng.randrange(10, vocab) for _ in range(turn["new"])]
                    last = t == len(turns) - 1
                    xargs = {XARG_PROGRAM: f"p{pid}", XARG_IS_LAST: last, XARG_TTL: 0.0 if last else args.ttl}
                    params = SamplingParams(max_tokens=turn["output"], ignore_eos=True, temperature=0,
                                            extra_args=xargs)
                    async for out in engine.generate(TokensPrompt(prompt_token_ids=tokens), params, f"p{pid}-{t}"):
                        final = out
                    tokens += list(final.outputs[0].token_ids)
                    if not last:
                        await asyncio.sleep(turn["pause"])
            if side == "agentserve":
                await core.call_utility_async("agentserve_scheduler_command", "end", {"program_id": f"p{pid}"})

        await core.call_utility_async("agentserve_step_times")  # drop start-up steps
        t0 = time.perf_counter()
        await asyncio.gather(*(program(i, turns) for i, turns in enumerate(programs)))
        wall = time.perf_counter() - t0
        times = await core.call_utility_async("agentserve_step_times")
        stats = (await core.call_utility_async("agentserve_scheduler_command", "tick", {})) if side == "agentserve" else {}
    return summarize(side, times, wall, stats)


def host_tier(args, block_size: int, programs: bool) -> dict | None:
    """The same host tier for every side (None without --host-kv-tokens)."""
    if not args.host_kv_tokens:
        return None
    from agentserve.engine.settings import kv_bytes_per_token, resolve_model
    from agentserve.hosttier.config import offloading_config
    from agentserve.options import HostTierOptions

    options = HostTierOptions(kv_tokens=args.host_kv_tokens, policy=args.host_policy)
    return offloading_config(options, block_size=block_size,
                             kv_bytes_per_token=kv_bytes_per_token(resolve_model(args.model)[0], "float32"),
                             programs=programs)


def summarize(side: str, times: dict, wall: float, stats: dict) -> dict:
    sched, update, add = times["schedule"], times["update_from_output"], times["add_request"]
    busy = [i for i, n in enumerate(times["step_tokens"]) if n > 0]
    sched_busy = [sched[i] + update[i] for i in busy]
    total = sum(sched) + sum(update) + sum(add)
    return {
        "side": side,
        "steps": len(busy),
        "tokens": sum(times["step_tokens"]),  # tokens computed: what the steps did differs with the cache hits
        "wall_s": wall,
        # scheduler time per busy step, and per scheduled request in a step (the batch-size-free figure)
        "sched_us_per_step": 1e6 * total / len(busy),
        "sched_us_per_request_step": 1e6 * total / sum(times["step_requests"]),
        "sched_us_p99": 1e6 * statistics.quantiles(sched_busy, n=100)[98],
        "add_request_us": 1e6 * statistics.mean(add),
        "step_ms": 1e3 * statistics.mean(times["step"][i] for i in busy),
        "sched_share_of_step": total / sum(times["step"][i] for i in busy),
        "counters": stats.get("counters", {}),
    }


COLUMNS = [("steps", "steps", "{:.0f}"), ("tokens", "tokens computed", "{:.0f}"), ("wall_s", "wall s", "{:.1f}"),
           ("sched_us_per_step", "sched us/step", "{:.0f}"),
           ("sched_us_per_request_step", "sched us/req-step", "{:.1f}"),
           ("sched_us_p99", "sched p99 us", "{:.0f}"), ("add_request_us", "add_request us", "{:.1f}"),
           ("step_ms", "step ms", "{:.2f}"), ("sched_share_of_step", "sched share", "{:.2%}")]


def median_row(runs: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in runs) for key, _, _ in COLUMNS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--programs", type=int, default=48)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--concurrency", type=int, default=16, help="programs in flight at once")
    ap.add_argument("--first", type=int, default=600, help="first-turn prompt tokens")
    ap.add_argument("--grow", type=int, default=120, help="new tokens per later turn (observation)")
    ap.add_argument("--output", type=int, default=24, help="output tokens per turn")
    ap.add_argument("--ttl", type=float, default=2.0, help="pin TTL of the plugin side (s)")
    ap.add_argument("--kv-tokens", type=int, default=8192)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--host-kv-tokens", type=int, default=0, help="a host KV tier of this size on every side")
    ap.add_argument("--host-policy", default="lru", choices=["lru", "next-use"], help="the plugin side's host policy")
    ap.add_argument("--rounds", type=int, default=1, help="repeat all sides; medians are reported")
    ap.add_argument("--order", default="vllm,agentserve,vllm-priority", help="sides in the order they run")
    args = ap.parse_args()
    programs = workload(args.programs, args.turns, args.first, args.grow, args.output, args.seed)
    sides = args.order.split(",")
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for _ in range(args.rounds):  # rounds interleave the sides, so drift on the machine hits all alike
        for side in sides:
            runs[side].append(asyncio.run(run_side(side, args, programs)))
    rows = {side: median_row(r) for side, r in runs.items()}
    print(f"\nmedian of {args.rounds} round(s); {args.programs} programs x {args.turns} turns, "
          f"concurrency {args.concurrency}, model {args.model}, KV {args.kv_tokens} tokens, "
          f"host tier {args.host_kv_tokens} tokens ({args.host_policy} on the plugin side)")
    print("| side | " + " | ".join(title for _, title, _ in COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for side, row in rows.items():
        print(f"| {side} | " + " | ".join(fmt.format(row[key]) for key, _, fmt in COLUMNS) + " |")
    if "vllm" in rows:
        for side in (s for s in rows if s != "vllm"):
            print(f"{side}/vllm: sched per step {rows[side]['sched_us_per_step'] / rows['vllm']['sched_us_per_step']:.3f},"
                  f" per request-step {rows[side]['sched_us_per_request_step'] / rows['vllm']['sched_us_per_request_step']:.3f},"
                  f" step {rows[side]['step_ms'] / rows['vllm']['step_ms']:.3f}")
    if "agentserve" in runs:
        print("plugin counters (last round):", runs["agentserve"][-1]["counters"])


if __name__ == "__main__":
    main()
