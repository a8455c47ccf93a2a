"""Which programs a host-tier chunk belongs to, and so when it is next needed: the next-use eviction
order of the host tier. Plain Python, shared by vLLM's cache policy (hosttier/policy.py) and the
simulator's host tier (sim/host.py).

A chunk's owners are the programs whose requests stored or reused it. A chunk several programs use (a
common system prompt) is needed as soon as the first of them needs it: its next use is the soonest of
theirs, so a shared prefix outlives any one program (evicting it would make every later block of every
context that starts with it unreachable for prefix matching). Past `MAX_OWNERS` programs a chunk
counts as needed now. A chunk no program claimed is a one-off request's: never needed again. The
order: furthest next use first (`seconds_until`); the adapter breaks ties by least recent use.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

from agentserve.programs.next_use import NEVER, NextUse

MAX_OWNERS = 8  # programs remembered per chunk; a chunk shared more widely counts as needed now
SHARED = "*"  # the owner set of a chunk shared past MAX_OWNERS
NOBODY: frozenset = frozenset()


class ChunkOwners:
    def __init__(self, next_use: NextUse | None = None):
        self.next_use = next_use  # None: no program is known (every chunk is a one-off's: LRU order)
        self.owners: dict[Hashable, frozenset] = {}
        self.evicted_by_reason: dict[str, int] = {"never": 0, "later": 0}

    def claim(self, keys: Iterable[Hashable], program: str | None) -> None:
        """`program` (None: a one-off request) stored or reused these chunks."""
        for key in keys:
            owners = self.owners.get(key, NOBODY)
            if program is None or SHARED in owners or program in owners:
                continue
            owners = owners | {program}
            self.owners[key] = frozenset({SHARED}) if len(owners) > MAX_OWNERS else owners

    def of(self, key: Hashable) -> frozenset:
        return self.owners.get(key, NOBODY)

    def seconds_until(self, key: Hashable) -> float:
        """Seconds until the first of the chunk's programs needs it (NEVER for a one-off's)."""
        return self.until(self.of(key))

    def until(self, owners: frozenset) -> float:
        """Seconds until the first of `owners` needs their chunk (0 for every chunk while no program is
        known: the order is then the adapter's LRU)."""
        if self.next_use is None or SHARED in owners:
            return 0.0
        if not owners:
            return NEVER
        return min(self.next_use.seconds_until(p) for p in owners)

    def forget(self, key: Hashable, until: float | None = None) -> None:
        """The chunk left the tier (`until`: its next use when it was evicted, counted by reason)."""
        self.owners.pop(key, None)
        if until is not None:
            self.evicted_by_reason["never" if until == NEVER else "later"] += 1

    def clear(self) -> None:
        self.owners.clear()
