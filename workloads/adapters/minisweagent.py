"""mini-swe-agent: per-turn JSON lines (one program per line, provider token counts per LLM call) and
raw `.traj.json` trajectories (format `mini-swe-agent-1`: messages; the assistant's `extra.response`
holds the provider's `usage`). mini-swe-agent runs only bash; the tool is the first word of the
answer's bash block where the text exists, else `bash`. Neither format measures tool time."""

from __future__ import annotations

from pathlib import Path

from workloads.adapters.common import (bash_tool, content_chars, first_line, need, read_json,
                                       read_json_lines, turns_from_prompt_counts)
from workloads.schema import Program, TraceError, tokens_of_chars

TURN_KEYS = ("prompt_tokens", "completion_tokens")


def detect_per_turn(path: Path) -> bool:
    obj = first_line(path) if path.suffix == ".jsonl" else None
    return bool(obj) and "instance_id" in obj and isinstance(obj.get("turns"), list)


def load_per_turn(path: Path) -> list[Program]:
    programs = []
    for n, obj in read_json_lines(path):
        turns = need(obj, "turns", path, n)
        if not isinstance(turns, list) or not turns:
            raise TraceError(path, "'turns' must be a non-empty list", n)
        try:
            prompts = [int(t["prompt_tokens"]) for t in turns]
            outputs = [int(t["completion_tokens"]) for t in turns]
            visible = [o - int(t.get("reasoning_tokens") or 0) for o, t in zip(outputs, turns)]
        except (KeyError, TypeError, ValueError) as e:
            raise TraceError(path, f"a turn lacks an integer {TURN_KEYS} field ({e})", n) from None
        tools = ["bash"] * len(turns)
        programs.append(Program(id=str(need(obj, "instance_id", path, n)), source="minisweagent",
                                turns=turns_from_prompt_counts(prompts, outputs, visible, tools,
                                                               [None] * len(turns))))
    return programs


def detect_traj(path: Path) -> bool:
    if not path.name.endswith(".traj.json"):
        return False
    try:
        return read_json(path).get("trajectory_format", "").startswith("mini-swe-agent")
    except (TraceError, AttributeError):
        return False


def load_traj(path: Path) -> list[Program]:
    data = read_json(path)
    messages = need(data, "messages", path)
    prompts, outputs, visible, tools = [], [], [], []
    chars_before = 0
    for m in messages:
        if m.get("role") != "assistant":
            chars_before += content_chars(m.get("content"))
            continue
        usage = ((m.get("extra") or {}).get("response") or {}).get("usage") or {}
        text = m.get("content") or ""
        out = int(usage.get("completion_tokens") or tokens_of_chars(len(text)))
        reasoning = int((usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0)
        # Without usage, estimate the prompt from all text so far.
        prompt = int(usage.get("prompt_tokens") or tokens_of_chars(chars_before))
        prompts.append(prompt)
        outputs.append(out)
        visible.append(out - reasoning if usage else out)
        tools.append(bash_tool(text))
        chars_before += len(text)
    if not prompts:
        raise TraceError(path, "no assistant messages (LLM calls) in the trajectory")
    pid = str(data.get("instance_id") or path.name.removesuffix(".traj.json"))
    return [Program(id=pid, source="minisweagent-traj",
                    turns=turns_from_prompt_counts(prompts, outputs, visible, tools, [None] * len(prompts)))]
