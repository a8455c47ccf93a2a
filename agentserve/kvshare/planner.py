"""The KV-sharing planner of the served path: which tokens of a consumer prompt get reused KV, and
that KV. Policy only: tensors in, tensors out, no engine (the vLLM connector, connector.py, is the
adapter that moves KV between the paged cache and this object).

A request that shares KV says so in `kv_transfer_params["agentserve_share"]` (`ShareSpec`):
- a *produce* request's whole prompt is one shared segment (another agent's output, the common
  question); its KV, computed from position 0, becomes the segment's *base* in the segment store.
- a *consumer* request names its template (the agent's role: anchors are learned per template) and
  the token ranges of the shared segments in its prompt.

For a consumer, everything up to the end of its last shared segment is planned: the template text
before the first segment (its real KV from an earlier prompt of this template: exact, nothing precedes
it), each segment (base + the anchor pool's offset estimate, RoPE-moved to its place), and the template
text between segments (its own base, produced like a segment, + the offset estimate KVCOMM makes for
the segment after a placeholder). The engine computes the rest of the prompt (the question after the
last segment) on top. When anything is missing (a base, an earlier prompt of this template, or the
anchor pool refuses: too few anchors, weights too flat) the consumer is prefilled in full and, if
every base was there, *recorded*: its real KV becomes a new anchor for every placeholder. The
trade-off is KVCOMM's: the first prompts of a template pay a full prefill so that later ones can skip it.
With `correction="none"` the bases are only moved (the naive reuse KVCOMM improves on): one recorded
prompt per template, no anchors, and no estimate to pay for; which is better depends on the model and
the content (docs/benchmarks.md measures both).

The text between segments gets a base of its own, as in KVCOMM, rather than an earlier prompt's real
KV of the same text: that KV was computed over another prompt's segments and carries their content.

The decision comes in two steps, so that it can be split across processes: `decide` needs only what
the planner knows about tokens (`Knowledge`: which segments have a base, the templates' text, how many
anchors of which length each pool has) and says whether a plan will be tried; building the plan then
needs the KV, and the anchor pool may still refuse on the values (weights too flat). In the served
path the scheduler process decides on a tensor-free copy of the knowledge (`ShareIndex`) and the
model's worker, which holds the planner and its KV, builds (connector.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Annotated, Protocol

import msgspec
import torch

from agentserve.kvshare.anchors import AnchorPool, may_estimate
from agentserve.kvshare.rope import RopeShift
from agentserve.kvshare.segments import SegmentStore, place, scoped, segment_key, to_frame_zero

PARAMS_KEY = "agentserve_share"  # the key in kv_transfer_params
MAX_SEGMENTS = 64  # segments per prompt: a bound on work and on the anchor pools a template may create


class ShareSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """What a request shares. `segments`: (start, length) token ranges of the prompt, in order."""

    template: Annotated[str, msgspec.Meta(max_length=256)] = ""
    scope: Annotated[str, msgspec.Meta(max_length=256)] = ""  # the tenant: segments and anchors never cross scopes
    segments: Annotated[list[tuple[int, int]], msgspec.Meta(max_length=MAX_SEGMENTS)] = []
    produce: bool = False

    def check(self, prompt_len: int) -> None:
        """Raises ValueError unless the spec fits a prompt of `prompt_len` tokens."""
        if self.produce:
            if self.segments:
                raise ValueError("a produce request is one segment: it takes no segments")
            return
        if not self.template:
            raise ValueError("a consumer request needs its template")
        at = 0
        for start, length in self.segments:
            if length <= 0 or start < at:
                raise ValueError("segments must be non-empty, in order and not overlap")
            at = start + length
        if at >= prompt_len:
            raise ValueError("the prompt must go on after its last shared segment (the engine computes that part)")

    @property
    def end(self) -> int:
        """The end of the last shared segment: what a consumer's plan covers."""
        return self.segments[-1][0] + self.segments[-1][1]


def decode_spec(params: dict | None) -> ShareSpec | None:
    raw = (params or {}).get(PARAMS_KEY)
    return None if raw is None else msgspec.convert(raw, ShareSpec)


@dataclass
class Plan:
    start: int  # the first token whose KV `kv` holds
    kv: torch.Tensor  # [layers, 2, kv_heads, tokens, head_dim]: tokens [start, start + kv.shape[3])


@dataclass
class Decision:
    plan: Plan | None  # None: prefill it (what is locally cached, and the rest computed)
    record: bool  # after its full prefill, its real KV becomes anchors
    reason: str  # reused | cached | no_base | new_template | template_changed | anchors_refused | produce


