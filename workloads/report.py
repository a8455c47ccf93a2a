"""Replay results: per-policy metrics from the driver's records, `results.json` (schema below), the
side-by-side table, and the plots (JCT CDF, per-program timeline)."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import msgspec

from agentserve import policies as policy_table
from workloads.driver import ProgramRecord
from workloads.intervals import Interval

Ratio = Annotated[float, msgspec.Meta(ge=0, le=1)]
Seconds = Annotated[float, msgspec.Meta(ge=0)]
Count = Annotated[int, msgspec.Meta(ge=0)]


class PolicyResult(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # JCT is per program (a workflow's sub-programs each count); a workflow's JCT is its root's start to
    # its last turn's end, over workflows none of whose programs failed (None: the trace has none)
    jct_mean: Seconds | None
    jct_p50: Seconds | None
    jct_p95: Seconds | None
    jct_p99: Seconds | None
    ttft_p50: Seconds | None
    ttft_p99: Seconds | None
    prefix_hit_rate: Ratio | None  # cached prompt tokens / prompt tokens; None if the server does not say
    host_hit_rate: Ratio | None = None  # of those, tokens loaded from the host tier / prompt tokens
    preemptions: Count | None  # None if the server exports no vLLM metrics
    pins_created: Count
    pins_outstanding_at_end: Count
    makespan: Seconds
    programs_completed: Count
    programs_failed: Count
    throughput: Seconds  # completed programs per second of makespan
    llm_calls: Count
    turn_retries: Count = 0  # turns sent again after a server failure (e.g. a replica died)
    errors: list[str] = []  # the first few failure messages
    engine_counters: dict[str, int] = {}  # the scheduler plugin's counters over the run (pins by reason, ...)
    workflow_jct_mean: Seconds | None = None
    workflow_jct_p50: Seconds | None = None
    workflow_jct_p95: Seconds | None = None
    workflows_completed: Count = 0
    speed_probe_s: Seconds | None = None  # the engine speed probe before the run (rounds: their median)
    ttft_later_p99: Seconds | None = None  # over turns after each program's first (admission holds first turns)


class Results(msgspec.Struct, forbid_unknown_fields=True):
    config: dict
    policies: dict[str, PolicyResult]  # every round's programs and turns pooled
    rounds: dict[str, list[PolicyResult]] = {}  # per round, when the replay ran more than one
    intervals: list[Interval] = []  # agentserve's ratios with intervals over rounds (workloads/intervals.py)


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(records: list[ProgramRecord], server: dict) -> PolicyResult:
    ok = [r for r in records if r.error is None]
    jcts = [r.end - r.start for r in ok]
    turns = [t for r in records for t in r.turns]
    ttfts = [t.first_token - t.sent for t in turns]
    prompt = sum(t.prompt_tokens for t in turns)
    cached = [t.cached_tokens for t in turns]
    hit = (sum(cached) / prompt if prompt else 0.0) if turns and None not in cached else None
    by_round: dict[int, list[ProgramRecord]] = {}
    for r in records:
        by_round.setdefault(r.round, []).append(r)
    makespan = sum(max(r.end for r in rs) - min(r.start for r in rs) for rs in by_round.values())
    wf = workflow_jcts(records)
    return PolicyResult(
        workflow_jct_mean=sum(wf) / len(wf) if wf else None, workflow_jct_p50=percentile(wf, 50),
        workflow_jct_p95=percentile(wf, 95), workflows_completed=len(wf),
        jct_mean=sum(jcts) / len(jcts) if jcts else None,
        jct_p50=percentile(jcts, 50), jct_p95=percentile(jcts, 95), jct_p99=percentile(jcts, 99),
        ttft_p50=percentile(ttfts, 50), ttft_p99=percentile(ttfts, 99),
        ttft_later_p99=percentile([t.first_token - t.sent for r in records for t in r.turns[1:]], 99),
        prefix_hit_rate=hit, preemptions=server.get("preemptions"),
        host_hit_rate=(min(1.0, server["host_hit_tokens"] / prompt) if prompt and server.get("host_hit_tokens")
                       is not None else None),
        pins_created=server.get("pins_created", 0), pins_outstanding_at_end=server.get("pins_outstanding", 0),
        makespan=makespan, programs_completed=len(ok), programs_failed=len(records) - len(ok),
        throughput=len(ok) / makespan if makespan > 0 else 0.0, llm_calls=len(turns),
        turn_retries=sum(r.retries for r in records),
        engine_counters=server.get("counters", {}), speed_probe_s=server.get("speed_probe_s"),
        errors=[f"{r.id}: {r.error}" for r in records if r.error][:5])


def workflow_jcts(records: list[ProgramRecord]) -> list[float]:
    """JCT of every workflow (a root that spawned sub-programs) none of whose programs failed."""
    spawned = {(r.round, r.workflow) for r in records if r.parent is not None}
    failed = {(r.round, r.workflow) for r in records if r.error is not None}
    return [r.end - r.start for r in records
            if r.parent is None and (r.round, r.workflow) in spawned and (r.round, r.workflow) not in failed]


def _fmt(x: float | None, pattern: str = "{:.2f}") -> str:
    return "-" if x is None else pattern.format(x)


def table(results: Results) -> str:
    workflows = any(r.workflow_jct_mean is not None for r in results.policies.values())
    wf_head = "mean wf JCT s | p95 wf JCT | " if workflows else ""
    head = (f"| policy | {wf_head}mean JCT s | p50 JCT | p95 JCT | p50 TTFT s | p99 TTFT | hit rate | host hits "
            "| preempt | pins | done/failed | prog/s |")
    rows = [head, "|" + "---|" * (14 if workflows else 12)]
    for name, r in results.policies.items():
        wf = f"{_fmt(r.workflow_jct_mean)} | {_fmt(r.workflow_jct_p95)} | " if workflows else ""
        rows.append(f"| {name} | {wf}{_fmt(r.jct_mean)} | {_fmt(r.jct_p50)} | {_fmt(r.jct_p95)} | "
                    f"{_fmt(r.ttft_p50, '{:.3f}')} | {_fmt(r.ttft_p99, '{:.3f}')} | "
                    f"{_fmt(r.prefix_hit_rate)} | {_fmt(r.host_hit_rate)} | {_fmt(r.preemptions, '{}')} | "
                    f"{r.pins_created} | "
                    f"{r.programs_completed}/{r.programs_failed} | {r.throughput:.3f} |")
    return "\n".join(rows + [""] + ratios(results))


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.3f}" if a is not None and b else "-"


def _plugin(name: str) -> bool:
    """Does the policy spec run agentserve's plugin (an endpoint's name is no policy: it does not)?"""
    try:
        return policy_table.split(name)[0].plugin
    except ValueError:
        return False


def comparisons(names: list[str]) -> list[tuple[str, str]]:
    """(ours, baseline): every plugin policy (agentserve, fixed, continuum, their variants) against the
    baselines (stock vLLM, vllm+offload, the oracle, endpoints); the default also against every other
    plugin policy (an ablation's rows)."""
    return [(name, base) for name in names if _plugin(name)
            for base in names if base != name and (not _plugin(base) or name == "agentserve")]


def ratios(results: Results) -> list[str]:
    """agentserve against each baseline, and the share of the achievable mean-JCT gain captured."""
    p = results.policies
    lines = []
    for name, base in comparisons(list(p)):
        ours, b = p[name], p[base]
        wf = (f"mean workflow JCT {_ratio(ours.workflow_jct_mean, b.workflow_jct_mean)}, "
              if ours.workflow_jct_mean is not None else "")
        lines.append(f"{name}/{base}: {wf}mean JCT {_ratio(ours.jct_mean, b.jct_mean)}, p95 JCT "
                     f"{_ratio(ours.jct_p95, b.jct_p95)}, p99 TTFT {_ratio(ours.ttft_p99, b.ttft_p99)}, "
                     f"throughput {_ratio(ours.throughput, b.throughput)}")
    lines += round_ratios(results) + interval_lines(results.intervals)
    for name in (n for n in p if n not in ("vllm", "oracle")):
        gain = gap_captured(results, name)
        if gain is not None:
            lines.append(f"{name}: share of the achievable gain captured, (vllm - {name}) / (vllm - oracle) "
                         f"on mean JCT: {gain:.2f}")
    return lines


def round_ratios(results: Results) -> list[str]:
    """agentserve against stock vLLM round by round: the spread says which differences are noise."""
    rounds = results.rounds
    if "vllm" not in rounds:
        return []
    lines = []
    for name in (n for n in rounds if n.startswith("agentserve")):
        pairs = list(zip(rounds[name], rounds["vllm"]))
        fields = (("mean JCT", "jct_mean"), ("p95 JCT", "jct_p95"), ("p99 TTFT", "ttft_p99"))
        if rounds[name][0].workflow_jct_mean is not None:
            fields = (("mean workflow JCT", "workflow_jct_mean"), *fields)
        cells = [f"{label} " + ", ".join(_ratio(getattr(a, field), getattr(b, field)) for a, b in pairs)
                 for label, field in fields]
        lines.append(f"{name}/vllm per round: " + "; ".join(cells))
    return lines


METRIC_LABELS = {"jct_mean": "mean JCT", "jct_p95": "p95 JCT", "ttft_p99": "p99 TTFT", "ttft_later_p99": "p99 TTFT after first turns", "throughput": "throughput"}


def interval_lines(intervals: list[Interval]) -> list[str]:
    """One line per (pair, normalized or not): each ratio with its 95 % interval over rounds."""
    groups: dict[tuple[str, str, bool], list[Interval]] = {}
    for iv in intervals:
        groups.setdefault((iv.a, iv.b, iv.normalized), []).append(iv)
    lines = []
    for (a, b, normalized), ivs in groups.items():
        cells = [f"{METRIC_LABELS.get(iv.metric, iv.metric)} {iv.ratio:.3f}"
                 + (f" [{iv.lo:.3f}, {iv.hi:.3f}]" if iv.lo is not None else "") for iv in ivs]
        how = "speed-normalized (LLM time x reference / run's probe; throughput as measured)" if normalized else "raw"
        lines.append(f"{a}/{b}, 95 % interval over {ivs[0].rounds} rounds (rounds and paired programs "
                     f"resampled), {how}: " + ", ".join(cells))
    return lines


def gap_captured(results: Results, policy: str = "agentserve") -> float | None:
    p = results.policies
    try:
        v, o, a = p["vllm"].jct_mean, p["oracle"].jct_mean, p[policy].jct_mean
    except KeyError:
        return None
    if None in (v, o, a) or v - o <= 0:
        return None
    return (v - a) / (v - o)


def plots(records: dict[str, list[ProgramRecord]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, recs in records.items():
        jcts = sorted(r.end - r.start for r in recs if r.error is None)
        if jcts:
            ax.step(jcts, [(i + 1) / len(jcts) for i in range(len(jcts))], where="post", label=name)
    ax.set_xlabel("job completion time (s)")
    ax.set_ylabel("share of programs")
    ax.set_title("JCT CDF")
    ax.grid(alpha=0.3)
    ax.legend()
    cdf = out / "jct_cdf.png"
    fig.tight_layout()
    fig.savefig(cdf, dpi=110)
    plt.close(fig)

    n = max(1, len(records))
    height = max(3.0, 0.18 * max((sum(r.round == 0 for r in rs) for rs in records.values()), default=1) + 1.2)
    fig, axes = plt.subplots(n, 1, figsize=(10, height * n), squeeze=False, sharex=True)
    for ax, (name, recs) in zip(axes[:, 0], records.items()):
        recs = [r for r in recs if r.round == 0]  # one round: later rounds reuse the same clock
        for y, r in enumerate(sorted(recs, key=lambda r: r.start)):
            ax.hlines(y, r.start, r.end, color="lightgray", linewidth=1)  # tool waits and queueing
            for t in r.turns:
                ax.hlines(y, t.sent, t.first_token, color="tab:red", linewidth=5)  # waiting for the first token
                ax.hlines(y, t.first_token, t.done, color="tab:blue", linewidth=5)  # decoding
            if r.error:
                ax.plot([r.end], [y], "kx")
        ax.set_title(f"{name}: per-program timeline (red: until first token, blue: decode, gray: tool)")
        ax.set_ylabel("program")
    axes[-1, 0].set_xlabel("seconds since replay start")
    timeline = out / "timeline.png"
    fig.tight_layout()
    fig.savefig(timeline, dpi=100)
    plt.close(fig)
    return [cdf, timeline]


def report_replays(description: str, render: Callable[[str, Results], str | None], wants: str) -> None:
    """A bench script's command line over replay output directories (bench/guard.py, bench/ablation.py):
    print `render(name, results)` for each; exit status 1 if one is missing or renders nothing (its line
    says it lacks `wants`), 0 otherwise, whatever the numbers: the scripts report, the reader judges."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("outs", nargs="+", type=Path, help="replay output directories")
    missing = 0
    for out in ap.parse_args().outs:
        path = out / "results.json"
        text = render(out.name, msgspec.json.decode(path.read_bytes(), type=Results)) if path.exists() else None
        if text is None:
            print(f"{out.name}: no {wants} ({path}: missing, or a replay without it)")
            missing += 1
        else:
            print(text)
    sys.exit(1 if missing else 0)
