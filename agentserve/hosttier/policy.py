"""The host tier's eviction policy: vLLM's LRU cache policy, choosing its victims by predicted next use.

A vLLM `CachePolicy` (v1/kv_offload/cpu/policies), loaded by name through the spec's
`cache_policy_module_path`, so vLLM's `CPUOffloadingManager` keeps doing the bookkeeping (chunks,
transfer reference counts, protection). What changes is which evictable chunk goes: the one whose
program's next use is furthest away (`agentserve.programs.next_use.NextUse`: one-off requests and
ended programs first, then programs deep in long tool calls; programs due soon last); LRU order only
breaks ties, so within one program the least recently used chunks (its context's tail, touched last
in reverse) go first.

The chunk -> programs map is learnt from the requests that store or reuse a chunk (`ReqContext.req_id`,
resolved by the scheduler plugin, which finds the policy in its connector when it is built and
`attach`es its request -> program lookup and the book's next uses to it); what a chunk's owners mean
for its next use is hosttier/owners.py's, which the simulator's host tier runs too. Not vLLM's per-request
`kv_hints`: a program's next use changes after its request arrived (its tool call's prediction comes
when the call ends), so the policy asks the book at eviction time instead. Without the plugin (no
`attach`) no program is known and the policy is LRU.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Sequence

from vllm.v1.kv_offload.base import OffloadKey, ReqContext
from vllm.v1.kv_offload.cpu.policies.base import ChunkStatus
from vllm.v1.kv_offload.cpu.policies.lru import LRUCachePolicy

from agentserve.hosttier import worker
from agentserve.hosttier.owners import ChunkOwners
from agentserve.programs.next_use import NextUse


def _no_owner(req_id: str) -> str | None:
    return None


class NextUseCachePolicy(LRUCachePolicy):
    def __init__(self, cache_capacity: int):
        super().__init__(cache_capacity)
        self.chunks_of = ChunkOwners()  # which programs each chunk belongs to, and their next uses
        self.owner_of: Callable[[str], str | None] = _no_owner

    @property
    def evicted_by_reason(self) -> dict[str, int]:
        return self.chunks_of.evicted_by_reason

    def attach(self, owner_of: Callable[[str], str | None], next_use: NextUse) -> None:
        """The scheduler plugin's request -> program lookup and its book's next-use predictions."""
        self.owner_of, self.chunks_of.next_use = owner_of, next_use

    def _claim(self, keys: Iterable[OffloadKey], req_context: ReqContext) -> None:
        self.chunks_of.claim(keys, self.owner_of(req_context.req_id))

    def seconds_until(self, key: OffloadKey) -> float:
        """Seconds until the first of the chunk's programs needs it (NEVER for a one-off's)."""
        return self.chunks_of.seconds_until(key)

    def on_store_miss(self, keys: Iterable[OffloadKey], req_context: ReqContext) -> None:
        keys = list(keys)
        self._claim(keys, req_context)
        super().on_store_miss(keys, req_context)

    def touch(self, keys: Iterable[OffloadKey], req_context: ReqContext) -> None:
        keys = list(keys)
        self._claim(keys, req_context)
        super().touch(keys, req_context)

    def on_request_finished(self, key_groups: Sequence[Sequence[OffloadKey]], insertion_only_keys: set[OffloadKey],
                            reused_keys: set[OffloadKey], req_context: ReqContext) -> None:
        self._claim((k for group in key_groups for k in group), req_context)
        super().on_request_finished(key_groups, insertion_only_keys, reused_keys, req_context)

    def remove(self, key: OffloadKey) -> None:
        super().remove(key)
        self.chunks_of.forget(key)

    def clear(self) -> None:
        super().clear()
        self.chunks_of.clear()

    def evict(self, n: int, protected: set[OffloadKey]) -> list[tuple[OffloadKey, ChunkStatus]] | None:
        if n == 0:
            return []
        candidates = [k for k in self._evictable if k not in protected]
        if len(candidates) < n:
            return None
        until = {k: self.chunks_of.seconds_until(k) for k in candidates}
        # furthest next use first; among equals the least recently used (lowest LRU rank)
        victims = heapq.nsmallest(n, candidates, key=lambda k: (-until[k], self._ranks[k]))
        out = []
        for key in victims:
            chunk = self.chunks[key]
            assert chunk.ref_cnt == 0
            self._evictable.remove(key)
            del self.chunks[key]
            del self._ranks[key]
            self.chunks_of.forget(key, until[key])
            out.append((key, chunk))
        self._maybe_compact_heap()
        return out


def find(connector):
    """The host tier's cache policy in the scheduler's connector (alone or inside vLLM's
    MultiConnector); None without a tier."""
    for c in getattr(connector, "_connectors", None) or [connector]:
        manager = getattr(getattr(c, "connector_scheduler", None), "manager", None)
        policy = getattr(manager, "_policy", None)
        if policy is not None:
            return policy
    return None


def tier_stats(connector) -> dict | None:
    """The host tier's chunks now (held; held by an in-flight transfer or a running request's load) and
    the policy's evictions by reason; None without a tier."""
    policy = find(connector)
    if policy is None:
        return None
    chunks = getattr(policy, "chunks", {})
    stats = {"chunks": len(chunks), "capacity": policy.cache_capacity,
             "in_use": sum(1 for chunk in chunks.values() if chunk.ref_cnt != 0)}
    if isinstance(policy, NextUseCachePolicy):
        stats["evicted"] = dict(policy.evicted_by_reason)
    if (checks := worker.verification()) is not None:  # --host-verify (the copy worker runs in this process)
        stats["verify"] = checks
    return stats
