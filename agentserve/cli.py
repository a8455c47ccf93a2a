"""The `agentserve` command line: `serve` the OpenAI API on a vLLM engine; `replay` an agent trace
against several policies side by side; `models` lists / builds the locally built models."""

from __future__ import annotations

import argparse
import logging
import sys

from agentserve.options import EngineSettings, ProgramOptions, add_flags, from_flags
from agentserve.routing.routers import DEFAULT_ROUTER, ROUTERS
from workloads import DEFAULT_TRACE


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentserve",
        description="Serving layer for agent programs on vLLM: program-level scheduling, KV pins "
        "across tool calls, KV sharing, trace replay.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="serve the OpenAI-compatible API on one vLLM engine",
        description="Start a vLLM engine and serve /v1/chat/completions, /v1/completions, "
        "/v1/models, /health and /metrics (vLLM's own OpenAI serving code). Usage reports "
        "usage.prompt_tokens_details.cached_tokens, the prefix-cache hit of each request.",
    )
    add_flags(serve.add_argument_group("engine"), EngineSettings)
    s = serve.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    s.add_argument("--replicas", type=_positive_int, default=None,
                   help="serve on Ray Serve with this many vLLM replicas behind the program-affinity router "
                   "and one shared program control plane (a local Ray cluster, or the one RAY_ADDRESS names); "
                   "without it: one embedded engine in this process")
    s.add_argument("--router", default=DEFAULT_ROUTER, choices=list(ROUTERS),
                   help="with --replicas: " + "; ".join(f"{r.name} = {r.help}" for r in ROUTERS.values())
                   + f" (default: {DEFAULT_ROUTER})")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="agentserve log level (default: info)")
    add_flags(serve.add_argument_group("programs"), ProgramOptions)

    add_replay_parser(sub)
    from agentserve.sim.cli import add_sim_parser

    add_sim_parser(sub, add_workload_flags)

    models = sub.add_parser(
        "models",
        help="list the built-in models, or build them into the cache",
        description="List the built-in models with their cache directories; --build builds them now "
        "(otherwise they are built on first use).",
    )
    models.add_argument("--build", action="store_true", help="build every listed model that is missing")
    models.add_argument("names", nargs="*", help="models to list or build (default: all)")
    return parser


