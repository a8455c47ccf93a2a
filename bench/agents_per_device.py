"""Agents per device (workloads/agents_per_device.py): the most concurrent programs each policy serves
within the latency targets, from a simulated sweep or from real replays' records.

    # simulated, at GPU scale: one plan, each policy at each concurrency (1 is the alone baseline)
    python bench/agents_per_device.py sim --trace ../shared/traces/swe/minisweagent_gemini3pro/per_turn_400.jsonl \
        --programs 64 --token-scale 1 --max-turns 30 --profile h100-llama8b --kv-tokens 400000 \
        --host-kv-tokens 800000 --policies vllm+offload,agentserve --concurrency 1,4,8,16,32 --ttft-p90 2 \
        --out bench-out/apd-swe-h100
    # real replays, one `agentserve replay --concurrency C --out DIR` per concurrency
    python bench/agents_per_device.py read --ttft-p90 10 1=bench-out/c1 2=bench-out/c2 4=bench-out/c4
"""

from __future__ import annotations

import argparse
from pathlib import Path

import msgspec

from workloads.agents_per_device import Point, Targets, alone_times, point, sustained
from workloads.driver import ProgramRecord


def sweep(records: dict[int, dict[str, list[ProgramRecord]]], targets: Targets) -> dict[str, dict]:
    """records[concurrency][policy] -> per policy: its points and the concurrency it sustains."""
    if 1 not in records:
        raise SystemExit("a sweep needs concurrency 1: the calls served alone are the slowdown's baseline")
    out = {}
    for policy in records[1]:
        alone = alone_times(records[1][policy])
        points = [point(c, runs[policy], alone, targets) for c, runs in sorted(records.items()) if policy in runs]
        out[policy] = {"points": points, "sustained": sustained(points)}
    return out


def print_sweep(result: dict[str, dict], targets: Targets) -> None:
    print(f"targets: p90 TTFT <= {targets.ttft_p90_s:g} s, mean slowdown <= {targets.slowdown:g}x")
    print("| policy | concurrency | calls | p90 TTFT s | mean slowdown | meets |")
    print("|---|---:|---:|---:|---:|---|")
    for policy, r in result.items():
        for p in r["points"]:
            ttft = "-" if p.ttft_p90_s is None else f"{p.ttft_p90_s:.2f}"
            slow = "-" if p.mean_slowdown is None else f"{p.mean_slowdown:.2f}"
            print(f"| {policy} | {p.concurrency} | {p.calls} | {ttft} | {slow} | {'yes' if p.meets else 'no'} |")
    for policy, r in result.items():
        print(f"{policy}: sustains {r['sustained']} concurrent programs")


def simulated(args) -> dict[int, dict[str, list[ProgramRecord]]]:
    from agentserve.options import HostTierOptions, ProgramOptions
    from agentserve.sim.cli import FleetShape, simulate
    from agentserve.sim.costs import load_profile
    from workloads.formats import load_trace
    from workloads.plan import ReplayConfig, plan
    from workloads.tool_times import ToolTimeModel

    base = ProgramOptions(host=HostTierOptions(kv_tokens=args.host_kv_tokens))
    shape = FleetShape(kv_tokens=args.kv_tokens, max_num_seqs=args.max_num_seqs)
    trace, cost = load_trace(args.trace), load_profile(args.profile)
    out = {}
    for c in args.concurrency:
        cfg = ReplayConfig(programs=args.programs, rate=None, concurrency=c, token_scale=args.token_scale,
                           max_turns=args.max_turns, seed=args.seed)
        programs = plan(trace, cfg, ToolTimeModel.load(), args.kv_tokens)
        _, runs = simulate(programs, args.policies, base, cost, shape, seed=args.seed, concurrency=c)
        out[c] = {spec: run["records"] for spec, run in runs.items()}
        print(f"concurrency {c}: simulated", flush=True)
    return out


def read(pairs: list[str]) -> dict[int, dict[str, list[ProgramRecord]]]:
    out = {}
    for pair in pairs:
        c, sep, folder = pair.partition("=")
        if not sep or not c.isdigit():
            raise SystemExit(f"want CONCURRENCY=DIR, not {pair!r}")
        data = (Path(folder) / "records.json").read_bytes()
        out[int(c)] = msgspec.json.decode(data, type=dict[str, list[ProgramRecord]])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ttft-p90", type=float, required=True, help="seconds: 2 on the GPU profiles, 10 on this CPU")
    ap.add_argument("--slowdown", type=float, default=2.0)
    ap.add_argument("--out", type=Path, default=None, help="write OUT/agents_per_device.json")
    sub = ap.add_subparsers(dest="mode", required=True)
    sim = sub.add_parser("sim")
    sim.add_argument("--trace", required=True)
    sim.add_argument("--programs", type=int, default=64)
    sim.add_argument("--token-scale", type=float, default=1.0)
    sim.add_argument("--max-turns", type=int, default=30)
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--profile", default="h100-llama8b")
    sim.add_argument("--kv-tokens", type=int, required=True)
    sim.add_argument("--host-kv-tokens", type=int, default=0)
    sim.add_argument("--max-num-seqs", type=int, default=256)
    sim.add_argument("--policies", type=lambda s: [p for p in s.split(",") if p], default=["vllm+offload", "agentserve"])
    sim.add_argument("--concurrency", type=lambda s: sorted({int(c) for c in s.split(",")}), default=[1, 2, 4, 8, 16, 32])
    rd = sub.add_parser("read")
    rd.add_argument("runs", nargs="+", metavar="CONCURRENCY=DIR")
    args = ap.parse_args()
    targets = Targets(ttft_p90_s=args.ttft_p90, slowdown=args.slowdown)
    result = sweep(simulated(args) if args.mode == "sim" else read(args.runs), targets)
    print_sweep(result, targets)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        doc = {"targets": targets, "args": {k: v for k, v in vars(args).items() if k != "out"}, "policies": result}
        (args.out / "agents_per_device.json").write_bytes(msgspec.json.format(msgspec.json.encode(doc, enc_hook=str)))


if __name__ == "__main__":
    main()
