"""`agentserve replay`: one trace, several policies, the same engine, KV budget and arrival plan.

For each policy a fresh `agentserve serve` starts (same model, KV budget, context length), the plan
runs against it, the server's counters are read, and it stops: no policy inherits another's cache.
`vllm` = the plugin off (stock vLLM scheduling and eviction), driven with plain OpenAI requests as a
stock client would send; `continuum`, `fixed`, `agentserve` = the plugin with that TTL policy, driven
through the SDK; `oracle` = stock vLLM with a KV budget so large nothing is evicted (the lower bound).
Extra endpoints (`name=URL`, e.g. a stock `vllm serve`) are driven with plain OpenAI requests too.
"""

from __future__ import annotations

import asyncio
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import msgspec

from agentserve.options import EngineSettings, ProgramOptions, flag_names, flags, to_flags
from agentserve import policies as policy_table
from agentserve.server.process import ServerProcess
from workloads.driver import CLIENTS, Driver, ProgramRecord
from workloads.filler import Filler, single_token_words
from workloads.formats import load_trace
from workloads.plan import PlannedProgram, ReplayConfig, plan
from workloads.intervals import compare
from workloads.probe import speed_probe
from workloads.report import Results, comparisons, plots, summarize, table
from workloads.tool_times import ToolTimeModel

# The policies a replay runs are agentserve.policies' (serve policies and the replay rows vllm+offload
# and oracle). A policy may carry serve options of its own, `NAME+KEY=VALUE...` (KEY: an `agentserve serve` program
# option's flag without the dashes), so variants run side by side in one run:
# `--policies vllm,agentserve,agentserve+pin-mode=ordered+max-wait=0,oracle`.
# `replicas` and `router` serve the policy on Ray Serve (`agentserve serve --replicas N --router R`):
# `agentserve+replicas=2+router=affinity,agentserve+replicas=2+router=prefix` compares routers; each
# replica gets the same KV budget. `client=openai|agentserve` picks the replay's client instead of the
# policy's own (the SDK for the plugin, plain OpenAI requests for stock vLLM): `agentserve+client=openai`
# is the plugin driven by a client that names no program.
_RAY_OPTIONS = ("replicas", "router")
_CLIENT = "client"


def policy_options() -> tuple[str, ...]:
    """The KEYs a policy spec takes: every program option but the policy itself, and Ray's two."""
    return tuple(sorted(f[2:] for f in flag_names(ProgramOptions) - {"--policy", "--tenants"})) + _RAY_OPTIONS + (
        _CLIENT,)


def policy_spec(spec: str) -> tuple[str, list[str]]:
    """(policy, extra `agentserve serve` arguments) of a policy spec; ValueError if malformed."""
    policy, options = policy_table.split(spec)
    args: list[str] = []
    allowed = policy_options()
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in allowed or not value:
            raise ValueError(f"bad policy option {option!r} in {spec!r}: want KEY=VALUE, KEY one of "
                             f"{', '.join(allowed)}")
        if policy.unbounded_kv or (not policy.plugin and key not in _RAY_OPTIONS + (_CLIENT,)):
            raise ValueError(f"{spec!r}: policy {policy.name} runs without the plugin and takes no options")
        if key == _CLIENT:
            if value not in CLIENTS:
                raise ValueError(f"bad policy option {option!r} in {spec!r}: client is one of {', '.join(CLIENTS)}")
        elif key in _bool_options():  # a switch: KEY=true is --KEY, KEY=false --no-KEY
            if value not in ("true", "false"):
                raise ValueError(f"bad policy option {option!r} in {spec!r}: {key} is true or false")
            args.append(f"--{key}" if value == "true" else f"--no-{key}")
        else:
            args += [f"--{key}", value]
    return policy.name, args


def client_of(spec: str) -> str:
    """The client a policy spec's replay is driven with: its `client=` option, else the SDK for the
    plugin and plain OpenAI requests for stock vLLM (what each would be sent in practice)."""
    policy, options = policy_table.split(spec)
    chosen = [o.partition("=")[2] for o in options if o.partition("=")[0] == _CLIENT]
    return chosen[-1] if chosen else ("agentserve" if policy.plugin else "openai")


