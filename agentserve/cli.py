"""The `agentserve` command line: `serve` the OpenAI API on a vLLM engine; `replay` an agent trace
against several policies side by side; `models` lists / builds the locally built models."""

from __future__ import annotations

import argparse
import logging
import sys

from agentserve.engine.settings import DEFAULT_BLOCK_SIZE, DEFAULT_DTYPE, EngineSettings
from workloads import DEFAULT_TRACE


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """Options that describe the engine: shared by every subcommand that starts one."""
    g = p.add_argument_group("engine")
    g.add_argument(
        "--model",
        default="tiny",
        help="built-in model name (tiny, bench, tiny-qwen2: built locally on first use and cached "
        "under $AGENTSERVE_CACHE or ~/.cache/agentserve) or a HuggingFace model directory (default: tiny)",
    )
    g.add_argument(
        "--kv-tokens",
        type=_positive_int,
        default=16384,
        help="KV cache budget in tokens, exact: rounded up to whole blocks and given to vLLM as a "
        "block count and byte size (default: 16384)",
    )
    g.add_argument(
        "--block-size",
        type=_positive_int,
        default=DEFAULT_BLOCK_SIZE,
        help=f"KV block size in tokens, a multiple of 32 on CPU; prefix caching reuses whole blocks "
        f"only (default: {DEFAULT_BLOCK_SIZE})",
    )
    g.add_argument(
        "--max-model-len",
        type=_positive_int,
        default=None,
        help="longest prompt + output in tokens; longer requests get a 400 "
        "(default: the smaller of --kv-tokens and the model's context length)",
    )
    g.add_argument(
        "--max-num-seqs",
        type=_positive_int,
        default=64,
        help="most requests the engine runs in one batch (default: 64)",
    )
    g.add_argument(
        "--dtype",
        default=DEFAULT_DTYPE,
        choices=["float32", "bfloat16", "float16"],
        help=f"weight and KV dtype; float32 is fastest on AVX2 CPUs (default: {DEFAULT_DTYPE})",
    )
    g.add_argument("--seed", type=int, default=0, help="engine sampling seed (default: 0)")


def engine_settings_from(args: argparse.Namespace) -> EngineSettings:
    return EngineSettings(
        model=args.model,
        kv_tokens=args.kv_tokens,
        block_size=args.block_size,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        dtype=args.dtype,
        seed=args.seed,
    )


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
    add_engine_options(serve)
    s = serve.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    s.add_argument("--replicas", type=_positive_int, default=None,
                   help="serve on Ray Serve with this many vLLM replicas behind the program-affinity router "
                   "and one shared program control plane (a local Ray cluster, or the one RAY_ADDRESS names); "
                   "without it: one embedded engine in this process")
    s.add_argument("--router", default="affinity", choices=["affinity", "prefix", "pow2"],
                   help="with --replicas: affinity = agentserve's program-affinity router; prefix = Ray Serve "
                   "LLM's PrefixCacheAffinityRouter; pow2 = Serve's default (default: affinity)")
    pr = serve.add_argument_group("programs")
    pr.add_argument(
        "--policy",
        default="agentserve",
        choices=["vllm", "continuum", "fixed", "agentserve"],
        help="KV pin policy across tool calls: vllm = stock vLLM (plugin off, no pins, FCFS); "
        "continuum = Continuum's published rule (2 s pin for short tools) with program FCFS; "
        "fixed = --fixed-ttl for every turn; agentserve = the Continuum paper's optimal TTL from the "
        "measured reload cost and learned tool durations (default: agentserve)",
    )
    pr.add_argument("--fixed-ttl", type=float, default=2.0, help="TTL in seconds of --policy fixed (default: 2)")
    pr.add_argument("--max-ttl", type=float, default=60.0,
                    help="no pin is held longer than this many seconds, whatever the policy (default: 60)")
    pr.add_argument("--pin-cap", type=float, default=0.5,
                    help="largest share of the KV budget that pins may hold, 0..1 (default: 0.5)")
    pr.add_argument("--max-wait", type=float, default=0.5,
                    help="seconds a request may wait behind earlier programs' turns before it is served "
                    "in arrival order (bounds program FCFS's TTFT tail; 0 = no bound; default: 0.5)")
    pr.add_argument("--admission-share", type=float, default=0.0, metavar="SHARE",
                    help="program admission: hold a new program's first request while the admitted programs' "
                    "contexts fill SHARE of the KV budget (0 = off, every program starts at once; default: 0)")
    pr.add_argument("--admission-max-hold", type=float, default=60.0, metavar="S",
                    help="a new program held this long is admitted anyway (0 = no bound; default: 60)")
    pr.add_argument("--pin-mode", default="soft", choices=["soft", "ordered"],
                    help="under memory pressure, soft: any request frees pins (latest program first), so pins "
                    "never delay anything; ordered: a waiting request frees only later programs' pins and "
                    "otherwise waits, until --max-wait; running work always may (default: soft)")
    s.add_argument("--otlp-traces-endpoint", default=None, metavar="URL",
                   help="send OpenTelemetry traces (a workflow span per program, chat and execute_tool spans, "
                   "vLLM's request spans nested in them) to this OTLP gRPC collector, e.g. http://127.0.0.1:4317")
    s.add_argument("--kvshare", action="store_true",
                   help="KV sharing across agents: /v1/completions prompts given as parts "
                   "(agentserve.share) reuse shared parts' KV under their own prefix (KVCOMM; docs/kvshare.md)")
    s.add_argument("--kvshare-gate", type=float, default=0.3, metavar="GAMMA",
                   help="KVCOMM's reuse gate: a shared part is reused when its anchors' weights are sharp enough "
                   "(entropy <= GAMMA * log2 anchors); inf = whenever two anchors qualify (default: 0.3, KVCOMM's)")
    s.add_argument("--kvshare-correction", default="anchors", choices=["anchors", "none"],
                   help="anchors: KVCOMM's offset correction of reused KV; none: the RoPE move alone (naive reuse; "
                   "no anchors needed, one recorded prompt per template) (default: anchors)")
    s.add_argument("--kvshare-temperature", type=float, default=1.0,
                   help="softmax temperature of the anchor weights (default: 1, KVCOMM's)")
    s.add_argument("--cross-model", default=None, metavar="MODEL",
                   help="also serve MODEL, a fine-tune of --model's architecture (needs --kvshare): its "
                   "/v1/completions reuse the KV the served model computed for the same prompt prefix through "
                   "its last shared part, recomputing a few layers (DroidSpeak, HF path; docs/kvshare.md)")
    s.add_argument("--cross-model-group", default=None, metavar="S:E",
                   help="the layers MODEL recomputes over a reused prefix (default: profiled at start-up: the "
                   "cheapest group on the quality/cost Pareto front within --cross-model-max-kl)")
    s.add_argument("--cross-model-max-kl", type=float, default=0.05,
                   help="quality bound of the profiled group: next-token KL to MODEL's own prefill (default: 0.05)")
    s.add_argument("--cross-model-profile", default=None, metavar="FILE",
                   help="JSONL of profiling prompts ({\"prompt\": text} or {\"token_ids\": [...]}) "
                   "(default for the kvret pair: samples of its task)")
    s.add_argument("--tenants", default=None, metavar="FILE",
                   help="tenants file (JSON or YAML; README: Tenants): API keys on every route, program ids "
                   "and prefix cache isolated per tenant, per-tenant limits; without it the API is open")
    pr.add_argument("--idle-timeout", type=float, default=600.0,
                    help="seconds after which a silent program is abandoned and its pin released (default: 600)")
    s.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="agentserve log level (default: info)",
    )

    add_replay_parser(sub)

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


