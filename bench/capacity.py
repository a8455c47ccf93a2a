"""Capacity planning with the fleet simulator: how many replicas an agent workload needs to meet a
JCT target, under each router and policy.

For every (policy, router) and every fleet size, one `agentserve sim` run of the same plan (the same
programs, arrivals, tool times); reports mean and p95 JCT, the prefix hit rate and the host tier's
share, the smallest fleet that meets the target, and plots mean JCT against replicas.

    python bench/capacity.py --trace ../shared/traces/swe/minisweagent_gemini3pro/per_turn_400.jsonl \
        --profile h100-llama8b --kv-tokens 200000 --programs 1000 --rate 2 --token-scale 1 --max-turns 30 \
        --replicas 2,4,8,16 --routers affinity,prefix,pow2 --policies vllm,vllm+offload,agentserve \
        --target-jct 120 --out bench-out/capacity
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from agentserve.options import ProgramOptions
from agentserve.sim.cli import FleetShape, simulate
from agentserve.sim.costs import load_profile
from workloads import DEFAULT_TRACE
from workloads.formats import load_trace
from workloads.plan import ReplayConfig, plan
from workloads.tool_times import ToolTimeModel


def one(job: dict) -> dict:
    """One simulated fleet: its summary row."""
    args = job["args"]
    cfg = ReplayConfig(programs=args["programs"], rate=args["rate"], token_scale=args["token_scale"],
                       time_scale=args["time_scale"], max_turns=args["max_turns"], seed=args["seed"])
    programs = plan(load_trace(args["trace"], "auto"), cfg, ToolTimeModel.load(), args["context"])
    shape = FleetShape(kv_tokens=args["kv_tokens"], replicas=job["replicas"], router=job["router"],
                       max_num_seqs=args["max_num_seqs"], max_batched_tokens=args["max_batched_tokens"])
    summaries, runs = simulate(programs, [job["policy"]], ProgramOptions(), load_profile(args["profile"]), shape,
                               seed=args["seed"])
    result, run = summaries[job["policy"]], runs[job["policy"]]
    return {"policy": job["policy"], "router": job["router"], "replicas": job["replicas"],
            "jct_mean": result.jct_mean, "jct_p95": result.jct_p95, "ttft_p99": result.ttft_p99,
            "hit_rate": result.prefix_hit_rate, "host_hit_rate": result.host_hit_rate,
            "preemptions": result.preemptions, "events": run["events"], "wall_s": run["wall_s"]}


def smallest(rows: list[dict], target: float) -> int | None:
    """The fewest replicas whose mean JCT meets the target (None: none of the sizes tried)."""
    met = [r["replicas"] for r in rows if r["jct_mean"] is not None and r["jct_mean"] <= target]
    return min(met) if met else None


def plot(rows: list[dict], target: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"affinity": ("-", "o"), "prefix": ("--", "s"), "pow2": (":", "^")}  # a line style per router
    policies = sorted({r["policy"] for r in rows})
    colors = dict(zip(policies, plt.rcParams["axes.prop_cycle"].by_key()["color"]))  # a color per policy
    for key in sorted({(r["policy"], r["router"]) for r in rows}):
        pts = sorted((r["replicas"], r["jct_mean"]) for r in rows if (r["policy"], r["router"]) == key)
        line, marker = styles.get(key[1], ("-", "o"))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], line, marker=marker, color=colors[key[0]],
                label=f"{key[0]}, {key[1]}", alpha=0.85)
    ax.axhline(target, color="grey", lw=0.8)
    ax.text(min(r["replicas"] for r in rows), target * 1.03, f"target {target:g} s", fontsize=7, color="grey")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("replicas")
    ax.set_ylabel("mean JCT (s)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default=str(DEFAULT_TRACE), help="(default: the embedded SWE sample)")
    ap.add_argument("--profile", default="h100-llama8b")
    ap.add_argument("--kv-tokens", type=int, default=200_000, help="device KV per replica")
    ap.add_argument("--context", type=int, default=None, help="longest context (default: min(kv-tokens, 131072))")
    ap.add_argument("--programs", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=2.0)
    ap.add_argument("--token-scale", type=float, default=1.0)
    ap.add_argument("--time-scale", type=float, default=1.0)
    ap.add_argument("--max-turns", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-batched-tokens", type=int, default=8192)
    ap.add_argument("--replicas", default="2,4,8,16")
    ap.add_argument("--routers", default="affinity,prefix,pow2")
    ap.add_argument("--policies", default="vllm,vllm+offload,agentserve")
    ap.add_argument("--target-jct", type=float, required=True, help="mean JCT target (s)")
    ap.add_argument("--jobs", type=int, default=2, help="simulations run at once (default: 2)")
    ap.add_argument("--out", default="bench-out/capacity")
    ap.add_argument("--plot-only", action="store_true", help="redraw OUT/capacity.png from OUT/capacity.json")
    a = ap.parse_args()
    if a.plot_only:
        saved = json.loads((Path(a.out) / "capacity.json").read_text())
        c = saved["config"]
        plot(saved["rows"], a.target_jct, Path(a.out) / "capacity.png",
             f"{c['programs']} programs at {c['rate']}/s, {c['profile']}, {c['kv_tokens']:,} KV tokens per replica")
        return
    args = {**vars(a), "context": a.context or min(a.kv_tokens, 131072)}
    jobs = [{"args": args, "policy": p, "router": r, "replicas": int(n)}
            for p in a.policies.split(",") for r in a.routers.split(",") for n in a.replicas.split(",")]
    t0 = time.monotonic()
    with ProcessPoolExecutor(a.jobs) as pool:
        rows = list(pool.map(one, jobs))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "capacity.json").write_text(json.dumps({"config": args, "rows": rows}, indent=1))
    print(f"{len(rows)} fleets simulated in {time.monotonic() - t0:.0f} s "
          f"({sum(r['events'] for r in rows) / sum(r['wall_s'] for r in rows):.0f} events/s per process)")
    print("| policy | router | " + " | ".join(f"{n} replicas" for n in a.replicas.split(",")) + " | fewest at target |")
    print("|---" * (3 + len(a.replicas.split(","))) + "|")
    for p in a.policies.split(","):
        for r in a.routers.split(","):
            cells = sorted((x for x in rows if x["policy"] == p and x["router"] == r), key=lambda x: x["replicas"])
            line = " | ".join(f"{x['jct_mean']:.1f} s, hit {x['hit_rate']:.2f}" for x in cells)
            print(f"| {p} | {r} | {line} | {smallest(cells, a.target_jct) or '-'} |")
    plot(rows, a.target_jct, out / "capacity.png",
         f"{a.programs} programs at {a.rate}/s, {a.profile}, {a.kv_tokens:,} KV tokens per replica")
    print(f"written: {out}/capacity.json, {out}/capacity.png")


if __name__ == "__main__":
    main()
