"""`agentserve sim`: the replay's workload on a simulated fleet, with the replay's options and output.

The trace, the plan (programs, arrivals, token counts, tool times) and `results.json` are the
replay's (workloads/), so a simulated run and a real one compare line by line; `--replicas`,
`--router` and `--profile` (the cost model) say what fleet serves it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import msgspec

from agentserve.options import ProgramOptions, add_flags, flag_names, from_flags, to_flags


def add_sim_parser(sub, replay_workload_flags) -> None:
    from agentserve.sim.costs import PROFILES
    from agentserve.sim.fleet import POLICIES
    from agentserve.sim.routers import ROUTERS

    sp = sub.add_parser(
        "sim", help="simulate a trace replay on a fleet of replicas: the same policies, plan and results.json",
        description="Simulate `agentserve replay` on N replicas: a discrete-event simulation that runs "
        "agentserve's own control plane, program book, queue order and router over a cost model. Writes "
        "OUT/results.json (the replay's fields) and prints the side-by-side table.")
    replay_workload_flags(sp)
    sp.add_argument("--policies", default="vllm,agentserve,oracle",
                    help=f"comma-separated, from {','.join(POLICIES)}, each with +KEY=VALUE program options "
                    "like the replay's (default: vllm,agentserve,oracle)")
    sp.add_argument("--replicas", type=int, default=1, help="replicas in the fleet (default: 1)")
    sp.add_argument("--router", default="affinity", choices=ROUTERS, help="(default: affinity)")
    sp.add_argument("--profile", default="cpu-bench", choices=sorted(PROFILES), help="cost model (default: cpu-bench)")
    sp.add_argument("--kv-tokens", type=int, default=8192, help="KV budget per replica in tokens (default: 8192)")
    sp.add_argument("--block-size", type=int, default=32, help="(default: 32)")
    sp.add_argument("--max-num-seqs", type=int, default=64, help="(default: 64)")
    sp.add_argument("--max-batched-tokens", type=int, default=8192, help="(default: 8192)")
    sp.add_argument("--out", default="sim-out", help="output directory (default: sim-out)")
    add_flags(sp.add_argument_group("programs (every plugin policy; +KEY=VALUE in --policies overrides)"),
              ProgramOptions, skip=("--policy", "--tenants", "--otlp-traces-endpoint", "--seed", "--kvshare",
                                    "--kvshare-gate", "--kvshare-temperature", "--kvshare-correction",
                                    "--cross-model", "--cross-model-group", "--cross-model-max-kl",
                                    "--cross-model-profile"))


def policy_options(spec: str, base: ProgramOptions) -> tuple[str, ProgramOptions]:
    """(policy, its program options) of a `NAME+KEY=VALUE...` spec: `base` (the command's flags) with
    the spec's options over it."""
    from agentserve.sim.fleet import POLICIES

    name, *pairs = spec.split("+")
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r} in {spec!r}; choose from {', '.join(POLICIES)}")
    argv = to_flags(base)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key == "policy" or f"--{key}" not in flag_names(ProgramOptions):
            raise ValueError(f"bad policy option {pair!r} in {spec!r}: want KEY=VALUE, KEY a program option")
        argv += [f"--{key}", value]
    parser = argparse.ArgumentParser(prog=spec, add_help=False)
    add_flags(parser, ProgramOptions)
    return name, from_flags(ProgramOptions, parser.parse_args(argv), policy=name if name != "oracle" else "vllm")


def cmd_sim(args: argparse.Namespace) -> int:
    from agentserve.sim.costs import PROFILES
    from agentserve.sim.fleet import Fleet, FleetSetup
    from workloads.formats import load_trace
    from workloads.plan import ReplayConfig, plan
    from workloads.report import Results, summarize, table
    from workloads.tool_times import ToolTimeModel

    rate = args.rate if args.rate is not None or args.concurrency is not None else 0.5
    cfg = ReplayConfig(programs=args.programs, rate=rate, concurrency=args.concurrency, token_scale=args.token_scale,
                       time_scale=args.time_scale, max_turns=args.max_turns, seed=args.seed)
    if args.concurrency is not None:
        raise SystemExit("agentserve sim: --concurrency is not simulated yet; give --rate")
    trace = load_trace(args.trace, args.format)
    programs = plan(trace, cfg, ToolTimeModel.load(), args.kv_tokens)
    base = from_flags(ProgramOptions, args)
    summaries, runs = {}, {}
    for spec in [p for p in args.policies.split(",") if p]:
        name, options = policy_options(spec, base)
        setup = FleetSetup(policy=name, replicas=args.replicas, kv_tokens=args.kv_tokens,
                           cost=PROFILES[args.profile], router=args.router, block_size=args.block_size,
                           max_num_seqs=args.max_num_seqs, max_batched_tokens=args.max_batched_tokens,
                           options=options, seed=args.seed)
        t0 = time.monotonic()
        fleet = Fleet(setup)
        records = fleet.run(programs)
        wall = time.monotonic() - t0
        summaries[spec] = summarize(records, fleet.server_stats())
        runs[spec] = {"events": fleet.events_run, "wall_s": round(wall, 3),
                      "events_per_s": round(fleet.events_run / wall) if wall > 0 else None}
    config = {"trace": args.trace, "programs": len(programs), "replicas": args.replicas, "router": args.router,
              "profile": args.profile, "kv_tokens": args.kv_tokens, "workload": msgspec.to_builtins(cfg),
              "simulated": runs}
    results = Results(config=config, policies=summaries)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_bytes(msgspec.json.format(msgspec.json.encode(results), indent=2) + b"\n")
    print(table(results))
    for spec, run in runs.items():
        print(f"{spec}: {run['events']} events in {run['wall_s']} s ({run['events_per_s']} events/s)")
    print(f"\nwritten: {out}/results.json")
    return 0
