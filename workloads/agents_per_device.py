"""Agents per device: the most programs a policy serves at once (closed loop, `--concurrency`) while
latency targets hold, as AA-AgentPerf counts concurrent agents per accelerator.

A sweep runs one plan at several concurrencies; concurrency 1 serves each program alone, and is the
baseline of the slowdown. A point meets the targets when
- the p90 TTFT of every call is at most `ttft_p90_s`, and
- the mean slowdown of a call (its time, from sent to its last token, over the same call's time at
  concurrency 1) is at most `slowdown`.
Times count from when the call was sent, so any wait before the engine admits it (queueing, a paused
program) is in them; a program's first call is sent when it arrives. The answer is the largest
concurrency at which this and every smaller concurrency tried meet the targets (a sweep that stops
meeting and meets again further on is noise or a knee worth a closer look, not capacity).
Calls that failed, and calls the baseline lacks, are left out and counted.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from workloads.driver import ProgramRecord
from workloads.report import percentile


class Targets(msgspec.Struct, frozen=True):
    ttft_p90_s: float
    slowdown: float = 2.0


class Point(msgspec.Struct):
    concurrency: int
    calls: int
    ttft_p90_s: float | None
    mean_slowdown: float | None
    meets: bool
    left_out: int = 0  # calls of failed programs or without a baseline


def call_times(records: Iterable[ProgramRecord]) -> list[tuple[tuple[str, int], float, float]]:
    """((program, call index), TTFT, the call's time) of a run's calls (every round's); failed programs left out."""
    return [((r.id, k), t.first_token - t.sent, t.done - t.sent)
            for r in records if r.error is None for k, t in enumerate(r.turns)]


def alone_times(records: Iterable[ProgramRecord]) -> dict[tuple[str, int], float]:
    """Each call's time at concurrency 1 (its mean over rounds)."""
    sums: dict[tuple[str, int], list[float]] = {}
    for key, _, seconds in call_times(records):
        sums.setdefault(key, []).append(seconds)
    return {key: sum(v) / len(v) for key, v in sums.items()}


def point(concurrency: int, records: list[ProgramRecord], alone: dict[tuple[str, int], float],
          targets: Targets) -> Point:
    calls = [c for c in call_times(records) if alone.get(c[0], 0) > 0]
    total = sum(len(r.turns) for r in records)
    p90 = percentile([ttft for _, ttft, _ in calls], 90)
    slowdown = sum(seconds / alone[key] for key, _, seconds in calls) / len(calls) if calls else None
    meets = p90 is not None and slowdown is not None and p90 <= targets.ttft_p90_s and slowdown <= targets.slowdown
    return Point(concurrency=concurrency, calls=len(calls), ttft_p90_s=p90, mean_slowdown=slowdown, meets=meets,
                 left_out=total - len(calls))


def sustained(points: list[Point]) -> int | None:
    """The largest concurrency whose point, and every point below it, meets the targets (None: not even
    the smallest tried)."""
    best = None
    for p in sorted(points, key=lambda p: p.concurrency):
        if not p.meets:
            break
        best = p.concurrency
    return best
