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
    key: str = ""  # the content's identity (segment_key), so a pool can be described without its tensors
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
class _Stacked:
    """The pool's anchors as padded tensors (built once per change of the pool): one batched estimate
    instead of a loop over anchors, which copied every anchor's deltas on every call."""

    lengths: torch.Tensor  # [A] tokens of each anchor
    values: torch.Tensor  # [A, L, H, N, D] base values, zero-padded to the longest anchor
    deltas_by_token: torch.Tensor  # [N, A, L * 2 * H * D]
    suffix: torch.Tensor | None  # [A, L, 2, H, M, D], M the shortest suffix; None unless every anchor has one


def _pad(t: torch.Tensor, n: int) -> torch.Tensor:  # pads the token dim (second to last) to n
    return torch.nn.functional.pad(t, (0, 0, 0, n - t.shape[-2]))


@dataclass
class AnchorPool:
    max_anchors: int = MAX_ANCHORS
    min_anchors: int = MIN_ANCHORS
    entropy_gamma: float = ENTROPY_GAMMA
    temperature: float = 1.0
    anchors: list[Anchor] = field(default_factory=list)
    _seq: itertools.count = field(default_factory=itertools.count)
    _stacked: _Stacked | None = None

    def __len__(self) -> int:
        return len(self.anchors)

    def add(self, base: torch.Tensor, real: torch.Tensor, suffix_base: torch.Tensor | None = None,
            suffix_real: torch.Tensor | None = None, key: str = "") -> Anchor:
        """Record an observed content: its base and its real KV (both position-0 frame)."""
        if base.shape != real.shape:
            raise ValueError(f"base {tuple(base.shape)} and real {tuple(real.shape)} KV differ in shape")
        suffix = None if suffix_base is None else suffix_real - suffix_base
        anchor = Anchor(base, real - base, suffix, key, next(self._seq))
        if len(self.anchors) >= self.max_anchors:
            oldest = sorted(self.anchors, key=lambda a: a.seq)[:EVICT_AMONG_OLDEST]
            self.anchors.remove(min(oldest, key=lambda a: (a.uses, a.seq)))
        self.anchors.append(anchor)
        self._stacked = None
        return anchor

    def clear(self) -> None:
        self.anchors.clear()
        self._stacked = None

    def _stack(self) -> _Stacked:
        if self._stacked is None:
            n = max(a.tokens for a in self.anchors)
            suffix = None
            if all(a.suffix_delta is not None for a in self.anchors):
                m = min(a.suffix_delta.shape[3] for a in self.anchors)
                suffix = torch.stack([a.suffix_delta[:, :, :, :m] for a in self.anchors])
            deltas = torch.stack([_pad(a.delta, n) for a in self.anchors])  # [A, L, 2, H, N, D]
            by_token = deltas.permute(4, 0, 1, 2, 3, 5).reshape(n, len(self.anchors), -1).contiguous()
            self._stacked = _Stacked(torch.tensor([a.tokens for a in self.anchors]),
                                     torch.stack([_pad(a.base[:, 1], n) for a in self.anchors]), by_token, suffix)
        return self._stacked

    def described(self) -> list[tuple[str, int]]:
        """(content key, tokens) of each anchor: what `may_estimate` needs."""
        return [(a.key, a.tokens) for a in self.anchors]

    def estimate(self, base: torch.Tensor) -> Correction | None:
        """The correction for a new content's base KV, or None: prefill it fully (and add it)."""
        n = base.shape[3]
        for a in self.anchors:  # the same content: its real KV is known, whatever the pool holds
            if a.tokens == n and torch.equal(a.base, base):
                a.uses += 1
                return Correction(a.delta, a.suffix_delta, 1, 0.0)
        if not self.anchors:
            return None
        st = self._stack()
        candidate = st.lengths >= n  # only anchors at least as long as the content
        count = int(candidate.sum())
        if count < self.min_anchors:
            return None
        diff = st.values[:, :, :, :n] - base[None, :, 1]  # [A, L, H, n, D]
        dist = diff.pow(2).sum(dim=(1, 2, 4)).sqrt()  # per anchor and token, over layers, heads, channels
        masked = torch.where(candidate[:, None], -dist / self.temperature, float("-inf"))
        weights = torch.softmax(masked, dim=0)  # [A, n], 0 for non-candidates
        entropy = float(-(weights * torch.log2(weights.clamp_min(1e-30))).sum(dim=0).mean())
        if entropy > self.entropy_gamma * math.log2(count):
            return None
        # token-major deltas [N, A, L*2*H*D]: the weighted sum is one batched matrix product
        mixed = torch.bmm(weights.T[:, None, :], st.deltas_by_token[:n])[:, 0]  # [n, L*2*H*D]
        delta = mixed.view(n, *base.shape[:3], base.shape[4]).permute(1, 2, 3, 0, 4)
        suffix = None
        if st.suffix is not None:
            # per layer/head/channel: distance of values averaged over the tokens
            d = torch.where(candidate[:, None, None, None], -diff.abs().mean(dim=3) / self.temperature,
                            float("-inf"))
            w = torch.softmax(d, dim=0)  # [A, L, H, D]
            suffix = (w[:, :, None, :, None, :] * st.suffix).sum(dim=0)
        for a, w_a in zip(self.anchors, weights.mean(dim=1)):
            if float(w_a) > 1.0 / count:
                a.uses += 1
        return Correction(delta, suffix, count, entropy)


def may_estimate(anchors: list[tuple[str, int]], key: str, tokens: int, min_anchors: int = MIN_ANCHORS) -> bool:
    """Whether a pool of `anchors` ((content key, tokens)) may estimate a content (`key`, `tokens`)
    before its values are looked at: it was seen (an exact anchor), or enough anchors are long enough.
    `estimate` may still refuse on the values (weights too flat)."""
    return (any(k == key and n == tokens for k, n in anchors)
            or sum(n >= tokens for _, n in anchors) >= min_anchors)
