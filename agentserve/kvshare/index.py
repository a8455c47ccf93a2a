"""What the KV-sharing planner knows, without its KV: the scheduler process's copy.

The planner and its KV (segment bases, anchors) live in the model's worker process, where the paged
cache is (connector.py); the scheduler process must still decide, when vLLM asks, how many prompt
tokens a request will get from the planner. `ShareIndex` answers `decide`'s questions
(planner.Knowledge) from the worker's last `ShareKnowledge`: segment keys, template texts and each
anchor pool's (content, length) list, a few KB, sent only when they changed.

The copy may lag the worker by a step. A decision made on it is a claim the worker checks when it
builds the plan; when the worker cannot build it (a base evicted meanwhile, or the anchor pool refuses
on the values) it reports the claimed blocks as failed loads and vLLM recomputes them
(`kv_load_failure_policy="recompute"`): a wasted step, never wrong KV.
"""

from __future__ import annotations

import msgspec

from agentserve.kvshare.segments import scoped, segment_key

SEP = "\0"


def pool_key(scope: str, template: str, slot: int | None = None) -> str:
    return SEP.join([scope, template] + ([] if slot is None else [str(slot)]))


class ShareKnowledge(msgspec.Struct, frozen=True):
    """The planner's tensor-free state, as the worker reports it."""

    version: int = 0
    segments: frozenset[str] = frozenset()  # segment keys with a base in the store
    prefixes: dict[str, list[int]] = {}  # pool_key(scope, template) -> text before the first segment
    between: dict[str, list[int]] = {}  # pool_key(scope, template, slot) -> text after segment `slot`
    anchors: dict[str, list[tuple[str, int]]] = {}  # pool_key(scope, template, slot) -> (content, tokens)
    stats: dict = {}


def describe(planner, version: int) -> ShareKnowledge:
    """`planner`'s (a SharePlanner's) knowledge now."""
    return ShareKnowledge(
        version=version, segments=frozenset(planner.store.keys()),
        prefixes={pool_key(*k): tokens for k, (tokens, _) in planner.prefix.items()},
        between={pool_key(*k): list(t) for k, t in planner.between.items()},
        anchors={pool_key(*k): pool.described() for k, pool in planner.pools.items()},
        stats=planner.stats())


class ShareIndex:
    """planner.Knowledge over the worker's last report."""

    def __init__(self, model: str, correction: str):
        self.model = model
        self.correction = correction
        self.known = ShareKnowledge()

    def update(self, known: ShareKnowledge) -> None:
        if known.version > self.known.version:
            self.known = known

    def content_key(self, scope: str, tokens: list[int]) -> str:
        return segment_key(scoped(self.model, scope), tokens)

    def has_segment(self, scope: str, tokens: list[int]) -> bool:
        return self.content_key(scope, tokens) in self.known.segments

    def prefix_tokens(self, scope: str, template: str) -> list[int] | None:
        return self.known.prefixes.get(pool_key(scope, template))

    def between_tokens(self, scope: str, template: str, slot: int) -> list[int] | None:
        return self.known.between.get(pool_key(scope, template, slot))

    def anchors(self, scope: str, template: str, slot: int) -> list[tuple[str, int]]:
        return self.known.anchors.get(pool_key(scope, template, slot), [])