def add_replay_parser(sub) -> None:
    from workloads.formats import FORMATS
    from workloads.replay import POLICIES

    rp = sub.add_parser(
        "replay",
        help="replay an agent trace against several policies on one engine; compare JCT, TTFT, cache hits",
        description="Replay agent programs from a trace (SWE-bench mini-swe-agent, OpenHands, SWE-agent, "
        "Continuum, BFCL, or agentserve's own schema) against each policy in turn: a fresh server per "
        "policy, the same model, KV budget and arrival plan. Writes OUT/results.json, records.json, "
        "jct_cdf.png and timeline.png and prints the side-by-side table.",
    )
    rp.add_argument("--trace", default=str(DEFAULT_TRACE),
                    help="trace file or directory, or bfcl:CATEGORY (base, long_context, miss_func, miss_param) "
                    "(default: the embedded 16-program mini-swe-agent SWE-bench sample)")
    rp.add_argument("--format", default="auto", choices=["auto", *FORMATS], help="trace format (default: auto)")
    rp.add_argument("--policies", type=_csv, default=["vllm", "continuum", "agentserve", "oracle"],
                    help=f"comma-separated, run in this order, from {','.join(POLICIES)}; a plugin policy "
                    "may carry its own serve options as +KEY=VALUE (pin-mode, max-wait, pin-cap, fixed-ttl, "
                    "max-ttl), e.g. agentserve+pin-mode=ordered+max-wait=0 "
                    "(default: vllm,continuum,agentserve,oracle)")
    rp.add_argument("--endpoint", action="append", default=[], metavar="NAME=URL",
                    help="also replay against a running OpenAI-compatible server (e.g. a stock vllm serve "
                    "of the same model), with plain OpenAI requests; repeatable")
    rp.add_argument("--programs", type=_positive_int, default=8, help="programs to replay (default: 8)")
    load = rp.add_mutually_exclusive_group()
    load.add_argument("--rate", type=float, default=None, help="Poisson program arrivals per second (default: 0.5)")
    load.add_argument("--concurrency", type=_positive_int, default=None, help="run this many programs at once instead")
    rp.add_argument("--token-scale", type=float, default=0.25, help="multiply every token count (default: 0.25)")
    rp.add_argument("--time-scale", type=float, default=1.0, help="multiply every tool duration (default: 1)")
    rp.add_argument("--max-turns", type=_positive_int, default=10, help="LLM calls per program at most (default: 10)")
    rp.add_argument("--seed", type=int, default=0, help="program sample, arrivals, tool times (default: 0)")
    rp.add_argument("--rounds", type=_positive_int, default=1,
                    help="replay every policy this many times, round by round; the table pools the rounds "
                    "and adds each round's ratios to stock vLLM, so noise shows; an --endpoint server keeps its cache "
                    "from one round to the next (default: 1)")
    rp.add_argument("--out", default="replay-out", help="output directory (default: replay-out)")
    rp.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = rp.add_argument_group("engine (the same for every policy)")
    g.add_argument("--model", default="tiny", help="built-in model or model directory (default: tiny)")
    g.add_argument("--kv-tokens", type=_positive_int, default=8192, help="KV budget in tokens (default: 8192)")
    g.add_argument("--max-model-len", type=_positive_int, default=None,
                   help="context length; turns that would not fit are cut (default: min(kv-tokens, 8192))")
    g.add_argument("--block-size", type=_positive_int, default=DEFAULT_BLOCK_SIZE)
    g.add_argument("--max-num-seqs", type=_positive_int, default=64)
    g.add_argument("--fixed-ttl", type=float, default=2.0, help="TTL of policy fixed (default: 2)")
    g.add_argument("--pin-cap", type=float, default=0.5, help="share of the KV budget pins may hold (default: 0.5)")
    g.add_argument("--max-wait", type=float, default=0.5,
                   help="wait bound of program FCFS, see `agentserve serve --help` (default: 0.5)")
    g.add_argument("--pin-mode", default="soft", choices=["soft", "ordered"],
                   help="who may free pins under pressure, see `agentserve serve --help` (default: soft)")


