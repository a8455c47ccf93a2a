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

from agentserve.options import ProgramOptions, add_flags, from_flags, to_flags
from agentserve.routing.routers import DEFAULT_ROUTER, ROUTERS


def add_sim_parser(sub, replay_workload_flags) -> None:
    from agentserve.sim.costs import DEVICES, PROFILES, SHAPES
    from agentserve.policies import POLICIES

    sp = sub.add_parser(
        "sim", help="simulate a trace replay on a fleet of replicas: the same policies, plan and results.json",
        description="Simulate `agentserve replay` on N replicas: a discrete-event simulation that runs "
        "agentserve's own control plane, program book, queue order and router over a cost model. Writes "
        "OUT/results.json (the replay's fields) and prints the side-by-side table.")
    replay_workload_flags(sp)
    sp.add_argument("--policies", default="vllm,agentserve,oracle",
                    help=f"comma-separated, from {','.join(POLICIES)}, each with +KEY=VALUE program options, "
                    "+replicas=N, +router=R and vllm+offload, as the replay's (default: vllm,agentserve,oracle)")
    sp.add_argument("--replicas", type=int, default=1, help="replicas in the fleet (default: 1)")
    sp.add_argument("--router", default=DEFAULT_ROUTER, choices=list(ROUTERS), help=f"(default: {DEFAULT_ROUTER})")
    sp.add_argument("--profile", default="cpu-bench",
                    help=f"cost model: {', '.join(PROFILES)}; roofline:MODEL@DEVICE[xTP] (MODEL: "
                    f"{', '.join(SHAPES)}; DEVICE: {', '.join(DEVICES)}); or a profile JSON from "
                    "bench/fit_costs.py (default: cpu-bench)")
    sp.add_argument("--cost-scale", type=float, default=1.0,
                    help="every time of the cost model x this: the same engine on a slower (>1) or faster machine; "
                    "e.g. a real run's mean decode step (its turns.json) over the simulator's (default: 1)")
    sp.add_argument("--kv-tokens", type=int, default=8192, help="KV budget per replica in tokens (default: 8192)")
    sp.add_argument("--block-size", type=int, default=32, help="(default: 32)")
    sp.add_argument("--max-num-seqs", type=int, default=64, help="(default: 64)")
    sp.add_argument("--max-batched-tokens", type=int, default=8192, help="(default: 8192)")
    sp.add_argument("--turn-times", action="store_true",
                    help="split each call's time in its engine by part, as `replay --turn-times` does a real engine's "
                    "(OUT/turns.json; bench/turn_split.py reads it); the simulation runs slower")
    sp.add_argument("--out", default="sim-out", help="output directory (default: sim-out)")
    sp.add_argument("--compare", metavar="RESULTS_JSON", default=None,
                    help="a real replay's results.json of the same plan: print the error per metric and policy and "
                    "whether the ranking agrees; written to OUT/validation.json")
    add_flags(sp.add_argument_group("programs (every plugin policy; +KEY=VALUE in --policies overrides)"),
              ProgramOptions, skip=("--policy", "--tenants", "--otlp-traces-endpoint", "--seed", "--kvshare",
                                    "--kvshare-gate", "--kvshare-temperature", "--kvshare-correction",
                                    "--cross-model", "--cross-model-group", "--cross-model-max-kl",
                                    "--cross-model-profile"))


def policy_options(spec: str, base: ProgramOptions, kv_tokens: int) -> tuple[str, ProgramOptions, dict]:
    """(policy, its program options, its fleet overrides) of a replay policy spec `NAME+KEY=VALUE...`:
    `base` (the command's flags) with the spec's options over it, the host tier sized as the replay
    sizes it (the plugin policies and vllm+offload get --host-kv-tokens, by default HOST_AUTO_FACTOR
    x the device budget; vllm and oracle none), `replicas` and `router` apart."""
    from agentserve.options import HOST_AUTO_FACTOR
    from agentserve.policies import POLICIES
    from workloads.replay import policy_spec

    name, extra = policy_spec(spec)
    argv, fleet, rest = to_flags(base), {}, list(extra)
    while rest:
        flag = rest.pop(0)
        if flag in ("--replicas", "--router"):
            value = rest.pop(0)
            fleet[flag[2:]] = int(value) if flag == "--replicas" else value
        elif rest and not rest[0].startswith("--"):
            argv += [flag, rest.pop(0)]
        else:  # a switch (--x, --no-x)
            argv.append(flag)
    parser = argparse.ArgumentParser(prog=spec, add_help=False)
    add_flags(parser, ProgramOptions)
    options = from_flags(ProgramOptions, parser.parse_args(argv), policy=POLICIES[name].serves or name)
    host = options.host.kv_tokens if POLICIES[name].host_tier else 0
    if host is None:
        host = HOST_AUTO_FACTOR * kv_tokens
    return name, msgspec.structs.replace(options, host=msgspec.structs.replace(options.host, kv_tokens=host)), fleet


class FleetShape(msgspec.Struct, frozen=True, kw_only=True):
    """What every policy's fleet is, unless its spec says otherwise (+replicas, +router)."""

    kv_tokens: int
    replicas: int = 1
    router: str = DEFAULT_ROUTER
    block_size: int = 32
    max_num_seqs: int = 64
    max_batched_tokens: int = 8192


