"""Continuum's replay trace (`trace_data/test.json` of the Continuum artifact): a JSON list of
programs; `messages` is a JSON string of chat messages; an assistant message is one LLM call, its
`tool_calls` (Python-repr string) name the tools and carry `execution_time_seconds` each. Only text,
so token counts are estimated (CHARS_PER_TOKEN). A call running several tools waits for all: their
times add up."""

from __future__ import annotations

import json
from pathlib import Path

from workloads.adapters.common import content_chars, literal, need, read_json, turns_from_text
from workloads.schema import Program, TraceError


def detect(path: Path) -> bool:
    if path.suffix != ".json":
        return False
    try:
        data = read_json(path)
    except TraceError:
        return False
    return isinstance(data, list) and bool(data) and isinstance(data[0], dict) and "messages" in data[0] \
        and isinstance(data[0]["messages"], str)


def load(path: Path) -> list[Program]:
    data = read_json(path)
    if not isinstance(data, list):
        raise TraceError(path, "expected a JSON list of programs")
    return [_program(path, i, entry) for i, entry in enumerate(data)]


def _program(path: Path, i: int, entry: dict) -> Program:
    try:
        messages = json.loads(need(entry, "messages", path))
    except (TypeError, json.JSONDecodeError) as e:
        raise TraceError(path, f"program {i}: 'messages' is not a JSON string of messages ({e})") from None
    new_chars, out_chars, tools, tool_s = [], [], [], []
    pending = 0
    for m in messages:
        if m.get("role") != "assistant":
            pending += content_chars(literal(m.get("content")) if m.get("role") != "system" else m.get("content"))
            continue
        try:
            calls = literal(m.get("tool_calls") or "[]")
        except (ValueError, SyntaxError) as e:
            raise TraceError(path, f"program {i}: unreadable tool_calls ({e})") from None
        names = [c.get("function", {}).get("name") for c in calls]
        args = sum(len(str(c.get("function", {}).get("arguments", ""))) for c in calls)
        times = [c.get("execution_time_seconds") for c in calls if c.get("execution_time_seconds") is not None]
        new_chars.append(pending)
        out_chars.append(content_chars(m.get("content")) + args)
        tools.append(names[0] if names else None)
        tool_s.append(float(sum(times)) if times else None)
        pending = 0
    if not new_chars:
        raise TraceError(path, f"program {i}: no assistant messages (LLM calls)")
    pid = str(entry.get("traj_id") or entry.get("instance_id") or f"program-{i}")
    return Program(id=pid, source="continuum", turns=turns_from_text(new_chars, out_chars, tools, tool_s))
