"""Where a program's time goes, from a replay's records (client clock): its LLM calls (sent to done,
split into time to first token and the rest), the tool time it waited, and the time between turns
beyond the tool's own: what the client's own calls between turns cost (the SDK's tool events), with
the program's end call after its last turn. Mean seconds per program, one line per policy.

    python bench/turn_split.py bench-out/ablation-bfcl-8x
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workloads.driver import ProgramRecord  # noqa: E402

PARTS = ("jct", "llm", "ttft", "after_first_token", "tool", "between_turns", "after_last_turn")


def split(program: ProgramRecord) -> dict[str, float]:
    """One program's time in PARTS (seconds): jct = llm + tool + between_turns + after_last_turn, and
    what is left of it, the time before the first turn was sent."""
    turns = program.turns
    between = sum(b.sent - a.done for a, b in zip(turns, turns[1:]))
    return {"jct": program.end - program.start,
            "llm": sum(t.done - t.sent for t in turns),
            "ttft": sum(t.first_token - t.sent for t in turns),
            "after_first_token": sum(t.done - t.first_token for t in turns),
            "tool": program.tool_wait_s,
            "between_turns": between - program.tool_wait_s,
            "after_last_turn": program.end - turns[-1].done if turns else 0.0}


def mean_split(records: list[ProgramRecord]) -> dict[str, float]:
    splits = [split(r) for r in records if r.turns and r.error is None]
    return {part: statistics.mean(s[part] for s in splits) for part in PARTS} if splits else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="a replay output directory (its records.json)")
    records = msgspec.json.decode((ap.parse_args().out / "records.json").read_bytes(),
                                  type=dict[str, list[ProgramRecord]])
    print("| policy | " + " | ".join(PARTS) + " |\n|---|" + "---|" * len(PARTS))
    for name, recs in records.items():
        means = mean_split(recs)
        print(f"| {name} | " + " | ".join(f"{means[p]:.3f}" for p in PARTS) + " |")


if __name__ == "__main__":
    main()