def _bool_options() -> set[str]:
    return {f.flag[2:] for f in flags(ProgramOptions) if f.kind is bool}


# The oracle's KV budget: large enough that nothing is evicted, raised to hold every program at once.
ORACLE_MIN_KV_TOKENS = 131072
STATS_TIMEOUT_S = 10.0
REPLAY_MAX_MODEL_LEN = 8192  # the context of a replay's engine unless given: min(kv_tokens, this)


class EngineSetup(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The engine and program options every policy of a replay is served with (`agentserve serve`'s)."""

    engine: EngineSettings = msgspec.field(default_factory=lambda: EngineSettings(kv_tokens=8192))
    program: ProgramOptions = msgspec.field(default_factory=ProgramOptions)

    @property
    def context(self) -> int:
        return self.engine.max_model_len or min(self.engine.kv_tokens, REPLAY_MAX_MODEL_LEN)

    def serve_args(self, policy: str, programs: int) -> list[str]:
        engine = msgspec.structs.replace(self.engine, max_model_len=self.context)
        name, extra = policy_spec(policy)
        described = policy_table.get(name)
        if described.clairvoyant:
            raise ValueError(f"{policy!r} knows the plan's future: it runs in the simulator only (agentserve sim)")
        if described.unbounded_kv:
            engine = msgspec.structs.replace(engine, kv_tokens=max(
                ORACLE_MIN_KV_TOKENS, programs * self.context + engine.for_device().block_size))
        program = msgspec.structs.replace(self.program, policy=described.serves or name)
        if not described.host_tier:
            program = msgspec.structs.replace(program, host=msgspec.structs.replace(program.host, kv_tokens=0))
        elif not described.plugin:  # vllm+offload: the tier the plugin policies get by default, if unsized
            from agentserve.engine.settings import resolve_host_tier

            program = resolve_host_tier(engine, msgspec.structs.replace(program, policy="agentserve"))
            program = msgspec.structs.replace(program, policy=described.serves)
        # argparse: the policy's own options come last and win
        return [*to_flags(engine), *to_flags(program), "--log-level", "warning", *extra]


def parse_endpoints(specs: list[str]) -> dict[str, str]:
    out = {}
    for spec in specs:
        name, sep, url = spec.partition("=")
        if not sep or not name or not url.startswith(("http://", "https://")):
            raise ValueError(f"--endpoint wants NAME=http://host:port, got {spec!r}")
        out[name] = url.rstrip("/")
    return out


def http_get(url: str, timeout: float = STATS_TIMEOUT_S) -> str | None:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read().decode()
    except (urllib.error.URLError, OSError):
        return None


def _metric_sum(text: str, name: str) -> int | None:
    """A Prometheus counter summed over its labels (engines), None if the server does not export it."""
    values = [float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", text, re.M)]
    return int(sum(values)) if values else None


def server_counters(base_url: str) -> dict:
    """Preemptions from vLLM's Prometheus metrics; pins from agentserve's stats route (if it has one)."""
    out: dict = {}
    text = http_get(base_url + "/metrics")
    if text is not None:
        out["preemptions"] = _metric_sum(text, "vllm:num_preemptions_total")
        out["host_hit_tokens"] = _metric_sum(text, "vllm:external_prefix_cache_hits_total")
    stats = http_get(base_url + "/v1/agentserve/stats")
    if stats is not None:
        engine = msgspec.json.decode(stats).get("engine", {})
        out["counters"] = {k: int(v) for k, v in engine.get("counters", {}).items()}
        out["pins_created"] = out["counters"].get("pins_created", 0)
        out["pins_outstanding"] = int(engine.get("pins", 0))
    return out


def take_turn_times(base_url: str) -> list[dict] | None:
    """The engine's turn times since the last read (`serve --turn-times`), None if it keeps none."""
    text = http_get(base_url + "/v1/agentserve/turn_times")
    return msgspec.json.decode(text) if text is not None else None


def served_model(base_url: str) -> str:
    text = http_get(base_url + "/v1/models")
    if text is None:
        raise RuntimeError(f"{base_url}/v1/models did not answer")
    data = msgspec.json.decode(text).get("data") or []
    if not data:
        raise RuntimeError(f"{base_url} serves no model")
    return data[0]["id"]


def drive(name: str, base_url: str, client: str, programs: list[PlannedProgram], cfg: ReplayConfig,
          filler: Filler, progress: bool, probe: bool = False,
          turn_times: bool = False) -> tuple[list[ProgramRecord], dict, list[dict] | None]:
    """Run the plan against one server: its records, its counters over the run (with the engine
    speed probe, measured first, under "speed_probe_s" when `probe`) and, with `turn_times`, the
    engine's time split of every request the run sent."""
    from tqdm import tqdm

    model = served_model(base_url)
    driver = Driver(base_url, model, filler, client=client, seed=cfg.seed)
    speed = speed_probe(base_url, model, filler) if probe else None
    before = server_counters(base_url)
    if turn_times:
        take_turn_times(base_url)  # the probe's requests are not the plan's
    with tqdm(total=len(programs), desc=f"{name:>10}", unit="prog", disable=not progress, file=sys.stderr,
              dynamic_ncols=True) as bar:
        def done(rec: ProgramRecord) -> None:
            bar.update(1)
            if rec.error:
                bar.set_postfix_str(f"failed: {rec.id}")

        records = asyncio.run(driver.run(programs, cfg.concurrency, on_done=done))
    after = server_counters(base_url)
    for counter in ("preemptions", "pins_created", "host_hit_tokens"):  # a shared server may have counted before
        if after.get(counter) is not None and before.get(counter) is not None:
            after[counter] -= before[counter]
    if "counters" in after:
        after["counters"] = {k: v - before.get("counters", {}).get(k, 0) for k, v in after["counters"].items()}
    after["speed_probe_s"] = speed
    return records, after, take_turn_times(base_url) if turn_times else None


def replay(trace_src: str, *, fmt: str = "auto", policies: list[str], cfg: ReplayConfig, setup: EngineSetup,
           out_dir: Path, endpoints: dict[str, str] | None = None, progress: bool = True,
           rounds: int = 1, probe: bool = True, log=print) -> Results:
    """Replay against every policy and endpoint in turn, `rounds` times over: round k runs them all
    before round k+1 starts, in the given order in even rounds and reversed in odd ones, so neither a
    slow spell of the machine nor a position in the round favours a policy. With `probe`, each run
    starts with the engine speed probe (workloads/probe.py), reported beside it. With several rounds,
    every agentserve policy's ratios to the others get intervals over rounds (workloads/intervals.py)."""
    from agentserve.engine.settings import resolve_model

    for spec in policies:
        policy_spec(spec)  # fail before any server starts
    if not policies and not endpoints:
        raise ValueError("nothing to replay against: give --policies and/or --endpoint")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, not {rounds}")
    trace = load_trace(trace_src, fmt)
    programs = plan(trace, cfg, ToolTimeModel.load(), setup.context)
    model_dir, _ = resolve_model(setup.engine.model)
    filler = Filler(single_token_words(model_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    config = describe(trace_src, fmt, trace.name, len(trace.programs), cfg, setup, programs, policies, endpoints)
    config["rounds"] = rounds
    log(f"replaying {len(programs)} programs ({config['plan']['llm_calls']} LLM calls, "
        f"{config['plan']['cut_for_context']} cut to the context) from {trace_src} against "
        f"{', '.join(policies + list(endpoints or {}))}")
    runs = [(p, None) for p in policies] + list((endpoints or {}).items())
    started = time.monotonic()
    records: dict[str, list[ProgramRecord]] = {name: [] for name, _ in runs}
    counters: dict[str, list[dict]] = {name: [] for name, _ in runs}
    engine_turns: dict[str, list[dict]] = {name: [] for name, _ in runs}  # with --turn-times
    for k in range(rounds):
        for name, url in round_order(runs, k):
            t0 = time.monotonic()
            if url is None:
                suffix = f"-round{k + 1}" if rounds > 1 else ""
                log_path = out_dir / f"server-{name}{suffix}.log"
                with ServerProcess(setup.serve_args(name, len(programs)), log_path=str(log_path)) as srv:
                    recs, counts, turns = drive(name, srv.base_url, client_of(name), programs, cfg, filler, progress,
                                                probe, setup.engine.turn_times)
            else:
                recs, counts, turns = drive(name, url, "openai", programs, cfg, filler, progress, probe)
            for r in recs:
                r.round = k
            engine_turns[name] += [{**t, "round": k} for t in turns or ()]
            records[name] += recs
            counters[name].append(counts)
            speed = counts["speed_probe_s"]
            log(f"{name}{f' (round {k + 1}/{rounds})' if rounds > 1 else ''}: done in "
                f"{time.monotonic() - t0:.0f} s{f', speed probe {speed:.3f} s' if speed is not None else ''}")
    summaries = {name: summarize(records[name], sum_counters(counters[name])) for name in records}
    per_round = {name: [summarize([r for r in records[name] if r.round == k], counters[name][k])
                        for k in range(rounds)] for name in records} if rounds > 1 else {}
    config["elapsed_s"] = round(time.monotonic() - started, 1)
    probes = {name: [c["speed_probe_s"] for c in counters[name]] for name in records}
    results = Results(config=config, policies=summaries, rounds=per_round,
                      intervals=compare(records, probes, comparisons(list(records))) if rounds > 1 else [])
    (out_dir / "results.json").write_bytes(msgspec.json.format(msgspec.json.encode(results), indent=2) + b"\n")
    (out_dir / "records.json").write_bytes(msgspec.json.encode(records))
    if setup.engine.turn_times:
        (out_dir / "turns.json").write_bytes(msgspec.json.encode(engine_turns))
    plots(records, out_dir)
    return results


def round_order(runs: list, k: int) -> list:
    """Round k's order: as given in even rounds, reversed in odd ones."""
    return runs if k % 2 == 0 else runs[::-1]


def sum_counters(rounds: list[dict]) -> dict:
    """One server-counter dict for several rounds: counts add up; unknown (None) stays unknown."""
    out: dict = {}
    speeds = [counts.get("speed_probe_s") for counts in rounds]
    for counts in rounds:
        for key, value in counts.items():
            if key == "speed_probe_s":
                continue
            if key == "counters":
                merged = out.setdefault("counters", {})
                for k, v in value.items():
                    merged[k] = merged.get(k, 0) + v
            elif value is None or (key in out and out[key] is None):
                out[key] = None
            else:
                out[key] = out.get(key, 0) + value
    # the rounds' probes pool to their median
    out["speed_probe_s"] = statistics.median(speeds) if speeds and None not in speeds else None
    return out


def describe(trace_src, fmt, name, available, cfg, setup, programs, policies, endpoints) -> dict:
    import vllm

    everyone = [q for p in programs for q in p.walk()]
    turns = [t for p in everyone for t in p.turns]
    return {
        "trace": str(trace_src), "format": fmt, "trace_name": name, "trace_programs": available,
        "replay": msgspec.to_builtins(cfg), "engine": msgspec.to_builtins(setup) | {"context": setup.context},
        "policies": policies, "endpoints": endpoints or {},
        "plan": {
            "programs": len(programs), "llm_calls": len(turns), "sub_programs": len(everyone) - len(programs),
            "cut_for_context": sum(p.cut_for_context for p in everyone),
            "input_tokens": sum(t.new_tokens for t in turns), "output_tokens": sum(t.output_tokens for t in turns),
            "tool_s_total": sum(t.tool_s for t in turns),
            "tool_times_sampled": sum(not t.tool_measured for t in turns),
            "last_arrival_s": max(p.arrival_s for p in programs),
        },
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "vllm": vllm.__version__},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def print_table(results: Results) -> None:
    print(table(results))
