"""Where a replay's run-to-run spread comes from, from a replay with several rounds and speed probes.

For each run: its speed probe and its mean JCT, raw and speed-normalized. For each policy: the spread
of its runs' mean JCT and how much of it the probe explains (the machine's speed); what is left is the
replay's own sensitivity (batching and preemptions that diverge from small timing differences) and the
probe's noise. For each pair: the spread of the per-round ratio, raw and normalized, the rounds an
interval of +-5 % needs at that spread, and the smallest difference one comparison resolves in a
time budget.

    python bench/variance_study.py bench-out/swe-8x [--budget-min 45]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workloads.driver import ProgramRecord  # noqa: E402
from workloads.intervals import run_sample, speed_factors, t975  # noqa: E402
from workloads.report import Results, comparisons  # noqa: E402

TARGET_HALF_WIDTH = 0.05


def rounds_for(sd: float, half_width: float = TARGET_HALF_WIDTH, most: int = 1000) -> int | None:
    """Rounds whose t interval of a mean log ratio with this per-round spread is +-half_width."""
    return next((r for r in range(2, most) if t975(r - 1) * sd / math.sqrt(r) <= math.log1p(half_width)), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="a replay's output directory (results.json, records.json)")
    ap.add_argument("--budget-min", type=float, default=45.0, help="minutes one comparison may take")
    args = ap.parse_args()
    results = msgspec.json.decode((args.out / "results.json").read_bytes(), type=Results)
    records = msgspec.json.decode((args.out / "records.json").read_bytes(), type=dict[str, list[ProgramRecord]])
    rounds = results.config.get("rounds", 1)
    if rounds < 2:
        sys.exit(f"{args.out}: one round; the study needs several")
    probes = {name: [r.speed_probe_s for r in runs] for name, runs in results.rounds.items()}
    factors = speed_factors(probes)
    mean_jct: dict[str, dict[bool, list[float]]] = {}
    print("| policy | round | speed probe s | mean JCT s | normalized | LLM share of JCT |\n|---|---|---|---|---|---|")
    for name in records:
        mean_jct[name] = {False: [], True: []}
        for k in range(rounds):
            recs = [r for r in records[name] if r.round == k]
            raw = statistics.fmean(run_sample(recs).jct.values())
            norm = statistics.fmean(run_sample(recs, factors[name][k]).jct.values()) if factors else raw
            llm = sum(t.done - t.sent for r in recs if r.error is None for t in r.turns)
            total = sum(r.end - r.start for r in recs if r.error is None)
            mean_jct[name][False].append(raw)
            mean_jct[name][True].append(norm)
            probe = probes[name][k]
            print(f"| {name} | {k + 1} | {'-' if probe is None else f'{probe:.3f}'} | {raw:.2f} | {norm:.2f} | "
                  f"{llm / total:.2f} |")
    print("\n| policy | sd of log mean JCT, raw | normalized | sd of log probe | share of the variance the probe "
          "explains |\n|---|---|---|---|---|")
    for name, jct in mean_jct.items():
        logs = [math.log(x) for x in jct[False]]
        line = f"| {name} | {statistics.stdev(logs):.3f} | {statistics.stdev(math.log(x) for x in jct[True]):.3f} | "
        if factors:
            lp = [math.log(p) for p in probes[name]]
            r = statistics.correlation(lp, logs) if statistics.stdev(lp) > 0 else 0.0
            line += f"{statistics.stdev(lp):.3f} | {r * r:.2f} (r = {r:+.2f}) |"
        else:
            line += "- | - |"
        print(line)
    per_round_s = results.config.get("elapsed_s", 0) / rounds
    print(f"\none round (every policy once): {per_round_s / 60:.1f} min")
    budget_rounds = max(2, int(args.budget_min * 60 // per_round_s)) if per_round_s else None
    for a, b in comparisons(list(records)):
        for normalized in (False, True):
            if normalized and not factors:
                continue
            ratios = [math.log(x / y) for x, y in zip(mean_jct[a][normalized], mean_jct[b][normalized])]
            sd = statistics.stdev(ratios)
            need = rounds_for(sd)
            line = (f"{a}/{b} mean JCT, {'normalized' if normalized else 'raw'}: per-round ratios "
                    + ", ".join(f"{math.exp(x):.3f}" for x in ratios) + f"; sd of the log ratio {sd:.3f}; "
                    f"+-{TARGET_HALF_WIDTH:.0%} needs {need} rounds"
                    + (f" ({need * per_round_s / 60:.0f} min)" if need and per_round_s else ""))
            if budget_rounds:
                half = math.expm1(t975(budget_rounds - 1) * sd / math.sqrt(budget_rounds))
                line += (f"; in {args.budget_min:.0f} min ({budget_rounds} rounds) the interval is +-{half:.1%}, "
                         f"the smallest difference it resolves")
            print(line)


if __name__ == "__main__":
    main()
