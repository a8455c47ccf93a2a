"""The neutral trace schema every adapter produces and the replay driver consumes (msgspec structs).

A program is a list of turns; a turn is one LLM call: the new input it adds to the conversation (the
first turn's is the whole initial prompt; later ones are the previous tool's observation plus the
chat-template overhead), the output length, and the tool its answer runs with that tool's duration.
The driver builds turn k's prompt as turn k-1's prompt + its output + turn k's new input, as a real
agent does, so prefix reuse across turns is what the trace implies.

A program may spawn sub-programs (a multi-agent workflow, a DAG): a turn's `spawn` names sub-programs
(from the program's own `subprograms`) that start when that turn's answer is in, each with the
parent's conversation so far as its prompt's prefix (the task they share); the parent's next turn
waits until all of them have ended (a join). Sub-programs may spawn in turn.

A program may start with a shared prefix (`shared`: a long system prompt and tool list that every
program naming it begins with, as a coding agent's sessions do): the first `tokens` of its first
turn's input are the same text in every program with the same `name`, so they can hit one another's
cache. It is part of turn 0's `new_tokens`.

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
    spawn: list[str] = []  # sub-programs started after this turn; the next turn joins them


class SharedPrefix(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str  # programs naming the same prefix begin with the same text
    tokens: Annotated[int, msgspec.Meta(ge=1)]


class Program(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    id: str
    turns: list[Turn]
    source: str = ""  # the adapter that produced it
    subprograms: list["Program"] = []  # the programs its turns spawn (each exactly once)
    shared: SharedPrefix | None = None  # the start of turn 0's input that other programs share

    def check(self) -> str | None:
        """What is wrong with this program's DAG (None: nothing): every spawn names a sub-program, each
        sub-program is spawned exactly once, never by the last turn (nothing would join it)."""
        ids = [s.id for s in self.subprograms]
        if len(set(ids)) != len(ids):
            return f"program {self.id!r} has two sub-programs with one id"
        spawned = [name for t in self.turns for name in t.spawn]
        if sorted(spawned) != sorted(ids):
            return (f"program {self.id!r}: its turns spawn {sorted(spawned)} but its sub-programs are "
                    f"{sorted(ids)} (each must be spawned exactly once)")
        if self.shared is not None and (not self.turns or self.shared.tokens > self.turns[0].new_tokens):
            return f"program {self.id!r}: its shared prefix is longer than its first turn's input"
        if self.turns and self.turns[-1].spawn:
            return f"program {self.id!r} spawns on its last turn: no later turn would join the sub-programs"
        return next((problem for s in self.subprograms if (problem := s.check()) is not None), None)

    def walk(self):
        """This program and all its sub-programs, depth first."""
        yield self
        for s in self.subprograms:
            yield from s.walk()

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
        self.path, self.problem, self.line = path, problem, line

    def __reduce__(self):  # picklable (a worker process's error reaches its pool)
        return TraceError, (self.path, self.problem, self.line)
