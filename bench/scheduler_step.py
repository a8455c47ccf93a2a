"""Scheduler step time without the model: agentserve's scheduler plugin vs stock vLLM, one run.

The engine-level benchmark (bench/step_time.py) is dominated by model execution and its noise on a
2-core machine; this one drives vLLM's real `Scheduler` classes directly, in this process, with the
model replaced by a stub that samples one token per finished prefill/decode. Both sides get the same
seeded multi-turn program workload (arrivals and tool pauses counted in steps), the same config and
KV budget, and the same timer (`agentserve.engine.step_timer`); sides alternate over rounds so
machine drift hits all alike. The plugin side pins every non-final turn (TTL 60 s: pins end by
being consumed, by memory pressure or at program end), so its pin paths all run.

    python bench/scheduler_step.py --programs 64 --turns 8 --concurrency 24 --rounds 5
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from agentserve.engine.offline import build_scheduler
from agentserve.engine.offline import step as engine_step
from agentserve.engine.settings import EngineSettings
from agentserve.programs.fields import XARG_IS_LAST, XARG_PROGRAM, XARG_TTL

SIDES = {
    "vllm": ("agentserve.engine.step_timer.TimedScheduler", "fcfs"),
    "agentserve": ("agentserve.engine.step_timer.TimedProgramScheduler", "priority"),
}


def build(side: str, args):
    cls_name, policy = SIDES[side]
    settings = EngineSettings(model=args.model, kv_tokens=args.kv_tokens, scheduling_policy=policy,
                              max_model_len=args.max_model_len, scheduler_cls=cls_name,
                              additional_config={"agentserve": {"pin_cap_share": 0.5}})
    return build_scheduler(settings)


def run_side(side: str, args) -> dict:
    from vllm import SamplingParams
    from vllm.v1.request import Request

    scheduler, hasher = build(side, args)
    rng = random.Random(args.seed)
    tokens = {p: [rng.randrange(10, 4000) for _ in range(args.first)] for p in range(args.programs)}
    turn = dict.fromkeys(range(args.programs), 0)
    due: list[tuple[int, int]] = [(0, p) for p in range(min(args.concurrency, args.programs))]
    started = len(due)
    step, done = 0, 0
    while done < args.programs:
        for when, p in [d for d in due if d[0] <= step]:
            due.remove((when, p))
            last = turn[p] == args.turns - 1
            params = SamplingParams(max_tokens=args.output, ignore_eos=True, extra_args={
                XARG_PROGRAM: f"p{p}", XARG_IS_LAST: last, XARG_TTL: 0.0 if last else 60.0})
            scheduler.add_request(Request(f"p{p}-{turn[p]}", list(tokens[p]), params, None,
                                          arrival_time=time.time(), block_hasher=hasher))
        _, finished = engine_step(scheduler, lambda: rng.randrange(10, 4000))
        for request_id in finished:
            p = int(request_id.split("-")[0][1:])
            tokens[p] += [rng.randrange(10, 4000) for _ in range(args.output + args.grow)]
            turn[p] += 1
            if turn[p] < args.turns:
                due.append((step + 1 + int(rng.expovariate(1 / args.pause_steps)), p))
            else:
                done += 1
                if side == "agentserve":
                    scheduler.agentserve_scheduler_command("end", {"program_id": f"p{p}"})
                if started < args.programs:
                    due.append((step + 1, started))
                    started += 1
        step += 1
    times = scheduler.take_step_times()
    counters = dict(getattr(scheduler, "counters", {}))
    sched = [s + u for s, u in zip(times["schedule"], times["update_from_output"])]
    total = sum(sched) + sum(times["add_request"])
    return {"steps": len(sched), "total_ms": 1e3 * total, "us_per_step": 1e6 * total / len(sched),
            "us_per_request_step": 1e6 * total / max(1, sum(times["step_requests"])),
            "p99_us": 1e6 * statistics.quantiles(sched, n=100)[98],
            "add_request_us": 1e6 * statistics.mean(times["add_request"]),
            "tokens_scheduled": sum(times["step_tokens"]), "counters": counters}


COLUMNS = [("steps", "steps", "{:.0f}"), ("tokens_scheduled", "tokens computed", "{:.0f}"),
           ("total_ms", "scheduler total ms", "{:.0f}"), ("us_per_step", "us/step", "{:.1f}"),
           ("us_per_request_step", "us/request-step", "{:.2f}"), ("p99_us", "p99 us/step", "{:.0f}"),
           ("add_request_us", "add_request us", "{:.1f}")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="only its config is used (no weights are run)")
    ap.add_argument("--programs", type=int, default=64)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=24, help="programs in flight at once")
    ap.add_argument("--first", type=int, default=600, help="first-turn prompt tokens")
    ap.add_argument("--grow", type=int, default=120, help="new tokens per later turn (observation)")
    ap.add_argument("--output", type=int, default=24, help="output tokens per turn")
    ap.add_argument("--pause-steps", type=float, default=20, help="mean tool pause, in engine steps")
    ap.add_argument("--kv-tokens", type=int, default=16384)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    for _ in range(args.rounds):
        for side in SIDES:
            runs[side].append(run_side(side, args))
    rows = {side: {k: statistics.median(r[k] for r in rs) for k, _, _ in COLUMNS} for side, rs in runs.items()}
    print(f"\nmedian of {args.rounds} rounds; {args.programs} programs x {args.turns} turns, concurrency "
          f"{args.concurrency}, KV {args.kv_tokens} tokens, config of model {args.model}")
    print("| side | " + " | ".join(t for _, t, _ in COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for side, row in rows.items():
        print(f"| {side} | " + " | ".join(f.format(row[k]) for k, _, f in COLUMNS) + " |")
    a, b = rows["agentserve"], rows["vllm"]
    print(f"agentserve/vllm: us/step {a['us_per_step'] / b['us_per_step']:.3f}, "
          f"us/request-step {a['us_per_request_step'] / b['us_per_request_step']:.3f}, "
          f"scheduler total {a['total_ms'] / b['total_ms']:.3f}, tokens computed "
          f"{a['tokens_scheduled'] / b['tokens_scheduled']:.3f}")
    print("plugin counters (last round):", runs["agentserve"][-1]["counters"])


if __name__ == "__main__":
    main()
