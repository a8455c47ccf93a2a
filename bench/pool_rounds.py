"""agentserve / vllm+offload over the rounds of several replays pooled (runs of one plan made apart, e.g.
in two sessions): each replay's rounds keep their own number, and the interval resamples them all as
one replay's would (workloads/intervals.py), raw.

    python bench/pool_rounds.py bench-out/bfcl-8x bench-out/split-bfcl-8x
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workloads.driver import ProgramRecord  # noqa: E402
from workloads.intervals import compare  # noqa: E402

OURS, BASELINE = "agentserve", "vllm+offload"


def pooled(outs: list[Path]) -> dict[str, list[ProgramRecord]]:
    records: dict[str, list[ProgramRecord]] = {OURS: [], BASELINE: []}
    offset = 0
    for out in outs:
        run = msgspec.json.decode((out / "records.json").read_bytes(), type=dict[str, list[ProgramRecord]])
        if not all(name in run for name in records):
            raise SystemExit(f"{out}: no {OURS} and {BASELINE} records")
        rounds = 1 + max(r.round for r in run[OURS])
        for name in records:
            for r in run[name]:
                r.round += offset
            records[name] += run[name]
        offset += rounds
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outs", nargs="+", type=Path, help="replay output directories of one plan")
    for i in compare(pooled(ap.parse_args().outs), {}, [(OURS, BASELINE)]):
        print(f"{OURS}/{BASELINE} {i.metric}: {i.ratio:.3f} [{i.lo:.3f}, {i.hi:.3f}] over {i.rounds} rounds")


if __name__ == "__main__":
    main()
