"""DroidSpeak: reuse a sender model's KV in a receiver fine-tuned from the same base, recomputing only
the layers where reuse hurts.

The receiver recomputes one contiguous layer group [s, e): it starts from the sender's hidden state at
layer s's input (the "E cache"), runs its own layers s..e-1 over the prefix, and takes the sender's KV
for every other layer. Which group matters is stable across inputs for a model pair, so it is chosen
once by `profile_groups` on a few prompts: every contiguous group is scored by quality (the next-token
KL to the receiver's own full prefill, lower is better) and cost (layers recomputed), and the Pareto
front is kept; a deployment picks the cheapest group under its quality bound.
Recomputing every layer, [0, layers), is the receiver's full prefill (tests/test_kvshare_hf.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from agentserve.kvshare.hf import cache_from_kv, prefill


def recompute(receiver, sender_kv: torch.Tensor, sender_hidden: torch.Tensor, group: tuple[int, int],
              ids: Sequence[int] | None = None) -> torch.Tensor:
    """The receiver's KV for a prefix `ids` (from position 0): layers in `group` recomputed by the
    receiver from the sender's hidden state at the group's input, the others the sender's. A group
    from layer 0 starts from the receiver's own embeddings of `ids` (an embedding lookup costs nothing,
    and a fine-tune may have changed them)."""
    return _receiver_pass(receiver, sender_kv, sender_hidden, group, ids, ())[0]


def reuse_and_prefill(receiver, sender_kv: torch.Tensor, sender_hidden: torch.Tensor | None,
                      group: tuple[int, int], prefix: Sequence[int], rest: Sequence[int]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """DroidSpeak's receiver prefill in one pass: the prompt `prefix + rest`, where the sender holds the
    prefix. Every layer runs the `rest` tokens; layers in `group` also run the prefix tokens; every
    other layer takes the prefix's KV from the sender. Returns (the KV of all tokens, the logits after
    the last one) - the same as `recompute` then a prefill of `rest`, without the second pass's fixed
    cost."""
    if sender_kv.shape[3] != len(prefix) or not rest:
        raise ValueError(f"want the sender's KV of the {len(prefix)}-token prefix and >= 1 more token")
    return _receiver_pass(receiver, sender_kv, sender_hidden, group, prefix, rest)


def _receiver_pass(receiver, sender_kv: torch.Tensor, sender_hidden: torch.Tensor | None,
                   group: tuple[int, int], prefix: Sequence[int] | None, rest: Sequence[int]
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(KV of prefix + rest, logits after the last token or None without `rest`). The prefix (the
    sender's `b` tokens) runs only in the group's layers; `rest` runs in every layer."""
    from transformers import DynamicCache

    s, e = group
    layers, b = sender_kv.shape[0], sender_kv.shape[3]
    if not 0 <= s <= e <= layers:
        raise ValueError(f"layer group {group} outside [0, {layers}]")
    if s == 0 < e and prefix is None:
        raise ValueError("a group from layer 0 needs the prefix's token ids (the receiver's own embeddings)")
    if 0 < s < e and sender_hidden is None:
        raise ValueError(f"a group from layer {s} needs the sender's hidden state at its input")
    inner, n = receiver.model, b + len(rest)
    empty = sender_kv[:, :, :, :0]
    cache = DynamicCache()
    runs = [s <= i < e or bool(rest) for i in range(layers)]  # layers a forward pass goes through
    for i in range(layers):  # the sender's prefix KV where the layer runs only the rest; else nothing yet
        kv = empty[i] if s <= i < e or not runs[i] else sender_kv[i]
        cache.update(kv[0][None].contiguous(), kv[1][None].contiguous(), i)
    every, tail = torch.arange(n)[None], torch.arange(b, n)[None]
    dtype = inner.embed_tokens.weight.dtype
    # the rest's tokens attend to the whole prefix and causally among themselves
    tail_mask = torch.zeros(len(rest), n, dtype=dtype).masked_fill_(
        torch.arange(n)[None, :] > tail[0][:, None], torch.finfo(dtype).min)[None, None]
    with torch.no_grad():
        hidden = inner.embed_tokens(torch.tensor([list(rest)], dtype=torch.long))
        at = {n: inner.rotary_emb(hidden, every), len(rest): inner.rotary_emb(hidden, tail)}
        for i, layer in enumerate(inner.layers):
            if i == s and s < e:  # the prefix joins: its hidden state at layer s's input
                head = inner.embed_tokens(torch.tensor([list(prefix)])) if s == 0 else sender_hidden[s][None]
                hidden = torch.cat([head, hidden], dim=1)
            if not runs[i]:
                continue
            full = s <= i < e
            out = layer(hidden, attention_mask=None if full else tail_mask, position_ids=every if full else tail,
                        past_key_values=cache, use_cache=True, position_embeddings=at[hidden.shape[1]])
            hidden = out[0] if isinstance(out, tuple) else out
            if i == e - 1 and s < e:  # the prefix leaves: later layers use the sender's KV for it
                hidden = hidden[:, b:]
        logits = receiver.lm_head(inner.norm(hidden[:, -1:]))[0, -1] if rest else None
    kv = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) if runs[i] else sender_kv[i]
                      for i, layer in enumerate(cache.layers)])
    return kv, logits


@dataclass(frozen=True)
class GroupScore:
    group: tuple[int, int]
    recomputed: int  # layers
    kl: float  # mean next-token KL(receiver full prefill || with this group), over the profiling set


def next_token_logprobs(model, ids: Sequence[int], kv: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the token after `ids`, given the KV of all but the last token."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[ids[-1]]]), position_ids=torch.tensor([[len(ids) - 1]]),
                    past_key_values=cache_from_kv(kv), use_cache=True)
    return torch.log_softmax(out.logits[0, -1].double(), dim=-1)


def profile_groups(receiver, sender, prompts: Sequence[Sequence[int]],
                   groups: Callable[[int], list[tuple[int, int]]] | None = None) -> list[GroupScore]:
    """Score every contiguous layer group on `prompts`; returns the Pareto front (fewest layers
    recomputed for its quality), cheapest first."""
    layers = len(receiver.model.layers)
    candidates = groups(layers) if groups else [(s, e) for s in range(layers + 1) for e in range(s, layers + 1)
                                                if s == e == 0 or s < e]
    scores = []
    cached = []
    for ids in prompts:
        ids = list(ids)
        sender_kv, sender_hidden = prefill(sender, ids[:-1], hidden=True)
        reference = next_token_logprobs(receiver, ids, prefill(receiver, ids[:-1]))
        cached.append((ids, sender_kv, sender_hidden, reference))
    for group in candidates:
        kls = []
        for ids, sender_kv, sender_hidden, reference in cached:
            got = next_token_logprobs(receiver, ids, recompute(receiver, sender_kv, sender_hidden, group, ids[:-1]))
            kls.append(float((reference.exp() * (reference - got)).sum()))
        scores.append(GroupScore(group, group[1] - group[0], sum(kls) / len(kls)))
    front, best = [], float("inf")
    for score in sorted(scores, key=lambda g: (g.recomputed, g.kl)):
        if score.kl < best:
            front.append(score)
            best = score.kl
    return front
