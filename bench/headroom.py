"""The headroom table: how far each clairvoyant policy, admission, and the oracle are from vllm+offload
on each load, host-tier size and device, in the simulator (agentserve/sim/clairvoyant.py). It says
where better residency, order or admission could pay and where nothing can, before any of it is built.

A load is NAME=TRACE:PROGRAMS:RATE:TOKEN_SCALE:MAX_TURNS; a device is PROFILE:KV_TOKENS (its device KV
budget); a tier is the host KV tier as a multiple of the device budget.

    python bench/headroom.py --jobs 2 --out bench-out/headroom \
        --load swe=../shared/traces/swe/minisweagent_gemini3pro/per_turn_400.jsonl:16:1.0:0.25:10 \
        --load bfcl=bfcl:base:16:1.0:0.25:10 --device cpu-bench:8192 --tiers 1,2,8
    python bench/headroom.py read bench-out/headroom     # the tables again, from its units.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

# the baseline first; admission on: admitted programs' footprints fill the device budget, contended or not
POLICIES = ("vllm+offload", "agentserve", "clairvoyant", "clairvoyant+order=srpt", "agentserve+admission-mode=on",
            "clairvoyant+admission-mode=on", "oracle")


def parse_load(text: str) -> dict:
    name, sep, rest = text.partition("=")
    parts = rest.rsplit(":", 4)
    if not sep or len(parts) != 5:
        raise SystemExit(f"--load wants NAME=TRACE:PROGRAMS:RATE:TOKEN_SCALE:MAX_TURNS, not {text!r}")
    trace, programs, rate, scale, turns = parts
    return {"name": name, "trace": trace, "programs": int(programs), "rate": float(rate),
            "token_scale": float(scale), "max_turns": int(turns)}


def one(job: dict) -> dict:
    from agentserve.options import HostTierOptions, ProgramOptions
    from agentserve.sim.cli import FleetShape, simulate
    from agentserve.sim.costs import load_profile
    from workloads.formats import load_trace
    from workloads.plan import ReplayConfig, plan
    from workloads.tool_times import ToolTimeModel

    load, kv = job["load"], job["kv_tokens"]
    cfg = ReplayConfig(programs=load["programs"], rate=load["rate"], token_scale=load["token_scale"],
                       max_turns=load["max_turns"], seed=job["seed"])
    programs = plan(load_trace(load["trace"]), cfg, ToolTimeModel.load(), min(kv, job["context"]))
    base = ProgramOptions(host=HostTierOptions(kv_tokens=job["tier"] * kv))
    t0 = time.monotonic()
    summaries, _ = simulate(programs, job["policies"], base, load_profile(job["profile"]),
                            FleetShape(kv_tokens=kv, max_num_seqs=job["max_num_seqs"]), seed=job["seed"])
    return {"load": load["name"], "profile": job["profile"], "kv_tokens": kv, "tier": job["tier"],
            "wall_s": round(time.monotonic() - t0, 1),
            "policies": {p: {"jct_mean": s.jct_mean, "jct_p95": s.jct_p95, "ttft_p99": s.ttft_p99,
                             "ttft_later_p99": s.ttft_later_p99,
                             "hit_rate": s.prefix_hit_rate, "host_hit_rate": s.host_hit_rate}
                         for p, s in summaries.items()}}


def merge(units: list[dict]) -> list[dict]:
    """One row per load, device and tier from the per-policy results (wall time summed)."""
    rows: dict[tuple, dict] = {}
    for u in units:
        row = rows.setdefault((u["load"], u["profile"], u["kv_tokens"], u["tier"]), {**u, "wall_s": 0.0, "policies": {}})
        row["wall_s"] = round(row["wall_s"] + u["wall_s"], 1)
        row["policies"].update(u["policies"])
    return list(rows.values())


def print_tables(rows: list[dict], policies: list[str]) -> None:
    """Mean JCT over the baseline's (the first policy), then p95 JCT and p99 TTFT (all turns / after
    programs' first turns) over the baseline's."""
    first, rest = policies[0], policies[1:]
    print(f"mean JCT / {first}'s (below 1: faster); its own mean JCT and hit rates")
    print(f"| device | load | host tier | {first} s (hit, host hit) | " + " | ".join(rest) + " |")
    print("|---|---|---|---|" + "---:|" * len(rest))
    for r in rows:
        base = r["policies"][first]
        cells = " | ".join(f"{r['policies'][p]['jct_mean'] / base['jct_mean']:.2f}" for p in rest)
        print(f"| {r['profile']} {r['kv_tokens']:,} | {r['load']} | {r['tier']}x | {base['jct_mean']:.1f} "
              f"({base['hit_rate']:.2f}, {base['host_hit_rate'] or 0:.2f}) | {cells} |")
    print(f"\np95 JCT, p99 TTFT all / after first turns, each over {first}'s")
    print("| device | load | host tier | " + " | ".join(rest) + " |")
    print("|---|---|---|" + "---|" * len(rest))
    for r in rows:
        base = r["policies"][first]

        def over(p: str, m: str) -> str:
            value, b = r["policies"][p].get(m), base.get(m)
            return f"{value / b:.2f}" if value is not None and b else "-"
        cells = " | ".join(f"{over(p, 'jct_p95')}, {over(p, 'ttft_p99')} / {over(p, 'ttft_later_p99')}" for p in rest)
        print(f"| {r['profile']} {r['kv_tokens']:,} | {r['load']} | {r['tier']}x | {cells} |")


def read(out: Path) -> None:
    """The tables of a finished (or interrupted) sweep, from its units.jsonl."""
    units = [json.loads(line) for line in (out / "units.jsonl").read_text().splitlines() if line.strip()]
    rows = merge(units)
    policies = list(dict.fromkeys(p for u in units for p in u["policies"]))
    baseline = "vllm+offload" if "vllm+offload" in policies else policies[0]
    print_tables(rows, [baseline] + [p for p in policies if p != baseline])


def main() -> None:
    if sys.argv[1:2] == ["read"]:  # python bench/headroom.py read OUT
        return read(Path(sys.argv[2]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", action="append", type=parse_load, required=True)
    ap.add_argument("--device", action="append", required=True, help="PROFILE:KV_TOKENS")
    ap.add_argument("--tiers", default="1,2,8", help="host tier sizes, x the device budget (default: 1,2,8)")
    ap.add_argument("--context", type=int, default=131072, help="longest context a call may have")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policies", type=lambda v: [p for p in v.split(",") if p], default=list(POLICIES),
                    help="the first is the baseline (default: " + ",".join(POLICIES) + ")")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench-out/headroom"))
    a = ap.parse_args()
    jobs = []
    for device in a.device:
        profile, _, kv = device.rpartition(":")
        for load in a.load:
            for tier in (int(t) for t in a.tiers.split(",")):
                for policy in a.policies:  # one policy a job: the slow ones (clairvoyant's) spread over workers
                    jobs.append({"load": load, "profile": profile, "kv_tokens": int(kv), "tier": tier, "seed": a.seed,
                                 "context": a.context, "max_num_seqs": a.max_num_seqs, "policies": [policy]})
    a.out.mkdir(parents=True, exist_ok=True)
    units = []
    with ProcessPoolExecutor(a.jobs) as pool, (a.out / "units.jsonl").open("w") as log:
        for done in as_completed([pool.submit(one, j) for j in jobs]):
            units.append(done.result())
            log.write(json.dumps(units[-1]) + "\n")
            log.flush()  # a long sweep's finished policies survive an interrupt
    rows = merge(units)
    (a.out / "headroom.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "rows": rows},
                                                    indent=1))
    print_tables(rows, a.policies)
    print(f"written: {a.out}/headroom.json")


if __name__ == "__main__":
    main()
