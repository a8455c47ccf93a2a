"""KVCOMM's anchor pool: offset correction for a shared segment reused under another prefix.

A segment's standalone KV (its *base*, computed from position 0) moved to where a consumer needs it
is exact in layer 0 only: deeper layers of the real KV depend on what precedes the segment. An
*anchor* remembers, for one observed content of a placeholder in one consumer's template, the base
and the deviation `real - base` for the placeholder's tokens and for the template segment after it
(per layer, head, token, channel). A new content's deviation is estimated as a softmax-weighted sum
of anchors' deviations, weights from the distance between its base values and each anchor's
(temperature 1 in KVCOMM; a parameter here, as distances scale with the model): per token for the
placeholder, per layer/head/channel for the following segment. Only anchors at least as long as the
new content qualify. A content seen before (an anchor with the same base) gets that anchor's
deviation exactly: its real KV is known.

Reuse is refused (the caller prefills fully and records the result as a new anchor) with fewer than
`MIN_ANCHORS` candidates, or when the weights are too flat to trust: mean entropy above
`ENTROPY_GAMMA * log2(candidates)`. The pool holds `MAX_ANCHORS` per placeholder and evicts the
least used of its `EVICT_AMONG_OLDEST` oldest anchors.

Deviations of keys are stored in the position-0 frame (rotated back by the position they were
observed at), so an anchor recorded at one position corrects a segment placed at another; the
reference implementation stored them at the observed position, which is wrong as soon as the
placeholder moves.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch

# KVCOMM's published settings.
MIN_ANCHORS = 2
ENTROPY_GAMMA = 0.3
MAX_ANCHORS = 20
EVICT_AMONG_OLDEST = 5


@dataclass(eq=False)  # identity: the pool removes anchors by identity, never by comparing tensors
class Anchor:
    base: torch.Tensor  # [L, 2, H, n, D] the content's standalone KV, position-0 frame
    delta: torch.Tensor  # [L, 2, H, n, D] real - base at its observed place, keys in the position-0 frame
    suffix_delta: torch.Tensor | None  # [L, 2, H, m, D] the same for the template segment after it
    seq: int = 0
    uses: int = 0

    @property
    def tokens(self) -> int:
        return self.base.shape[3]


@dataclass
class Correction:
    delta: torch.Tensor  # for the placeholder tokens, position-0 frame
    suffix_delta: torch.Tensor | None
    anchors: int
    entropy_bits: float


@dataclass
class AnchorPool:
    max_anchors: int = MAX_ANCHORS
    min_anchors: int = MIN_ANCHORS
    entropy_gamma: float = ENTROPY_GAMMA
    temperature: float = 1.0
    anchors: list[Anchor] = field(default_factory=list)
    _seq: itertools.count = field(default_factory=itertools.count)

    def __len__(self) -> int:
        return len(self.anchors)

    def add(self, base: torch.Tensor, real: torch.Tensor, suffix_base: torch.Tensor | None = None,
            suffix_real: torch.Tensor | None = None) -> Anchor:
        """Record an observed content: its base and its real KV (both position-0 frame)."""
        if base.shape != real.shape:
            raise ValueError(f"base {tuple(base.shape)} and real {tuple(real.shape)} KV differ in shape")
        suffix = None if suffix_base is None else suffix_real - suffix_base
        anchor = Anchor(base, real - base, suffix, next(self._seq))
        if len(self.anchors) >= self.max_anchors:
            oldest = sorted(self.anchors, key=lambda a: a.seq)[:EVICT_AMONG_OLDEST]
            self.anchors.remove(min(oldest, key=lambda a: (a.uses, a.seq)))
        self.anchors.append(anchor)
        return anchor

    def estimate(self, base: torch.Tensor) -> Correction | None:
        """The correction for a new content's base KV, or None: prefill it fully (and add it)."""
        n = base.shape[3]
        for a in self.anchors:  # the same content: its real KV is known, whatever the pool holds
            if a.tokens == n and torch.equal(a.base, base):
                a.uses += 1
                return Correction(a.delta, a.suffix_delta, 1, 0.0)
        pool = [a for a in self.anchors if a.tokens >= n]
        if len(pool) < self.min_anchors:
            return None
        values = base[:, 1]  # [L, H, n, D]
        # distance per anchor and token, over layers, heads and channels
        dist = torch.stack([(a.base[:, 1, :, :n] - values).pow(2).sum(dim=(0, 1, 3)).sqrt() for a in pool])
        weights = torch.softmax(-dist / self.temperature, dim=0)  # [A, n]
        entropy = float(-(weights * torch.log2(weights.clamp_min(1e-30))).sum(dim=0).mean())
        if entropy > self.entropy_gamma * math.log2(len(pool)):
            return None
        deltas = torch.stack([a.delta[:, :, :, :n] for a in pool])  # [A, L, 2, H, n, D]
        delta = (weights[:, None, None, None, :, None] * deltas).sum(dim=0)
        suffix = None
        if all(a.suffix_delta is not None for a in pool):
            # per layer/head/channel: distance of values averaged over the tokens
            d = torch.stack([(a.base[:, 1, :, :n] - values).abs().mean(dim=2) for a in pool])  # [A, L, H, D]
            w = torch.softmax(-d / self.temperature, dim=0)
            m = min(a.suffix_delta.shape[3] for a in pool)
            sd = torch.stack([a.suffix_delta[:, :, :, :m] for a in pool])  # [A, L, 2, H, m, D]
            suffix = (w[:, :, None, :, None, :] * sd).sum(dim=0)
        for a, w_a in zip(pool, weights.mean(dim=1)):
            if float(w_a) > 1.0 / len(pool):
                a.uses += 1
        return Correction(delta, suffix, len(pool), entropy)
