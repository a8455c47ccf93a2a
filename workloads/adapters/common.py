"""What the adapters share: reading JSON / JSON lines with errors that name the file and line, and
turning per-call token counts or texts into schema turns."""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from workloads.schema import Turn, TraceError, tokens_of_chars


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TraceError(path, f"not valid JSON: {e.msg}", e.lineno) from None
    except (OSError, UnicodeDecodeError) as e:
        raise TraceError(path, f"cannot read: {e}") from None


def read_json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise TraceError(path, f"cannot read: {e}") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TraceError(path, f"not valid JSON: {e.msg}", n) from None
        if not isinstance(obj, dict):
            raise TraceError(path, f"expected a JSON object, got {type(obj).__name__}", n)
        yield n, obj


def first_line(path: Path) -> dict | None:
    """The first line of a JSON-lines file as an object, or None (for format detection)."""
    try:
        with path.open() as f:
            line = f.readline()
        obj = json.loads(line)
        return obj if isinstance(obj, dict) else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def literal(value):
    """A field some sources store as the Python repr of a list/dict (str(obj)) rather than JSON."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return ast.literal_eval(value)


def need(obj: dict, key: str, path: Path, line: int | None = None):
    if key not in obj:
        raise TraceError(path, f"missing field {key!r}", line)
    return obj[key]


def turns_from_prompt_counts(prompts: Sequence[int], outputs: Sequence[int], visible: Sequence[int],
                             tools: Sequence[str | None], tool_s: Sequence[float | None]) -> list[Turn]:
    """Turns from the provider's per-call counts: a call's prompt length, its output length, and the
    part of the output that goes back into the next prompt (reasoning tokens do not). New input of
    call k = prompt_k - prompt_{k-1} - visible_{k-1} (the observation + template), at least 0."""
    turns = []
    for k, (p, out) in enumerate(zip(prompts, outputs)):
        new = p if k == 0 else max(0, p - prompts[k - 1] - visible[k - 1])
        turns.append(Turn(new_tokens=new, output_tokens=max(1, out), tool=tools[k], tool_s=tool_s[k]))
    return close_last(turns)


def turns_from_text(new_chars: Sequence[int], output_chars: Sequence[int], tools: Sequence[str | None],
                    tool_s: Sequence[float | None]) -> list[Turn]:
    """Turns from text lengths, for sources without token counts (CHARS_PER_TOKEN)."""
    turns = [Turn(new_tokens=tokens_of_chars(n), output_tokens=max(1, tokens_of_chars(o)), tool=t, tool_s=s)
             for n, o, t, s in zip(new_chars, output_chars, tools, tool_s)]
    return close_last(turns)


def close_last(turns: list[Turn]) -> list[Turn]:
    """The last turn's answer runs no tool the program waits for: the program ends there."""
    if turns:
        last = turns[-1]
        turns[-1] = Turn(new_tokens=last.new_tokens, output_tokens=last.output_tokens)
    return turns


BASH_BLOCK = re.compile(r"```(?:bash|sh)\s*\n\s*(\S+)")


def bash_tool(text: str) -> str:
    """The tool of a bash-only agent's answer: the first word of its bash block (Continuum's rule)."""
    m = BASH_BLOCK.search(text or "")
    return m.group(1).split("/")[-1][:64] if m else "bash"


def content_chars(content) -> int:
    """Characters of a chat message's content: a string or a list of text parts."""
    if content is None:
        return 0
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(p.get("text", "")) if isinstance(p, dict) else len(str(p)) for p in content)
    return len(str(content))