NO_TEXT = torch.zeros(0)  # no template text between two segments
CORRECTIONS = ("anchors", "none")  # KVCOMM's offset estimate, or the naive RoPE move alone
REUSE = "reuse"  # `decide`: a plan will be built
RECORDING = frozenset({"new_template", "template_changed", "anchors_refused"})  # prefilled, then recorded


class Knowledge(Protocol):
    """What `decide` reads: tokens and counts, never KV."""

    correction: str

    def has_segment(self, scope: str, tokens: list[int]) -> bool: ...

    def prefix_tokens(self, scope: str, template: str) -> list[int] | None: ...

    def between_tokens(self, scope: str, template: str, slot: int) -> list[int] | None: ...

    def anchors(self, scope: str, template: str, slot: int) -> list[tuple[str, int]]: ...

    def content_key(self, scope: str, tokens: list[int]) -> str: ...


def text_after(spec: ShareSpec, tokens: list[int], slot: int) -> list[int]:
    """The template text between segment `slot` and the next (none after the last)."""
    start, n = spec.segments[slot]
    stop = spec.segments[slot + 1][0] if slot + 1 < len(spec.segments) else start + n
    return tokens[start + n:stop]


def decide(spec: ShareSpec, tokens: list[int], num_computed: int, knows: Knowledge) -> str:
    """`REUSE` when a plan for `tokens` [num_computed, spec.end) is worth building, else why not
    (cached | no_base | new_template | template_changed | anchors_refused; the last three record)."""
    if not spec.segments or num_computed >= spec.end:
        return "cached"
    texts = [text_after(spec, tokens, slot) for slot in range(len(spec.segments) - 1)]
    if not all(knows.has_segment(spec.scope, tokens[s:s + n]) for s, n in spec.segments) or not all(
            knows.has_segment(spec.scope, text) for text in texts if text):
        return "no_base"
    prefix = knows.prefix_tokens(spec.scope, spec.template)
    if prefix is None:
        return "new_template"
    if prefix != tokens[:spec.segments[0][0]] or any(
            knows.between_tokens(spec.scope, spec.template, slot) != text for slot, text in enumerate(texts)):
        return "template_changed"
    if knows.correction == "anchors" and not all(
            may_estimate(knows.anchors(spec.scope, spec.template, slot),
                         knows.content_key(spec.scope, tokens[s:s + n]), n)
            for slot, (s, n) in enumerate(spec.segments)):
        return "anchors_refused"
    return REUSE


