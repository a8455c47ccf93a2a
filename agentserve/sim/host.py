"""The simulator's host-memory KV tier: vLLM's offloading connector with its LRU cache policy, over
block identities.

Every block an engine fills is stored (the connector stores each request's new full blocks after
the step that computed them; the copy runs beside the model, so it costs the step nothing here). A
request's prefix that misses on the device continues on the host: the run of its next blocks the
tier holds is loaded back instead of recomputed, at the cost model's per-token load price. Full, it
evicts its least recently stored or loaded block. Left out: the next-use host policy (`--host-policy
next-use`; LRU is the default) and the store bandwidth limit.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from agentserve.sim.pool import BlockKey, leading


class HostTier:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.blocks: OrderedDict[BlockKey, None] = OrderedDict()  # least recently used first
        self.stored = self.loaded = self.evictions = 0

    def store(self, key: BlockKey) -> None:
        if key in self.blocks:
            self.blocks.move_to_end(key)
            return
        if len(self.blocks) >= self.num_blocks:
            self.blocks.popitem(last=False)
            self.evictions += 1
        self.blocks[key] = None
        self.stored += 1

    def cached_prefix(self, keys: Iterable[BlockKey]) -> int:
        """How many of `keys`, from the first, the tier holds."""
        return leading(keys, self.blocks)

    def load(self, keys: list[BlockKey]) -> None:
        for key in keys:
            self.blocks.move_to_end(key)
        self.loaded += len(keys)