def simulate(programs, policies: list[str], base: ProgramOptions, cost, shape: FleetShape, *, seed: int = 0,
             concurrency: int | None = None, turn_times: bool = False) -> tuple[dict, dict]:
    """Every policy over the same plan: (summaries by spec, each run's fleet, speed and records)."""
    from agentserve.sim.fleet import Fleet, FleetSetup
    from workloads.report import summarize

    specs = [(spec, *policy_options(spec, base, shape.kv_tokens)) for spec in policies]
    for spec, _, _, fleet in specs:
        if fleet.get("router", shape.router) not in ROUTERS or fleet.get("replicas", shape.replicas) < 1:
            raise ValueError(f"{spec!r}: router from {', '.join(ROUTERS)}, replicas >= 1")
    summaries, runs = {}, {}
    for spec, name, options, fleet in specs:
        setup = FleetSetup(policy=name, replicas=fleet.get("replicas", shape.replicas), kv_tokens=shape.kv_tokens,
                           cost=cost, router=fleet.get("router", shape.router), block_size=shape.block_size,
                           max_num_seqs=shape.max_num_seqs, max_batched_tokens=shape.max_batched_tokens,
                           options=options, seed=seed, turn_times=turn_times)
        t0 = time.monotonic()
        sim = Fleet(setup)
        records = sim.run(programs, concurrency)
        wall = time.monotonic() - t0
        summaries[spec] = summarize(records, sim.server_stats())
        runs[spec] = {"replicas": setup.replicas, "router": setup.router, "host_kv_tokens": setup.host_kv_tokens,
                      "events": sim.events_run, "wall_s": round(wall, 3),
                      "events_per_s": round(sim.events_run / wall) if wall > 0 else None, "records": records,
                      "turns": sim.turn_times()}
    return summaries, runs


def cmd_sim(args: argparse.Namespace) -> int:
    from agentserve.sim.costs import load_profile
    from workloads.formats import load_trace
    from workloads.plan import ReplayConfig, plan
    from workloads.report import Results, table
    from workloads.tool_times import ToolTimeModel

    rate = args.rate if args.rate is not None or args.concurrency is not None else 0.5
    cfg = ReplayConfig(programs=args.programs, rate=rate, concurrency=args.concurrency, token_scale=args.token_scale,
                       time_scale=args.time_scale, max_turns=args.max_turns, seed=args.seed)
    base = from_flags(ProgramOptions, args)
    if args.compare and not Path(args.compare).is_file():
        raise SystemExit(f"agentserve sim: --compare {args.compare}: no such file")
    shape = FleetShape(kv_tokens=args.kv_tokens, replicas=args.replicas, router=args.router,
                       block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                       max_batched_tokens=args.max_batched_tokens)
    policies = [p for p in args.policies.split(",") if p]
    try:
        cost = load_profile(args.profile).scaled(args.cost_scale)
        for spec in policies:
            policy_options(spec, base, args.kv_tokens)  # fail before the trace is read
    except ValueError as e:
        raise SystemExit(f"agentserve sim: {e}") from None
    programs = plan(load_trace(args.trace, args.format), cfg, ToolTimeModel.load(), args.kv_tokens)
    try:
        summaries, runs = simulate(programs, policies, base, cost, shape, seed=args.seed,
                                   concurrency=cfg.concurrency, turn_times=args.turn_times)
    except ValueError as e:
        raise SystemExit(f"agentserve sim: {e}") from None
    records = {spec: run.pop("records") for spec, run in runs.items()}
    turns = {spec: [{**t, "round": 0} for t in run.pop("turns")] for spec, run in runs.items()}
    config = {"trace": args.trace, "programs": len(programs), "replicas": args.replicas, "router": args.router,
              "profile": msgspec.to_builtins(cost), "kv_tokens": args.kv_tokens, "workload": msgspec.to_builtins(cfg),
              "simulated": runs}
    results = Results(config=config, policies=summaries)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_bytes(msgspec.json.format(msgspec.json.encode(results), indent=2) + b"\n")
    (out / "records.json").write_bytes(msgspec.json.encode(records))  # the replay's per-turn records
    if args.turn_times:
        (out / "turns.json").write_bytes(msgspec.json.encode(turns))  # as `replay --turn-times` writes them
    print(table(results))
    for spec, run in runs.items():
        print(f"{spec}: {run['events']} events in {run['wall_s']} s ({run['events_per_s']} events/s)")
    written = [f"{out}/results.json", f"{out}/records.json"] + ([f"{out}/turns.json"] if args.turn_times else [])
    if args.compare:
        from agentserve.sim.validate import compare, load, report

        validation = compare(results, load(args.compare))
        (out / "validation.json").write_bytes(msgspec.json.format(msgspec.json.encode(validation), indent=2) + b"\n")
        print("\nagainst " + args.compare + ":\n" + report(validation))
        written.append(f"{out}/validation.json")
    print(f"\nwritten: {', '.join(written)}")
    return 0
