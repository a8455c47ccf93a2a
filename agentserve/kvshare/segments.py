"""The segment KV store: the KV of shared segments (another agent's output, the common question),
keyed by model and token content, kept in the position-0 frame so any consumer can place it at its
own position with one RoPE move. Bounded by bytes, least recently used out first.

KV layout everywhere in kvshare: one tensor [layers, 2 (key, value), kv_heads, tokens, head_dim].
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import torch

from agentserve.kvshare.rope import RopeShift


def scoped(model: str, scope: str) -> str:
    """The store's namespace of one model and one scope (tenant): segments never cross either."""
    return f"{model}\0{scope}"


def segment_key(model: str, tokens: Sequence[int]) -> str:
    digest = hashlib.sha256(model.encode() + b"\0")
    digest.update(torch.tensor(list(tokens), dtype=torch.int64).numpy().tobytes())
    return digest.hexdigest()


def place(kv: torch.Tensor, position: int, shift: RopeShift) -> torch.Tensor:
    """A segment's KV (position-0 frame) as it sits at `position`: keys rotated, values as they are."""
    out = kv.clone()
    out[:, 0] = shift.move(kv[:, 0], position)
    return out


def to_frame_zero(kv: torch.Tensor, position: int, shift: RopeShift) -> torch.Tensor:
    return place(kv, -position, shift)


class SegmentStore:
    def __init__(self, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError("max_bytes must be > 0")
        self.max_bytes = max_bytes
        self.bytes = 0
        self._kv: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._kv)

    def put(self, model: str, tokens: Sequence[int], kv: torch.Tensor) -> bool:
        """Store a segment's position-0 KV; False if it alone exceeds the budget (nothing is evicted)."""
        if kv.dim() != 5 or kv.shape[1] != 2 or kv.shape[3] != len(tokens):
            raise ValueError(f"want KV [layers, 2, heads, {len(tokens)} tokens, head_dim], got {tuple(kv.shape)}")
        size = kv.numel() * kv.element_size()
        if size > self.max_bytes:
            return False
        key = segment_key(model, tokens)
        if key in self._kv:
            self.bytes -= self._kv.pop(key).numel() * kv.element_size()
        while self.bytes + size > self.max_bytes:
            _, old = self._kv.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
        self._kv[key] = kv
        self.bytes += size
        return True

    def __contains__(self, key: str) -> bool:
        return key in self._kv

    def keys(self) -> list[str]:
        return list(self._kv)

    def get(self, model: str, tokens: Sequence[int]) -> torch.Tensor | None:
        key = segment_key(model, tokens)
        kv = self._kv.get(key)
        if kv is not None:
            self._kv.move_to_end(key)
        return kv
