"""The simulator's host-memory KV tier: vLLM's offloading connector over block identities, with either
of the server's cache policies: vLLM's LRU, or agentserve's next-use order (the same `ChunkOwners` the
server's `NextUseCachePolicy` runs, over the simulated engine's program book).

Every block an engine fills is stored (the connector stores each request's new full blocks after
the step that computed them; the copy runs beside the model, so it costs the step nothing here). A
request's prefix that misses on the device continues on the host: the run of its next blocks the
tier holds is loaded back instead of recomputed, at the cost model's per-token load price. Full, it
evicts its least recently stored or loaded block, or with next-use the least recently used block of
the owners whose next use is furthest away. Left out: the store bandwidth limit.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterable

from agentserve.hosttier.owners import ChunkOwners
from agentserve.sim.pool import BlockKey, leading


class HostTier:
    def __init__(self, num_blocks: int, owners: ChunkOwners | None = None):
        self.num_blocks = num_blocks
        self.blocks: OrderedDict[BlockKey, None] = OrderedDict()  # least recently used first
        self.stored = self.loaded = self.evictions = 0
        self.owners = owners  # None: LRU
        # next-use: blocks by owner set, each least recently used first (few sets: an eviction looks at each)
        self._groups: dict[frozenset, OrderedDict[BlockKey, int]] = {}
        self._clock = itertools.count()

    def store(self, key: BlockKey, program: str | None = None) -> None:
        if key in self.blocks:
            self._use(key, program)
            return
        if len(self.blocks) >= self.num_blocks:
            self._evict()
        self.blocks[key] = None
        self.stored += 1
        self._use(key, program)

    def cached_prefix(self, keys: Iterable[BlockKey]) -> int:
        """How many of `keys`, from the first, the tier holds."""
        return leading(keys, self.blocks)

    def load(self, keys: list[BlockKey], program: str | None = None) -> None:
        for key in keys:
            self._use(key, program)
        self.loaded += len(keys)

    def _use(self, key: BlockKey, program: str | None) -> None:
        self.blocks.move_to_end(key)
        if self.owners is None:
            return
        before = self.owners.of(key)
        self.owners.claim([key], program)
        group = self._groups.get(before)
        if group is not None:
            group.pop(key, None)
        self._groups.setdefault(self.owners.of(key), OrderedDict())[key] = next(self._clock)

    def _evict(self) -> None:
        self.evictions += 1
        if self.owners is None:
            self.blocks.popitem(last=False)
            return
        # furthest next use first; among equals the least recently used (as NextUseCachePolicy.evict)
        best = None
        for owners, group in list(self._groups.items()):
            if not group:
                del self._groups[owners]
                continue
            key, used = next(iter(group.items()))
            rank = (-self.owners.until(owners), used)
            if best is None or rank < best[0]:
                best = (rank, owners, key)
        (until, _), owners, key = best
        del self._groups[owners][key]
        del self.blocks[key]
        self.owners.forget(key, -until)
