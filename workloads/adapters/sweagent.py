"""SWE-agent trajectories (`.traj`): `trajectory` holds one entry per LLM call (its `response`, the
`action` run, the `observation` and the action's `execution_time`); `history` holds the chat, whose
messages before the first assistant message are the initial prompt. Only text: token counts are
estimated (CHARS_PER_TOKEN). The tool is the action's first word."""

from __future__ import annotations

from pathlib import Path

from workloads.adapters.common import content_chars, need, read_json, turns_from_text
from workloads.schema import Program, TraceError


def detect(path: Path) -> bool:
    if path.suffix != ".traj":
        return False
    try:
        data = read_json(path)
    except TraceError:
        return False
    return isinstance(data, dict) and isinstance(data.get("trajectory"), list)


def load(path: Path) -> list[Program]:
    data = read_json(path)
    steps = need(data, "trajectory", path)
    if not isinstance(steps, list) or not steps:
        raise TraceError(path, "'trajectory' must be a non-empty list of steps")
    initial = 0
    for m in data.get("history") or []:
        if m.get("role") == "assistant":
            break
        initial += content_chars(m.get("content"))
    new_chars, out_chars, tools, tool_s = [], [], [], []
    previous_observation = initial
    for i, step in enumerate(steps):
        try:
            t = step.get("execution_time")
            tool_s.append(float(t) if t not in (None, "") else None)
        except (TypeError, ValueError):
            raise TraceError(path, f"step {i}: execution_time {step.get('execution_time')!r} is not a number") \
                from None
        action = str(step.get("action") or "").strip()
        new_chars.append(previous_observation)
        out_chars.append(len(str(step.get("response") or "")))
        tools.append(action.split()[0][:64] if action else None)
        previous_observation = len(str(step.get("observation") or ""))
    return [Program(id=path.name.removesuffix(".traj"), source="sweagent",
                    turns=turns_from_text(new_chars, out_chars, tools, tool_s))]
