"""TraceLab's normalized round rows (github.com/uw-syfi/TraceLab; its dataset is CC BY 4.0): one JSON
object per LLM round of a Claude Code or Codex session, with `session_id`, `round_index`,
`input_tokens_total` (= `prefix_tokens` + `newly_append_tokens`), `output_tokens` (with
`reasoning_output_tokens` where the provider reports them apart) and `tools[]`, each with `tool_name` and
`tool_wall_latency_ms` (and `tool_internal_latency_ms`, the runner's own figure).

A session is a program, its rounds in `round_index` order (file order breaks ties, as TraceLab's own
tools do). New input of round k is what its prompt adds to round k-1's prompt and visible answer
(`turns_from_prompt_counts`). A session whose prompt shrinks below half its previous length was
compacted (summarised and restarted): this schema's contexts only grow, so the session continues as a
new program (`<session>/c1`, ...) that starts from the compacted prompt. A round's tool time is the
span of its tools (several may run at once): the first `emitted_at` to the last `result_at` where the
rows have them, else the longest wall latency (the internal one where no wall one was recorded). Wall
time, not the runner's own, because the engine waits out the wall time (approvals included). Its tool
is the first tool's name.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from pathlib import Path

from workloads.adapters.common import first_line, need, read_json_lines, turns_from_prompt_counts
from workloads.schema import Program, TraceError

# A prompt shorter than this share of the previous one is a compaction, not a dropped reasoning block.
COMPACTED_BELOW = 0.5


def detect(path: Path) -> bool:
    obj = first_line(path) if path.suffix == ".jsonl" else None
    return bool(obj) and "input_tokens_total" in obj and "session_id" in obj


def load(path: Path) -> list[Program]:
    sessions: dict[str, list[tuple[int, int, dict]]] = defaultdict(list)
    for n, row in read_json_lines(path):
        session = str(need(row, "session_id", path, n))
        index = need(row, "round_index", path, n)
        if not isinstance(index, int):
            raise TraceError(path, f"round_index must be an integer, got {index!r}", n)
        sessions[session].append((index, n, row))
    programs = []
    for session, rounds in sessions.items():
        rounds.sort(key=lambda r: (r[0], r[1]))
        programs += _programs(path, session, rounds)
    return programs


def _count(row: dict, key: str, path: Path, n: int, required: bool = True) -> int:
    value = need(row, key, path, n) if required else row.get(key)
    if value is None and not required:
        return 0
    if not isinstance(value, int) or value < 0:
        raise TraceError(path, f"{key} must be a count >= 0, got {value!r}", n)
    return value


def _programs(path: Path, session: str, rounds: list[tuple[int, int, dict]]) -> list[Program]:
    segments: list[list[tuple[int, dict]]] = [[]]
    previous = None
    for _, n, row in rounds:
        prompt = _count(row, "input_tokens_total", path, n)
        if previous is not None and prompt < COMPACTED_BELOW * previous:
            segments.append([])
        segments[-1].append((n, row))
        previous = prompt
    out = []
    for i, segment in enumerate(segments):
        prompts = [_count(row, "input_tokens_total", path, n) for n, row in segment]
        outputs = [_count(row, "output_tokens", path, n) for n, row in segment]
        visible = [max(0, o - _count(row, "reasoning_output_tokens", path, n, required=False))
                   for o, (n, row) in zip(outputs, segment)]
        tools = [_tools(row, path, n) for n, row in segment]
        turns = turns_from_prompt_counts(prompts, outputs, visible, [t[0] for t in tools], [t[1] for t in tools])
        out.append(Program(id=session if i == 0 else f"{session}/c{i}", turns=turns, source="tracelab"))
    return out


def _tools(row: dict, path: Path, n: int) -> tuple[str | None, float | None]:
    """The round's tool and its time in seconds (None: no tool, or no latency recorded)."""
    tools = row.get("tools") or []
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise TraceError(path, "tools must be a list of objects", n)
    if not tools:
        return None, None
    name = str(tools[0].get("tool_name") or "tool")
    spans = [(_ts(t.get("emitted_at")), _ts(t.get("result_at"))) for t in tools]
    if all(a is not None and b is not None for a, b in spans):
        return name, max(0.0, max(b for _, b in spans) - min(a for a, _ in spans))
    latencies = [t.get("tool_wall_latency_ms") if t.get("tool_wall_latency_ms") is not None
                 else t.get("tool_internal_latency_ms") for t in tools]
    known = [ms for ms in latencies if isinstance(ms, (int, float)) and ms >= 0]
    return name, (max(known) / 1000 if known else None)


def _ts(value) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