def _csv(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


# The replay's engine takes the replay's own --seed (workload) and --policies instead; its standard
# load is an 8k-token KV budget (docs/benchmarks.md).
REPLAY_SKIPS = ("--seed", "--policy", "--otlp-traces-endpoint", "--tenants", "--idle-timeout", "--kvshare",
                "--kvshare-gate", "--kvshare-temperature", "--kvshare-correction", "--cross-model",
                "--cross-model-group", "--cross-model-max-kl", "--cross-model-profile")
REPLAY_KV_TOKENS = 8192


def add_workload_flags(p) -> None:
    """What is replayed (`replay` and `sim` alike): the trace, how many programs, their arrivals, scaling."""
    from workloads.formats import FORMATS

    p.add_argument("--trace", default=str(DEFAULT_TRACE),
                   help="trace file or directory, or bfcl:CATEGORY (base, long_context, miss_func, miss_param), "
                   "or fanout:KxW:TRACE (default: the embedded 16-program mini-swe-agent SWE-bench sample)")
    p.add_argument("--format", default="auto", choices=["auto", *FORMATS], help="trace format (default: auto)")
    p.add_argument("--programs", type=_positive_int, default=8, help="programs to replay (default: 8)")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--rate", type=float, default=None, help="Poisson program arrivals per second (default: 0.5)")
    load.add_argument("--concurrency", type=_positive_int, default=None, help="run this many programs at once instead")
    p.add_argument("--token-scale", type=float, default=0.25, help="multiply every token count (default: 0.25)")
    p.add_argument("--time-scale", type=float, default=1.0, help="multiply every tool duration (default: 1)")
    p.add_argument("--max-turns", type=_positive_int, default=10, help="LLM calls per program at most (default: 10)")
    p.add_argument("--seed", type=int, default=0, help="program sample, arrivals, tool times (default: 0)")


def add_replay_parser(sub) -> None:
    from agentserve.policies import POLICIES

    rp = sub.add_parser(
        "replay",
        help="replay an agent trace against several policies on one engine; compare JCT, TTFT, cache hits",
        description="Replay agent programs from a trace (SWE-bench mini-swe-agent, OpenHands, SWE-agent, "
        "Continuum, BFCL, or agentserve's own schema) against each policy in turn: a fresh server per "
        "policy, the same model, KV budget and arrival plan. Writes OUT/results.json, records.json, "
        "jct_cdf.png and timeline.png and prints the side-by-side table.",
    )
    add_workload_flags(rp)
    rp.add_argument("--policies", type=_csv, default=["vllm", "continuum", "agentserve", "oracle"],
                    help=f"comma-separated, run in this order, from {','.join(POLICIES)}; a plugin policy "
                    "may carry its own `agentserve serve` program options as +KEY=VALUE (KEY: the flag without --, "
                    "or replicas, router), e.g. agentserve+pin-mode=ordered+max-wait=0; vllm+offload is stock vLLM with "
                    "the host tier of --host-kv-tokens (which every plugin policy gets too, vllm and oracle never) "
                    "(default: vllm,continuum,agentserve,oracle)")
    rp.add_argument("--endpoint", action="append", default=[], metavar="NAME=URL",
                    help="also replay against a running OpenAI-compatible server (e.g. a stock vllm serve "
                    "of the same model), with plain OpenAI requests; repeatable")
    rp.add_argument("--rounds", type=_positive_int, default=1,
                    help="replay every policy this many times, round by round (every second round in reverse order); the "
                    "table pools the rounds, adds each round's ratios to stock vLLM and gives agentserve's ratios 95 %% "
                    "intervals over rounds (rounds and paired programs resampled); an --endpoint server keeps its cache "
                    "from one round to the next (default: 1)")
    rp.add_argument("--no-speed-probe", action="store_true",
                    help="skip the engine speed probe (a fixed batch timed on each server before its run, "
                    "reported beside it; with several rounds the ratios are also given normalized by it)")
    rp.add_argument("--out", default="replay-out", help="output directory (default: replay-out)")
    rp.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_flags(rp.add_argument_group("engine (the same for every policy)"), EngineSettings,
              skip=REPLAY_SKIPS, defaults={"--kv-tokens": REPLAY_KV_TOKENS})
    add_flags(rp.add_argument_group("programs (every plugin policy; +KEY=VALUE in --policies overrides)"),
              ProgramOptions, skip=REPLAY_SKIPS)


def cmd_replay(args: argparse.Namespace) -> int:
    from pathlib import Path

    from workloads.plan import ReplayConfig
    from workloads.replay import EngineSetup, parse_endpoints, replay
    from workloads.report import table

    rate = args.rate if args.rate is not None or args.concurrency is not None else 0.5
    cfg = ReplayConfig(programs=args.programs, rate=rate, concurrency=args.concurrency,
                       token_scale=args.token_scale, time_scale=args.time_scale, max_turns=args.max_turns,
                       seed=args.seed)
    setup = EngineSetup(engine=from_flags(EngineSettings, args), program=from_flags(ProgramOptions, args))
    results = replay(args.trace, fmt=args.format, policies=args.policies, cfg=cfg, setup=setup,
                     out_dir=Path(args.out), endpoints=parse_endpoints(args.endpoint),
                     progress=not args.no_progress, rounds=args.rounds, probe=not args.no_speed_probe)
    print(table(results))
    print(f"\nwritten: {args.out}/results.json, records.json, jct_cdf.png, timeline.png"
          + (", turns.json" if setup.engine.turn_times else ""))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from agentserve.server.app import serve

    # agentserve's own logger, not the root one: an import (vLLM, Ray) may have configured the root
    # logger already, which would make basicConfig a no-op and hide our INFO lines
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logger = logging.getLogger("agentserve")
    logger.handlers[:] = [handler]
    logger.setLevel(args.log_level.upper())
    logger.propagate = False
    settings = from_flags(EngineSettings, args)
    options = from_flags(ProgramOptions, args)
    if args.replicas is None:
        asyncio.run(serve(settings, host=args.host, port=args.port, options=options))
    else:
        from agentserve.rayserve.app import check_cluster_options, run

        try:
            check_cluster_options(options)
            if settings.turn_times:
                raise ValueError("--turn-times is read from one engine's front end (serve without --replicas)")
        except ValueError as e:
            raise SystemExit(f"--replicas: {e}") from None

        run(settings, options=options, replicas=args.replicas, router=args.router, host=args.host, port=args.port)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from agentserve.models.build import ensure_model, model_dir
    from agentserve.models.catalog import CATALOG, get_spec

    names = args.names or sorted(CATALOG)
    for name in names:
        spec = get_spec(name)
        path = ensure_model(name) if args.build else model_dir(name)
        state = "built" if (path / "config.json").exists() else "not built"
        print(f"{name:12s} {spec.architecture:6s} {spec.description}  [{state}: {path}]")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "models":
            return cmd_models(args)
        if args.command == "replay":
            return cmd_replay(args)
        if args.command == "sim":
            from agentserve.sim.cli import cmd_sim

            return cmd_sim(args)
    except ValueError as e:  # bad settings: say what, no traceback
        print(f"agentserve: error: {e}", file=sys.stderr)
        return 2
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
