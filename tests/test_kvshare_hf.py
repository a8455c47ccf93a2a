"""KV-sharing invariants 5-6 (docs/kvshare.md) on the HF path: generation from an exact all-but-last-token cache is
plain generation (naive rotate-only reuse is not); DroidSpeak recomputing every layer is full prefill."""

from __future__ import annotations

import pytest
import torch

from agentserve.kvshare.droidspeak import next_token_logprobs, profile_groups, recompute
from agentserve.kvshare.hf import greedy, prefill
from agentserve.kvshare.rope import RopeShift
from agentserve.kvshare.segments import place

VOCAB = 128


def tiny(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                        max_position_embeddings=512)).eval()


def tokens(seed: int, n: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def model():
    return tiny()


def test_exact_cache_gives_plain_greedy_tokens_and_naive_reuse_does_not(model):
    prefix, content, question = tokens(1, 30), tokens(2, 20), tokens(3, 5)
    ids = prefix + content + question
    with torch.no_grad():
        plain = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    assert greedy(model, ids, 12, kv=prefill(model, ids[:-1])) == plain
    # naive reuse: the content's standalone KV moved behind the prefix, no correction
    naive = torch.cat([prefill(model, prefix), place(prefill(model, content), len(prefix), RopeShift(model.config)),
                       prefill(model, ids[:-1])[:, :, :, len(prefix) + len(content):]], dim=3)
    exact = next_token_logprobs(model, ids, prefill(model, ids[:-1]))
    rotated = next_token_logprobs(model, ids, naive)
    assert float((exact.exp() * (exact - rotated)).sum()) > 1e-4  # the next-token distribution moves
    with pytest.raises(ValueError, match="cache holds"):
        greedy(model, ids, 1, kv=prefill(model, ids[:-2]))


def test_droidspeak_recomputing_every_layer_is_the_receivers_full_prefill(model):
    receiver = tiny()
    with torch.no_grad():  # a "fine-tuned variant": layers 1 and 2 changed
        for layer in (1, 2):
            for p in receiver.model.layers[layer].parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(layer)))
    ids = tokens(7, 24)
    sender_kv, sender_hidden = prefill(model, ids, hidden=True)
    own = prefill(receiver, ids)
    layers = len(receiver.model.layers)
    assert (recompute(receiver, sender_kv, sender_hidden, (0, layers), ids) - own).abs().max() < 1e-5
    assert torch.equal(recompute(receiver, sender_kv, sender_hidden, (0, 0)), sender_kv)
    with pytest.raises(ValueError, match="token ids"):
        recompute(receiver, sender_kv, sender_hidden, (0, 2))
    # a variant whose embeddings changed too: recomputing from layer 0 starts from its own embeddings
    with torch.no_grad():
        retuned = tiny()
        retuned.load_state_dict(receiver.state_dict())
        retuned.model.embed_tokens.weight.add_(0.05)
    assert (recompute(retuned, sender_kv, sender_hidden, (0, layers), ids) - prefill(retuned, ids)).abs().max() < 1e-5
    # recomputing from layer 1 on: layer 0 is the same in both models, so this is exact too
    assert (recompute(receiver, sender_kv, sender_hidden, (1, layers)) - own).abs().max() < 1e-5
    with pytest.raises(ValueError, match="outside"):
        recompute(receiver, sender_kv, sender_hidden, (2, 9))
    front = profile_groups(receiver, model, [tokens(s, 16) for s in (11, 12, 13)])
    assert front[0].group == (0, 0) and front[0].kl > 0  # reusing everything costs quality
    assert front[-1].kl < 1e-8 and front[-1].recomputed < layers  # exact without recomputing layer 0
    assert [g.recomputed for g in front] == sorted(g.recomputed for g in front)
    assert all(a.kl > b.kl for a, b in zip(front, front[1:]))  # each step buys quality