class SharePlanner:
    def __init__(self, model: str, shift: RopeShift, store: SegmentStore, correction: str = "anchors", **pool_args):
        if correction not in CORRECTIONS:
            raise ValueError(f"correction must be one of {CORRECTIONS}, got {correction!r}")
        self.correction = correction
        self.model = model
        self.shift = shift
        self.store = store
        self.pool_args = pool_args
        self.pools: dict[tuple[str, str, int], AnchorPool] = {}
        # per template: the tokens and real KV of the text before the first segment, and the tokens of
        # the text after each segment (what its anchors were recorded with)
        self.prefix: dict[tuple[str, str], tuple[list[int], torch.Tensor]] = {}
        self.between: dict[tuple[str, str, int], list[int]] = {}
        self.counts: Counter[str] = Counter()
        self.tokens_reused = 0

    def plan(self, spec: ShareSpec, tokens: list[int], num_computed: int) -> Decision:
        """Reused KV for `tokens` [num_computed, end of the last segment), or why not. A produce
        request has nothing to plan (and is counted when its KV is saved)."""
        spec.check(len(tokens))
        if spec.produce:
            return Decision(None, False, "produce")
        decision = self._plan(spec, tokens, num_computed)
        self.counts[decision.reason] += 1
        if decision.plan is not None:
            self.tokens_reused += decision.plan.kv.shape[3]
        return decision

    def _plan(self, spec: ShareSpec, tokens: list[int], num_computed: int) -> Decision:
        reason = decide(spec, tokens, num_computed, self)
        if reason != REUSE:
            return Decision(None, reason in RECORDING, reason)
        bases, texts = self._bases(spec, tokens), self._text_bases(spec, tokens)
        known = self.prefix[(spec.scope, spec.template)]
        pieces = [known[1]]
        for slot, ((start, n), base) in enumerate(zip(spec.segments, bases)):
            text = texts[slot] if slot < len(texts) else NO_TEXT
            delta = text_delta = 0.0  # correction "none": the bases only moved
            if self.correction == "anchors":
                fix = self.pools.setdefault((spec.scope, spec.template, slot),
                                            AnchorPool(**self.pool_args)).estimate(base)
                if fix is None or text.numel() and (fix.suffix_delta is None
                                                    or fix.suffix_delta.shape[3] < text.shape[3]):
                    return Decision(None, True, "anchors_refused")
                delta = fix.delta
                text_delta = fix.suffix_delta[:, :, :, :text.shape[3]] if text.numel() else 0.0
            pieces.append(place(base + delta, start, self.shift))
            if text.numel():
                pieces.append(place(text + text_delta, start + n, self.shift))
        kv = torch.cat(pieces, dim=3)
        return Decision(Plan(num_computed, kv[:, :, :, num_computed:spec.end].contiguous()), False, "reused")

    def saved(self, spec: ShareSpec, tokens: list[int], kv: torch.Tensor) -> None:
        """The real KV [layers, 2, heads, n, dim] of a prompt's first n tokens, once computed: a produce
        request's becomes its segment's base, a recorded consumer's becomes anchors."""
        if spec.produce:
            self.store.put(self._store_key(spec), tokens[:kv.shape[3]], kv)
            self.counts["produced"] += 1
            return
        if kv.shape[3] < spec.end:
            raise ValueError(f"recording needs the KV of {spec.end} tokens, got {kv.shape[3]}")
        bases, texts = self._bases(spec, tokens), self._text_bases(spec, tokens)
        if any(b is None for b in bases + texts):
            return  # a base was evicted meanwhile: nothing to measure the deviation against
        first = spec.segments[0][0]
        self.prefix[(spec.scope, spec.template)] = (tokens[:first], kv[:, :, :, :first].clone())
        for slot, ((start, n), base) in enumerate(zip(spec.segments, bases)):
            text = text_after(spec, tokens, slot) if slot < len(spec.segments) - 1 else []
            real = to_frame_zero(kv[:, :, :, start:start + n], start, self.shift)
            after = to_frame_zero(kv[:, :, :, start + n:start + n + len(text)], start + n, self.shift)
            pool = self.pools.setdefault((spec.scope, spec.template, slot), AnchorPool(**self.pool_args))
            key = self.content_key(spec.scope, tokens[start:start + n])
            if (self.between.get((spec.scope, spec.template, slot)) or []) != text:
                pool.clear()  # the template changed around this slot: its anchors describe another text
            self.between[(spec.scope, spec.template, slot)] = text
            text_base = texts[slot] if slot < len(texts) else NO_TEXT
            pool.add(base, real, text_base if text_base.numel() else torch.zeros_like(after), after, key=key)
        self.counts["recorded"] += 1

    def _store_key(self, spec: ShareSpec) -> str:
        return scoped(self.model, spec.scope)

    def _bases(self, spec: ShareSpec, tokens: list[int]) -> list[torch.Tensor | None]:
        return [self.store.get(self._store_key(spec), tokens[s:s + n]) for s, n in spec.segments]

    def _text_bases(self, spec: ShareSpec, tokens: list[int]) -> list[torch.Tensor | None]:
        """Bases of the template text between consecutive segments (no text between two: NO_TEXT)."""
        texts = [text_after(spec, tokens, slot) for slot in range(len(spec.segments) - 1)]
        return [self.store.get(self._store_key(spec), text) if text else NO_TEXT for text in texts]

    # ---- Knowledge (what `decide` reads) ----------------------------------------------------------
    def has_segment(self, scope: str, tokens: list[int]) -> bool:
        return self.content_key(scope, tokens) in self.store

    def prefix_tokens(self, scope: str, template: str) -> list[int] | None:
        known = self.prefix.get((scope, template))
        return None if known is None else known[0]

    def between_tokens(self, scope: str, template: str, slot: int) -> list[int] | None:
        return self.between.get((scope, template, slot))

    def anchors(self, scope: str, template: str, slot: int) -> list[tuple[str, int]]:
        pool = self.pools.get((scope, template, slot))
        return pool.described() if pool is not None else []

    def content_key(self, scope: str, tokens: list[int]) -> str:
        return segment_key(scoped(self.model, scope), tokens)

    def stats(self) -> dict:
        return {"decisions": dict(self.counts), "tokens_reused": self.tokens_reused, "segments": len(self.store),
                "segment_bytes": self.store.bytes, "templates": len(self.prefix),
                "anchors": sum(len(p) for p in self.pools.values())}
