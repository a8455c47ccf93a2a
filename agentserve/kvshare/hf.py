"""The HuggingFace-transformers path of KV sharing: prefill to a KV tensor, a cache from a KV tensor,
and generation from an assembled cache. It runs the steps vLLM's connector API cannot (see issue 6)
behind the same KV layout, and is the reference the served path is checked against.

KV layout: [layers, 2 (key, value), kv_heads, tokens, head_dim] (batch of one).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def prefill(model, ids: Sequence[int], start: int = 0, hidden: bool = False):
    """KV of `ids` at positions [start, start+n); with `hidden`, also every layer's input hidden
    states [layers + 1, n, d] (index s = the input of layer s; the last = the final layer's output)."""
    positions = torch.arange(start, start + len(ids))[None]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([list(ids)]), position_ids=positions, use_cache=True,
                    output_hidden_states=hidden)
    kv = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in out.past_key_values.layers])
    if not hidden:
        return kv
    return kv, torch.stack([h[0] for h in out.hidden_states])


def cache_from_kv(kv: torch.Tensor):
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer, (keys, values) in enumerate(kv):
        cache.update(keys[None].contiguous(), values[None].contiguous(), layer)
    return cache


def greedy(model, ids: Sequence[int], max_new: int, kv: torch.Tensor | None = None) -> list[int]:
    """Greedy continuation of `ids`. With `kv` (the KV of all of `ids` but the last token, however
    assembled), only the last token is prefilled on top of it: KVCOMM's reuse path."""
    ids = list(ids)
    if kv is None:
        kv = prefill(model, ids[:-1]) if len(ids) > 1 else None
    if kv is not None and kv.shape[3] != len(ids) - 1:
        raise ValueError(f"the cache holds {kv.shape[3]} tokens, want {len(ids) - 1}")
    cache = cache_from_kv(kv) if kv is not None else None
    out, token, position = [], ids[-1], len(ids) - 1
    with torch.no_grad():
        for _ in range(max_new):
            step = model(input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[position]]),
                         past_key_values=cache, use_cache=True)
            cache = step.past_key_values
            token = int(step.logits[0, -1].argmax())
            out.append(token)
            position += 1
    return out
