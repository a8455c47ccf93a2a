"""The pin table: which program holds which KV blocks until when. Bookkeeping only, no engine.

A pin keeps the KV blocks of a program's finished turn referenced across its tool call, so LRU cannot
evict them and the next turn hits them through ordinary prefix caching. The engine adapter
(`agentserve.engine.scheduler`) does the block reference counting; this table decides which pins exist
and which one goes when, so its invariants are tested without an engine:

- at most one pin per program (a new turn's pin replaces the previous one);
- pinned blocks never exceed `cap_blocks` (a new pin that would exceed it first evicts pins of later
  programs, else is refused);
- every pin leaves through exactly one `Release`, carrying why: consumed (the next turn was admitted),
  expired, pressure, program_end, abort, replaced, cap, moved. No pin survives its program;
- with groups (tenants): a group's pinned blocks never exceed its own cap; a new pin over it first
  evicts later programs' pins of the same group, else is refused.

Victims under pressure are the pins of the latest-arriving programs (Continuum): the earliest programs,
which program-FCFS serves first, keep their KV longest.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field

# moved: the program's next call ran on another replica (Ray Serve), where this pin is of no use.
RELEASE_REASONS = ("consumed", "expired", "pressure", "program_end", "abort", "replaced", "cap", "moved", "paused")


@dataclass(slots=True)
class Pin:
    program_id: str
    blocks: Sequence  # opaque to the table: the engine adapter's block objects
    tokens: int  # tokens of KV the pin keeps (blocks x block size)
    program_rank: int  # program arrival order: lower = earlier
    created_at: float
    expires_at: float

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)


@dataclass(slots=True, frozen=True)
class Release:
    pin: Pin
    reason: str


@dataclass
class PinTable:
    cap_blocks: int
    pins: dict[str, Pin] = field(default_factory=dict)
    pinned_blocks: int = 0
    group_caps: dict[str, int] = field(default_factory=dict)  # group (tenant) -> its own cap in blocks
    group_of: Callable[[str], str | None] = lambda program_id: None

    def __post_init__(self) -> None:
        if self.cap_blocks < 0:
            raise ValueError(f"cap_blocks must be >= 0, got {self.cap_blocks}")

    def __len__(self) -> int:
        return len(self.pins)

    def __contains__(self, program_id: Hashable) -> bool:
        return program_id in self.pins

    def get(self, program_id: str) -> Pin | None:
        return self.pins.get(program_id)

    def add(self, pin: Pin) -> tuple[bool, list[Release]]:
        """Insert `pin`; returns (inserted, releases the caller must carry out)."""
        releases: list[Release] = []
        if (old := self.pins.get(pin.program_id)) is not None:
            releases.append(self._drop(old, "replaced"))
        if pin.num_blocks == 0:
            return False, releases
        group = self.group_of(pin.program_id)
        cap = self.group_caps.get(group) if group is not None else None
        while cap is not None and self.group_blocks(group) + pin.num_blocks > cap:
            later = [p for p in self.pins.values()
                     if self.group_of(p.program_id) == group and p.program_rank > pin.program_rank]
            if not later:
                return False, releases  # the group's cap is held by its earlier programs
            releases.append(self._drop(max(later, key=lambda p: (p.program_rank, p.created_at)), "cap"))
        while self.pinned_blocks + pin.num_blocks > self.cap_blocks:
            victim = self.latest_program_pin()
            if victim is None or victim.program_rank <= pin.program_rank:
                return False, releases  # only earlier programs hold the cap: the new pin yields
            releases.append(self._drop(victim, "cap"))
        self.pins[pin.program_id] = pin
        self.pinned_blocks += pin.num_blocks
        return True, releases

    def group_blocks(self, group: str) -> int:
        return sum(p.num_blocks for p in self.pins.values() if self.group_of(p.program_id) == group)

    def release(self, program_id: str, reason: str) -> Release | None:
        pin = self.pins.get(program_id)
        return None if pin is None else self._drop(pin, reason)

    def expire(self, now: float, busy_programs: Iterable[str] = ()) -> list[Release]:
        """Release pins past their expiry, except those of programs with a request waiting (its hit
        is about to take the pin over)."""
        busy = set(busy_programs)
        due = [p for p in self.pins.values() if p.expires_at <= now and p.program_id not in busy]
        return [self._drop(p, "expired") for p in due]

    def latest_program_pin(self) -> Pin | None:
        if not self.pins:
            return None
        return max(self.pins.values(), key=lambda p: (p.program_rank, p.created_at))

    def release_for_pressure(self, spare: str | None = None, junior_to: int | None = None) -> Release | None:
        """Release the pin of the latest-arriving program, if any (memory pressure). The pin of
        program `spare` (the one asking for memory: its pin holds its own prefix) goes last.
        With `junior_to` (the asker's program rank), only pins of later programs are candidates:
        an earlier program's pin is not given up for a later program's waiting request."""
        if junior_to is not None:
            pool = [p for p in self.pins.values() if p.program_rank > junior_to and p.program_id != spare]
        else:
            pool = [p for p in self.pins.values() if p.program_id != spare] or list(self.pins.values())
        if not pool:
            return None
        return self._drop(max(pool, key=lambda p: (p.program_rank, p.created_at)), "pressure")

    def release_all(self, reason: str) -> list[Release]:
        return [self._drop(p, reason) for p in list(self.pins.values())]

    def next_expiry(self) -> float | None:
        return min((p.expires_at for p in self.pins.values()), default=None)

    def _drop(self, pin: Pin, reason: str) -> Release:
        assert reason in RELEASE_REASONS, reason
        del self.pins[pin.program_id]
        self.pinned_blocks -= pin.num_blocks
        return Release(pin, reason)
