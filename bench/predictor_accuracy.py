"""The tool-duration predictor's accuracy on traces with measured tool times: each trace's calls in
order (its programs in file order, each program's calls in turn), each predicted from the ones before
it (agentserve/ttl/accuracy.py). Writes results.json and prints the tables of docs/benchmarks.md.

    python bench/predictor_accuracy.py --out bench-out/predictor \
        ../shared/traces/swe/openhands ../shared/traces/swe/sweagent_demos ../shared/traces/swe/continuum_trace/test.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import msgspec

from agentserve.ttl.accuracy import evaluate
from workloads.formats import load_trace


def measured_calls(trace: str) -> list[tuple[str | None, float]]:
    return [(t.tool, t.tool_s) for p in load_trace(trace).programs for q in p.walk() for t in q.turns
            if t.tool is not None and t.tool_s is not None]


def fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("traces", nargs="+")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    results = {}
    for trace in args.traces:
        acc = evaluate(measured_calls(trace))
        results[trace] = msgspec.to_builtins(acc)
        print(f"\n{trace}: {acc.calls} measured calls")
        print("| tool | calls | predicted | mean s | MAE s | MAE s, any tool's mean |")
        print("|---|---:|---:|---:|---:|---:|")
        for e in acc.tools + [acc.overall]:
            print(f"| {e.tool} | {e.calls} | {e.predicted} | {fmt(e.mean_s)} | {fmt(e.mae_s)} | {fmt(e.baseline_mae_s)} |")
        print("| tau s | calls | Brier | ECE | bins: predicted -> observed (calls) |")
        print("|---:|---:|---:|---:|---|")
        for c in acc.calibration:
            bins = ", ".join(f"{b.predicted:.2f} -> {b.observed:.2f} ({b.calls})" for b in c.bins)
            print(f"| {c.tau_s:g} | {c.calls} | {c.brier:.3f} | {c.ece:.3f} | {bins} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_bytes(msgspec.json.format(msgspec.json.encode(results)))


if __name__ == "__main__":
    main()
