"""KVCOMM reuse of shared segments for one consumer prompt, on the HF path.

A prompt is a list of parts: `Text` (the consumer's own template) and `Shared` (content another agent
produced, the same tokens in every consumer). Each shared segment's standalone KV (its *base*) is in the
segment store, computed once when it was produced. For a consumer:

- `full`: prefill every token (the reference; records anchors for the template's placeholders).
- `naive`: every segment's base moved to its position (RoPE move only), then the template tokens.
- `anchors` (KVCOMM): base + the anchor pool's offset estimate, moved to its position; when any
  placeholder's pool refuses (too few anchors, weights too flat), the whole prompt is prefilled fully
  and its real KV becomes a new anchor for every placeholder.

Template tokens are always computed, in one forward pass over the reused segments with an attention mask
that lets each token see exactly what precedes it in the prompt: the KV cache holds the segments first
and the template after them, but attention does not care about cache order (positions are in the keys).
This differs from KVCOMM, which reuses the template's own KV with a second offset estimate; the template
is a few tokens per placeholder here, so computing it is cheap and exact given the segments.

A placeholder is identified by (template, slot): the consumer's template name and the index of the
shared part among the prompt's shared parts. Timings are split into preparation (store lookups, offset
estimates, RoPE moves) and the forward pass to the first token.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from agentserve.kvshare.anchors import AnchorPool
from agentserve.kvshare.hf import cache_from_kv, prefill
from agentserve.kvshare.parts import Part, Shared, flatten
from agentserve.kvshare.rope import RopeShift
from agentserve.kvshare.segments import SegmentStore, place, to_frame_zero

MODES = ("full", "naive", "anchors")


@dataclass
class Prefilled:
    kv: torch.Tensor  # [L, 2, H, n, D] the prompt's KV (segments first when reused; see the module doc)
    logits: torch.Tensor  # [vocab] after the last prompt token
    reused: bool  # shared segments' KV reused (False: full prefill)
    prepare_s: float
    forward_s: float

    @property
    def ttft_s(self) -> float:
        return self.prepare_s + self.forward_s


def forward_over(model, ids: Sequence[int], positions: Sequence[int], past: torch.Tensor | None,
                 past_positions: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill `ids` at `positions` on top of a KV `past` whose tokens sit at `past_positions` (any
    order); each new token attends to past and new tokens at positions <= its own. Returns (the KV of
    past and new tokens, past first; the logits after the last new token)."""
    inner = model.model
    pos = torch.tensor(list(positions))
    seen = torch.cat([torch.tensor(list(past_positions), dtype=torch.long), pos])
    allowed = seen[None, :] <= pos[:, None]
    dtype = inner.embed_tokens.weight.dtype
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]
    cache = cache_from_kv(past) if past is not None else _empty_cache()
    with torch.no_grad():
        hidden = inner.embed_tokens(torch.tensor([list(ids)]))
        embeddings = inner.rotary_emb(hidden, pos[None])
        for layer in inner.layers:
            hidden = layer(hidden, attention_mask=mask, position_ids=pos[None], past_key_values=cache,
                           use_cache=True, position_embeddings=embeddings)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        logits = model.lm_head(inner.norm(hidden[:, -1:]))[0, -1]
    kv = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])
    return kv, logits


def _empty_cache():
    from transformers import DynamicCache

    return DynamicCache()


class SharedPrefill:
    """Prefills consumer prompts reusing shared segments' KV (see the module doc)."""

    def __init__(self, model, model_name: str, store: SegmentStore, *, temperature: float = 1.0,
                 entropy_gamma: float | None = None, max_anchors: int | None = None):
        self.model = model
        self.model_name = model_name
        self.store = store
        self.shift = RopeShift(model.config)
        self.pool_args = {k: v for k, v in (("temperature", temperature), ("entropy_gamma", entropy_gamma),
                                             ("max_anchors", max_anchors)) if v is not None}
        self.pools: dict[tuple[str, int], AnchorPool] = {}

    def produce(self, ids: Sequence[int]) -> torch.Tensor:
        """The base KV of a shared segment (position-0 frame), computed once and kept in the store."""
        base = self.store.get(self.model_name, ids)
        if base is None:
            base = prefill(self.model, ids)
            self.store.put(self.model_name, ids, base)
        return base

    def __call__(self, parts: Sequence[Part], template: str, mode: str = "anchors") -> Prefilled:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not parts or isinstance(parts[-1], Shared):
            raise ValueError("a consumer prompt must end with a template part (the question)")
        start = time.perf_counter()
        offsets, at = [], 0
        for part in parts:
            offsets.append(at)
            at += len(part.ids)
        shared = [(i, part) for i, part in enumerate(parts) if isinstance(part, Shared)]
        if mode == "full" or not shared:
            return self._full(parts, template, shared, offsets, start, record=False)
        bases = [self.produce(part.ids) for _, part in shared]
        deltas = []
        if mode == "anchors":
            for slot, base in enumerate(bases):
                fix = self.pools.setdefault((template, slot), AnchorPool(**self.pool_args)).estimate(base)
                if fix is None:
                    return self._full(parts, template, shared, offsets, start, record=True)
                deltas.append(fix.delta)
        segments = torch.cat([place(base + deltas[slot] if deltas else base, offsets[i], self.shift)
                              for slot, ((i, _), base) in enumerate(zip(shared, bases))], dim=3)
        seg_positions = [p for i, part in shared for p in range(offsets[i], offsets[i] + len(part.ids))]
        text = [(t, offsets[i] + j) for i, part in enumerate(parts) if not isinstance(part, Shared)
                for j, t in enumerate(part.ids)]
        prepared = time.perf_counter()
        kv, logits = forward_over(self.model, [t for t, _ in text], [p for _, p in text], segments, seg_positions)
        return Prefilled(kv, logits, True, prepared - start, time.perf_counter() - prepared)

    def _full(self, parts, template, shared, offsets, start, record: bool) -> Prefilled:
        """Prefill every token; with `record`, the real KV of each placeholder becomes an anchor."""
        ids = flatten(parts)
        prepared = time.perf_counter()
        kv, logits = forward_over(self.model, ids, range(len(ids)), None, [])
        done = time.perf_counter()
        for slot, (i, part) in enumerate(shared if record else []):
            n, p = len(part.ids), offsets[i]
            pool = self.pools.setdefault((template, slot), AnchorPool(**self.pool_args))
            pool.add(self.produce(part.ids), to_frame_zero(kv[:, :, :, p:p + n], p, self.shift))
        return Prefilled(kv, logits, False, prepared - start, done - prepared)


def decode(model, kv: torch.Tensor, first: int, position: int, n: int, top1: list[float] | None = None) -> list[int]:
    """Greedy tokens after a prefilled prompt: `first` (already chosen) at `position`, then n - 1 more.
    With `top1`, the probability of each greedy token after the first is appended to it."""
    cache, out, token = cache_from_kv(kv), [first], first
    with torch.no_grad():
        for step in range(n - 1):
            logits = model(input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[position + step]]),
                           past_key_values=cache, use_cache=True).logits
            token = int(logits[0, -1].argmax())
            if top1 is not None:
                top1.append(float(torch.softmax(logits[0, -1].double(), -1).max()))
            out.append(token)
    return out
