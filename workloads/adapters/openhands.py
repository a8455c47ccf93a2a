"""OpenHands evaluation output (`output.jsonl`, one program per line). An agent action carrying
`tool_call_metadata` is one LLM call's tool call (several actions can share one LLM response);
tool time = the timestamp of the observation caused by the action minus the action's. Token counts
come from `metrics.token_usages` (per response id) when present, else from text (CHARS_PER_TOKEN)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from workloads.adapters.common import (first_line, literal, need, read_json_lines, turns_from_prompt_counts,
                                       turns_from_text)
from workloads.schema import Program, TraceError


def detect(path: Path) -> bool:
    obj = first_line(path) if path.suffix == ".jsonl" else None
    return bool(obj) and "history" in obj and "instance_id" in obj


def load(path: Path) -> list[Program]:
    return [_program(path, n, obj) for n, obj in read_json_lines(path)]


def _ts(event: dict, path: Path, n: int) -> float:
    try:
        return datetime.fromisoformat(event["timestamp"]).timestamp()
    except (KeyError, TypeError, ValueError):
        raise TraceError(path, f"event {event.get('id')} has no ISO timestamp", n) from None


def _chars(e: dict) -> int:
    return len(str(e.get("message") or "")) + len(str(e.get("content") or ""))


def _program(path: Path, n: int, obj: dict) -> Program:
    history = need(obj, "history", path, n)
    observed = {str(e["cause"]): e for e in history if e.get("observation") and e.get("cause") is not None}
    calls: dict[str, dict] = {}  # LLM response id -> the call, in call order
    of_call: set[str] = set()  # ids of actions made by an LLM call
    pending = 0  # input characters since the last LLM call
    for e in history:
        meta = literal(e.get("tool_call_metadata")) if e.get("action") else None
        if meta:
            rid = str((meta.get("model_response") or {}).get("id") or e.get("id"))
            if rid not in calls:
                calls[rid] = {"tool": meta.get("function_name"), "tool_s": 0.0, "timed": False,
                              "new": pending, "out": 0}
                pending = 0
            call = calls[rid]
            of_call.add(str(e.get("id")))
            call["out"] += len(str(e.get("message") or "")) + len(str((e.get("args") or {}).get("thought") or ""))
            obs = observed.get(str(e.get("id")))
            if obs is not None:
                call["tool_s"] += max(0.0, _ts(obs, path, n) - _ts(e, path, n))
                call["timed"] = True
        elif e.get("observation") and str(e.get("cause")) in of_call:
            pending += len(str(e.get("content") or e.get("message") or ""))  # the next call reads it
        else:
            pending += _chars(e)  # system prompt, user messages, recalls
    if not calls:
        raise TraceError(path, "no agent actions with tool_call_metadata (LLM calls)", n)
    order = list(calls.values())
    tools = [c["tool"] for c in order]
    tool_s = [c["tool_s"] if c["timed"] else None for c in order]
    usages = {str(u.get("response_id")): u for u in (obj.get("metrics") or {}).get("token_usages") or []}
    pid = str(obj.get("instance_id"))
    if usages and all(rid in usages for rid in calls):
        prompts = [int(usages[rid]["prompt_tokens"]) for rid in calls]
        outputs = [int(usages[rid]["completion_tokens"]) for rid in calls]
        turns = turns_from_prompt_counts(prompts, outputs, outputs, tools, tool_s)
    else:
        turns = turns_from_text([c["new"] for c in order], [c["out"] for c in order], tools, tool_s)
    return Program(id=pid, source="openhands", turns=turns)
