"""The RoPE move: shift cached keys to another position, for KV reuse under a different prefix.

RoPE rotates each key by an angle proportional to its position, and rotations compose:
R(d) R(p) = R(p + d). A segment's keys cached at positions [p, p+n) become the keys it would have at
[p+d, p+d+n) by one more rotation by the constant d; values carry no position and stay as they are.
With an empty prefix that is exact in every layer (tests/test_rope_move.py); with a real prefix only
layer 0 stays exact (the anchors of KVCOMM correct the rest).

HF's rotary embedding returns cos/sin already multiplied by `attention_scaling` (not 1 for YaRN and
LongRoPE); cached keys carry that factor once, so the move divides it out, or every move would scale
the keys again. Refused with `UnsupportedRope`: dynamic NTK and LongRoPE (their frequencies depend on
the sequence length, so no constant rotation moves a key) and partial rotary embeddings.
"""

from __future__ import annotations

import torch

COS_SIN_CACHE = 16384  # position deltas whose rotation is kept (a few hundred bytes each)
# rope types whose frequencies change with the sequence length
_LENGTH_DEPENDENT = ("dynamic", "longrope")


class UnsupportedRope(ValueError):
    pass


def rope_parameters(config) -> dict:
    return dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RopeShift:
    """Moves keys of a Llama / Qwen2-architecture model (HF config) by a position delta."""

    def __init__(self, config):
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        rope_type = rope_parameters(config).get("rope_type", rope_parameters(config).get("type", "default"))
        if rope_type in _LENGTH_DEPENDENT:
            raise UnsupportedRope(f"RoPE type {rope_type!r} depends on the sequence length: cached keys cannot be "
                                  "moved by a constant rotation")
        if float(getattr(config, "partial_rotary_factor", 1.0) or 1.0) != 1.0:
            raise UnsupportedRope("partial rotary embeddings are not supported by the RoPE move")
        self.rotary = LlamaRotaryEmbedding(config=config)
        self.attention_scaling = float(self.rotary.attention_scaling)
        self._cache: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]] = {}

    def cos_sin(self, delta: int, *, divide_scaling: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        key = (int(delta), divide_scaling)
        if key not in self._cache:
            if len(self._cache) >= COS_SIN_CACHE:
                self._cache.clear()
            cos, sin = self.rotary(torch.zeros(1), torch.tensor([[int(delta)]]))
            scale = self.attention_scaling if divide_scaling else 1.0
            self._cache[key] = (cos[0, 0] / scale, sin[0, 0] / scale)
        return self._cache[key]

    def move(self, keys: torch.Tensor, delta: int, *, divide_scaling: bool = True) -> torch.Tensor:
        """`keys` [..., head_dim] cached at positions q -> the keys at positions q + delta."""
        if delta == 0:
            return keys
        cos, sin = self.cos_sin(delta, divide_scaling=divide_scaling)
        cos, sin = cos.to(keys.dtype), sin.to(keys.dtype)
        return keys * cos + rotate_half(keys) * sin
