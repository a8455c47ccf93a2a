"""The simulator's KV block pool: vLLM's `BlockPool` semantics over block identities, no tensors.

A full block is identified by its content (`BlockKey`: whose token stream it belongs to and its
index in it: a program's stream only grows, so block i's tokens never change once it is full). Full
blocks are cached under their key; a block whose reference count drops to 0 stays cached, in an LRU
free queue, until a new allocation evicts it (vLLM frees a request's blocks tail first, so its tail
is evicted first). Blocks that are not full yet are anonymous. Invariant (`check`): every block is
free-anonymous, cached-free, or referenced, and they add up to the pool.

With `next_use` (seconds until a stream's owner needs its blocks again; the clairvoyant policy's true
next use), an allocation evicts instead from the owner needed furthest ahead (Belady's choice, by
owner), that owner's tail first: a mechanism vLLM's pool does not have, for measuring headroom.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Container, Iterable

BlockKey = tuple[str, int]


def leading(keys: Iterable[BlockKey], held: Container[BlockKey]) -> int:
    """How many of `keys`, from the first, `held` has (read lazily: stops at the first miss)."""
    n = 0
    for key in keys:
        if key not in held:
            break
        n += 1
    return n


class BlockPool:
    def __init__(self, num_blocks: int, next_use: Callable[[str], float] | None = None):
        self.num_blocks = num_blocks
        self.next_use = next_use
        self.empty = num_blocks  # never used, or freed before filling
        self.ref: dict[BlockKey, int] = {}  # cached full blocks -> references (0: in the free queue)
        self.lru: OrderedDict[BlockKey, None] = OrderedDict()  # cached blocks with no reference, oldest first
        self.anonymous = 0  # blocks held while filling
        self.evictions = 0

    def num_free(self) -> int:
        return self.empty + len(self.lru)

    def cached_prefix(self, keys: Iterable[BlockKey]) -> int:
        """How many of `keys`, from the first, are cached."""
        return leading(keys, self.ref)

    def touch(self, keys: list[BlockKey]) -> None:
        """Reference cached blocks (a prefix hit, a pin)."""
        for key in keys:
            if self.ref[key] == 0:
                del self.lru[key]
            self.ref[key] += 1

    def take(self, n: int) -> bool:
        """Allocate `n` anonymous blocks, evicting the oldest free cached ones; False (nothing taken)
        if there are not enough."""
        if n > self.num_free():
            return False
        fresh = min(n, self.empty)
        self.empty -= fresh
        for key in self._victims(n - fresh):
            del self.lru[key]
            del self.ref[key]
            self.evictions += 1
        self.anonymous += n
        return True

    def _victims(self, n: int) -> list[BlockKey]:
        if n <= 0:
            return []
        if self.next_use is None:
            return list(itertools.islice(self.lru, n))
        # by owner, the one needed furthest ahead first; each owner's in queue order (its tail first)
        owners: dict[str, list[BlockKey]] = {}
        for key in self.lru:
            owners.setdefault(key[0], []).append(key)
        ranked = sorted(owners, key=self.next_use, reverse=True)
        return list(itertools.islice((key for owner in ranked for key in owners[owner]), n))

    def fill(self, key: BlockKey) -> None:
        """An anonymous block became full with `key`'s content: cached, referenced once. If another
        request filled the same content meanwhile, that copy is shared and this one freed."""
        self.anonymous -= 1
        if key in self.ref:
            self.empty += 1
            self.touch([key])
        else:
            self.ref[key] = 1

    def release(self, keys: list[BlockKey], anonymous: int = 0) -> None:
        """Drop references: cached blocks go to the free queue (last key first, so a context's tail
        is evicted before its head), anonymous ones back to empty."""
        for key in reversed(keys):
            self.ref[key] -= 1
            if self.ref[key] == 0:
                self.lru[key] = None
        self.anonymous -= anonymous
        self.empty += anonymous

    def evict_first(self, keys: list[BlockKey]) -> int:
        """Free cached blocks nobody will ask for again go to the front of the free queue; returns how
        many moved."""
        moved = 0
        for key in keys:  # each to the front: the tail ends up first, as the plugin orders vLLM's queue
            if key in self.lru:
                self.lru.move_to_end(key, last=False)
                moved += 1
        return moved

    def check(self) -> None:
        referenced = sum(1 for r in self.ref.values() if r > 0)
        assert all(r >= 0 for r in self.ref.values()), "negative reference count"
        assert len(self.lru) == sum(1 for r in self.ref.values() if r == 0), "free queue out of step"
        assert self.empty + len(self.lru) + referenced + self.anonymous == self.num_blocks, "blocks not conserved"
