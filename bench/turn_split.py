"""Where a program's time goes, from a replay's records.

Client side (records.json, the client's clock): its LLM calls (sent to done, split into time to first
token and the rest), the tool time it waited, and the time between turns beyond the tool's own (what
the client's own calls between turns cost), with the time after its last turn. Mean seconds per
program, one line per policy.

Engine side (turns.json, written by `agentserve replay --turn-times`): each LLM call's time inside the
engine, by part (engine/turn_ledger.py: queue, load-back, prefill, recompute after a preemption,
decode, between steps), each measured from the scheduler's own states; mean seconds per call, one line
per policy. `front_end` is the one remainder, and is labelled so: a call's mean time at the client
minus its mean time in the engine (HTTP, tokenizing, the program layer, IPC, streaming back). Then
the same per call in units of each run's own mean decode step, averaged over rounds: whole runs move
with the machine's speed, and a step of the same run is the unit that moves with them.

    python bench/turn_split.py bench-out/ablation-bfcl-8x
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agentserve.engine.turn_ledger import PARTS as ENGINE_PARTS, TurnTimes  # noqa: E402
from workloads.driver import ProgramRecord  # noqa: E402

PARTS = ("jct", "llm", "ttft", "after_first_token", "tool", "between_turns", "after_last_turn")


class EngineTurn(TurnTimes, kw_only=True):
    round: int


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


def engine_split(turns: list[EngineTurn], records: list[ProgramRecord]) -> dict[str, float]:
    """Mean seconds per call in each engine part, the front end's remainder, and the calls counted."""
    done = [t for t in turns if not t.aborted]
    if not done:
        return {}
    out = {part: statistics.mean(getattr(t, part) for t in done) for part in ENGINE_PARTS}
    calls = [t.done - t.sent for r in records if r.error is None for t in r.turns]
    out["front_end"] = statistics.mean(calls) - statistics.mean(t.total for t in done) if calls else float("nan")
    out["preemptions"] = statistics.mean(t.preemptions for t in done)
    out["calls"] = len(done)
    return out


def in_steps(turns: list[EngineTurn], records: list[ProgramRecord]) -> dict[str, float]:
    """`engine_split` per round in units of that round's mean decode step, averaged over rounds, with the
    decode step's range over rounds (ms)."""
    rounds = sorted({t.round for t in turns})
    per_round, steps = [], []
    for k in rounds:
        mine = [t for t in turns if t.round == k]
        decode_steps = sum(t.decode_steps for t in mine)
        split = engine_split(mine, [r for r in records if r.round == k])
        if not decode_steps or not split:
            continue
        step = sum(t.decode for t in mine) / decode_steps
        steps.append(step)
        per_round.append({c: split[c] / step for c in (*ENGINE_PARTS, "front_end")})
    if not per_round:
        return {}
    out = {c: statistics.mean(r[c] for r in per_round) for c in per_round[0]}
    out["llm"] = sum(out[c] for c in (*ENGINE_PARTS, "front_end"))
    out["step_ms_min"], out["step_ms_max"] = 1000 * min(steps), 1000 * max(steps)
    return out


def load(out: Path) -> tuple[dict[str, list[ProgramRecord]], dict[str, list[EngineTurn]] | None]:
    """A replay's (or a simulation's) records and, if it kept them, its engine turns."""
    records = msgspec.json.decode((out / "records.json").read_bytes(), type=dict[str, list[ProgramRecord]])
    path = out / "turns.json"
    return records, msgspec.json.decode(path.read_bytes(), type=dict[str, list[EngineTurn]]) if path.exists() else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="a replay output directory (its records.json, and turns.json if any)")
    records, turns = load(ap.parse_args().out)
    print("| policy | " + " | ".join(PARTS) + " |\n|---|" + "---|" * len(PARTS))
    for name, recs in records.items():
        means = mean_split(recs)
        print(f"| {name} | " + " | ".join(f"{means[p]:.3f}" for p in PARTS) + " |")
    if turns is None:
        return
    columns = (*ENGINE_PARTS, "front_end", "preemptions", "calls")
    print("\nin the engine, mean per call (seconds; front_end: client time minus engine time)\n"
          "| policy | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
    for name, recs in records.items():
        means = engine_split(turns.get(name, []), recs)
        if means:
            print(f"| {name} | " + " | ".join(f"{means[c]:.0f}" if c == "calls" else f"{means[c]:.3f}"
                                             for c in columns) + " |")
    columns = (*ENGINE_PARTS, "front_end", "llm", "step_ms_min", "step_ms_max")
    print("\nper call in decode steps of its own run, mean over rounds (step_ms: the runs' mean decode step)\n"
          "| policy | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
    for name, recs in records.items():
        steps = in_steps(turns.get(name, []), recs)
        if steps:
            print(f"| {name} | " + " | ".join(f"{steps[c]:.1f}" if c.startswith("step_ms") else f"{steps[c]:.2f}"
                                             for c in columns) + " |")


if __name__ == "__main__":
    main()
