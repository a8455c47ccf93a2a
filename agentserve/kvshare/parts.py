"""A prompt as parts: the consumer's own template text, and shared content (another agent's output,
the common question) whose KV may be reused. What an agent marks through the SDK/API."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Text:
    ids: list[int]


@dataclass(frozen=True)
class Shared:
    ids: list[int]
    source: str | int = ""  # who produced it (for reports; reuse is keyed by content alone)


Part = Text | Shared


def flatten(parts: Sequence[Part]) -> list[int]:
    return [t for part in parts for t in part.ids]
