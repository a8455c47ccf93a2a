"""The ablation table of `make ablation`: every row (agentserve with one mechanism switched off or on)
against vllm+offload and against agentserve as it is, mean JCT and p99 TTFT with their 95 % intervals
over rounds, one Markdown table per replay output (docs/benchmarks.md).

    python bench/ablation.py bench-out/ablation-swe-8x bench-out/ablation-bfcl-8x
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workloads.intervals import Interval  # noqa: E402
from workloads.report import Results, report_replays  # noqa: E402

BASELINE, DEFAULT = "vllm+offload", "agentserve"


def ratio(ivs: list[Interval], a: str, b: str, metric: str) -> tuple[float, float | None, float | None] | None:
    """a/b on `metric` (raw) with its interval, from whichever order the replay compared them in."""
    for i in ivs:
        if i.metric == metric and not i.normalized:
            if (i.a, i.b) == (a, b):
                return i.ratio, i.lo, i.hi
            if (i.a, i.b) == (b, a):
                return 1 / i.ratio, (1 / i.hi if i.hi else None), (1 / i.lo if i.lo else None)
    return None


def _cell(ivs: list[Interval], a: str, b: str, metric: str) -> str:
    found = ratio(ivs, a, b, metric)
    if found is None:
        return "-"
    r, lo, hi = found
    if lo is None:
        return f"{r:.3f}"
    mark = "" if lo <= 1 <= hi else " *"  # the interval excludes 1
    return f"{r:.3f} [{lo:.3f}, {hi:.3f}]{mark}"


def row_label(spec: str) -> str:
    if spec == DEFAULT:
        return "agentserve as it is"
    base, _, options = spec.partition("+")
    return (f"{base} " if base != DEFAULT else "") + (options.replace("+", ", ") or "(defaults)")


def table(name: str, results: Results) -> str:
    ivs = results.intervals
    rows = [p for p in results.policies if p != BASELINE]
    rounds = next((i.rounds for i in ivs), 1)
    pins = {p: r.pins_created for p, r in results.policies.items()}
    out = [f"{name}: {rounds} rounds, {results.config.get('elapsed_s', 0) / 60:.0f} min "
           f"(* = the interval excludes 1)", "",
           f"| row | mean JCT / {BASELINE} | p99 TTFT / {BASELINE} | mean JCT / {DEFAULT} | pins |",
           "|---|---|---|---|---|"]
    for p in rows:
        vs_default = "-" if p == DEFAULT else _cell(ivs, p, DEFAULT, "jct_mean")
        out.append(f"| {row_label(p)} | {_cell(ivs, p, BASELINE, 'jct_mean')} | "
                   f"{_cell(ivs, p, BASELINE, 'ttft_p99')} | {vs_default} | {pins.get(p, '-')} |")
    return "\n".join(out)


def main() -> None:
    report_replays(__doc__.split("\n\n")[0],
                   lambda name, results: table(name, results) + "\n" if BASELINE in results.policies else None,
                   f"{BASELINE} row to compare with")


if __name__ == "__main__":
    main()
