"""The guard of `make bench`: agentserve / vllm+offload with its 95 % interval over rounds, one line per
standard load, from the replays' results.json. Exit status 1 if a load is missing or has no interval;
0 otherwise, whatever the ratios: the guard reports, the reader judges (docs/benchmarks.md).

    python bench/guard.py bench-out/swe-8x bench-out/swe-2x bench-out/bfcl-8x bench-out/bfcl-2x
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workloads.report import METRIC_LABELS, Results, report_replays  # noqa: E402

OURS, BASELINE = "agentserve", "vllm+offload"


def guard_line(name: str, results: Results) -> str | None:
    found = [i for i in results.intervals if (i.a, i.b) == (OURS, BASELINE) and i.lo is not None]
    if not found:
        return None
    minutes = results.config.get("elapsed_s", 0) / 60
    out = []
    for normalized in (False, True):
        ivs = [i for i in found if i.normalized == normalized]
        if ivs:
            cells = ", ".join(f"{METRIC_LABELS[i.metric]} {i.ratio:.3f} [{i.lo:.3f}, {i.hi:.3f}]" for i in ivs)
            out.append(f"  {'speed-normalized' if normalized else 'raw'}: {cells}")
    mean = next(i for i in found if i.metric == "jct_mean" and not i.normalized)
    verdict = ("no difference resolved" if mean.lo <= 1 <= mean.hi else
               "agentserve faster" if mean.hi < 1 else "agentserve SLOWER")
    return (f"{name}: {OURS}/{BASELINE} mean JCT {mean.ratio:.3f} +-{mean.half_width:.1%} ({verdict}), "
            f"{mean.rounds} rounds in {minutes:.0f} min\n" + "\n".join(out))


def main() -> None:
    report_replays(__doc__.split("\n\n")[0], guard_line, f"{OURS}/{BASELINE} interval")


if __name__ == "__main__":
    main()