def cmd_replay(args: argparse.Namespace) -> int:
    from pathlib import Path

    from workloads.plan import ReplayConfig
    from workloads.replay import EngineSetup, parse_endpoints, replay
    from workloads.report import table

    rate = args.rate if args.rate is not None or args.concurrency is not None else 0.5
    cfg = ReplayConfig(programs=args.programs, rate=rate, concurrency=args.concurrency,
                       token_scale=args.token_scale, time_scale=args.time_scale, max_turns=args.max_turns,
                       seed=args.seed)
    setup = EngineSetup(model=args.model, kv_tokens=args.kv_tokens, max_model_len=args.max_model_len,
                        block_size=args.block_size, max_num_seqs=args.max_num_seqs, fixed_ttl_s=args.fixed_ttl,
                        pin_cap_share=args.pin_cap, max_wait_s=args.max_wait, pin_mode=args.pin_mode)
    results = replay(args.trace, fmt=args.format, policies=args.policies, cfg=cfg, setup=setup,
                     out_dir=Path(args.out), endpoints=parse_endpoints(args.endpoint),
                     progress=not args.no_progress, rounds=args.rounds)
    print(table(results))
    print(f"\nwritten: {args.out}/results.json, records.json, jct_cdf.png, timeline.png")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from agentserve.server.app import ProgramOptions, serve
    from agentserve.server.tenants import TenantsConfig

    # agentserve's own logger, not the root one: an import (vLLM, Ray) may have configured the root
    # logger already, which would make basicConfig a no-op and hide our INFO lines
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logger = logging.getLogger("agentserve")
    logger.handlers[:] = [handler]
    logger.setLevel(args.log_level.upper())
    logger.propagate = False
    settings = engine_settings_from(args)
    options = ProgramOptions(policy=args.policy, fixed_ttl_s=args.fixed_ttl, max_ttl_s=args.max_ttl,
                             pin_cap_share=args.pin_cap, idle_timeout_s=args.idle_timeout,
                             max_wait_s=args.max_wait, pin_mode=args.pin_mode,
                             admission_share=args.admission_share, admission_max_hold_s=args.admission_max_hold,
                             otlp_traces_endpoint=args.otlp_traces_endpoint,
                             tenants=TenantsConfig.load(args.tenants) if args.tenants else None,
                             kvshare=args.kvshare, kvshare_gate=args.kvshare_gate,
                             kvshare_temperature=args.kvshare_temperature,
                             kvshare_correction=args.kvshare_correction, cross_model=args.cross_model,
                             cross_model_group=args.cross_model_group, cross_model_max_kl=args.cross_model_max_kl,
                             cross_model_profile=args.cross_model_profile)
    if args.replicas is not None and args.kvshare:
        raise SystemExit("--kvshare is not supported with --replicas yet: each replica holds its own segment store")
    if args.replicas is not None and args.tenants:
        raise SystemExit("--tenants is not supported with --replicas yet: the Ray Serve ingress has no tenant gate")
    if args.replicas is None:
        asyncio.run(serve(settings, host=args.host, port=args.port, options=options))
    else:
        from agentserve.rayserve.app import run

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
    except ValueError as e:  # bad settings: say what, no traceback
        print(f"agentserve: error: {e}", file=sys.stderr)
        return 2
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
