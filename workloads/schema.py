"""The neutral trace schema every adapter produces and the replay driver consumes (msgspec structs).

A program is a list of turns; a turn is one LLM call: the new input it adds to the conversation (the
first turn's is the whole initial prompt; later ones are the previous tool's observation plus the
chat-template overhead), the output length, and the tool its answer runs with that tool's duration.
The driver builds turn k's prompt as turn k-1's prompt + its output + turn k's new input, as a real
agent does, so prefix reuse across turns is what the trace implies.

Token counts are the source's own (provider tokenizer) where it reports them, else estimated from
text at `CHARS_PER_TOKEN`. A tool duration of None means the source did not measure it; the driver
fills it from the tool-time model (`tool_times.py`) with a seeded sample.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

SCHEMA_VERSION = 1
# Chars per token for sources that only have text: the usual figure for English and code with
# GPT/Llama-class BPE tokenizers.
CHARS_PER_TOKEN = 4.0

NonNeg = Annotated[int, msgspec.Meta(ge=0)]


def tokens_of_chars(chars: int) -> int:
    return max(1, round(chars / CHARS_PER_TOKEN)) if chars > 0 else 0


class Turn(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    new_tokens: NonNeg  # input added by this turn (turn 0: the whole initial prompt)
    output_tokens: Annotated[int, msgspec.Meta(ge=1)]
    tool: str | None = None  # the tool this turn's answer runs (None: no tool, e.g. the last turn)
    tool_s: Annotated[float, msgspec.Meta(ge=0)] | None = None  # measured tool duration; None = unknown


class Program(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    id: str
    turns: list[Turn]
    source: str = ""  # the adapter that produced it

    @property
    def context_tokens(self) -> int:
        """The last turn's prompt length: every input and every output before the last output."""
        return sum(t.new_tokens for t in self.turns) + sum(t.output_tokens for t in self.turns[:-1])


class Trace(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    name: str
    programs: list[Program]
    version: int = SCHEMA_VERSION


class TraceError(ValueError):
    """A trace file that cannot be read; the message names the file (and line, where there is one)."""

    def __init__(self, path: object, problem: str, line: int | None = None):
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {problem}")
        self.path, self.line = path, line
