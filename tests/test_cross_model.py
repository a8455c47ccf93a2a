"""Cross-model reuse (DroidSpeak) as the server runs it (agentserve/kvshare/cross_reuse.py), on small
random Llamas: a sender identical to the receiver makes reuse exact for any layer group; recomputing
every layer is the receiver's own prefill; the longest stored prefix is the one reused; the store is
bounded; two architectures that differ are refused naming the field."""

from __future__ import annotations

import pytest
import torch

from agentserve.kvshare.cross_reuse import CrossModelReuse, check_compatible, pick_group
from agentserve.kvshare.droidspeak import GroupScore
from agentserve.kvshare.hf import greedy

VOCAB = 128


def llama(seed: int, **over):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512)
    return LlamaForCausalLM(LlamaConfig(**{**config, **over})).eval()


def tokens(seed: int, n: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def pair():
    return llama(0), llama(1)  # one architecture, different weights (stands in for a fine-tune)


@pytest.mark.parametrize("group", [(0, 0), (0, 2), (1, 3), (2, 2), (0, 4)])
def test_a_sender_identical_to_the_receiver_reuses_exactly(pair, group):
    model = pair[0]
    reuse = CrossModelReuse(model, model, group, max_bytes=1 << 24)
    context, question = tokens(1, 40), tokens(2, 6)
    assert reuse.prepare(context)
    got = reuse.complete(context + question, [len(context)], max_tokens=8)
    assert got.reason == "reused" and got.reused_tokens == len(context)
    assert got.tokens == greedy(model, context + question, 8)


def test_recomputing_every_layer_is_the_receivers_own_prefill(pair):
    sender, receiver = pair
    context, question = tokens(3, 50), tokens(4, 5)
    reuse = CrossModelReuse(sender, receiver, (0, 4), max_bytes=1 << 24)
    reuse.prepare(context)
    got = reuse.complete(context + question, [len(context)], max_tokens=8)
    assert got.reused_tokens == len(context) and got.tokens == greedy(receiver, context + question, 8)
    # reusing every layer of a different model is not the receiver's answer (the test can fail)
    all_reused = CrossModelReuse(sender, receiver, (0, 0), max_bytes=1 << 24)
    all_reused.prepare(context)
    reused_kv = all_reused.complete(context + question, [len(context)], max_tokens=8).tokens
    assert reused_kv != got.tokens


def test_the_longest_stored_prefix_is_reused_and_a_missing_one_is_prefilled(pair):
    sender, receiver = pair
    reuse = CrossModelReuse(sender, receiver, (0, 2), max_bytes=1 << 24)
    a, b, q = tokens(5, 20), tokens(6, 20), tokens(7, 4)
    reuse.prepare(a)
    reuse.prepare(a + b)
    got = reuse.complete(a + b + q, [len(a), len(a + b)], max_tokens=3)
    assert got.reused_tokens == len(a + b)
    other = reuse.complete(tokens(8, 30) + q, [30], max_tokens=3)
    assert other.reason == "no_sender_prefix" and other.reused_tokens == 0
    assert other.tokens == greedy(receiver, tokens(8, 30) + q, 3)
    assert reuse.counters["reused"] == 1 and reuse.counters["no_sender_prefix"] == 1


def test_the_store_is_bounded_least_recently_used_out(pair):
    sender, receiver = pair
    one = CrossModelReuse(sender, receiver, (1, 2), max_bytes=1 << 24)
    one.prepare(tokens(9, 30))
    size = one.bytes  # KV plus the hidden state at layer 1's input
    reuse = CrossModelReuse(sender, receiver, (1, 2), max_bytes=int(size * 2.5))
    for seed in (10, 11, 12):
        assert reuse.prepare(tokens(seed, 30))
    assert len(reuse) == 2 and reuse.bytes <= reuse.max_bytes and reuse.counters["prefixes_evicted"] == 1
    assert reuse.complete(tokens(10, 30) + [1, 2], [30], 1).reason == "no_sender_prefix"  # the oldest went
    assert not CrossModelReuse(sender, receiver, (1, 2), max_bytes=size // 2).prepare(tokens(9, 30))


def test_different_architectures_are_refused_naming_the_field(pair):
    with pytest.raises(ValueError, match="num_hidden_layers"):
        check_compatible(pair[0].config, llama(2, num_hidden_layers=3).config)
    with pytest.raises(ValueError, match="outside"):
        CrossModelReuse(pair[0], pair[1], (2, 5), max_bytes=1 << 20)


def test_pick_group_takes_the_cheapest_within_the_bound():
    front = [GroupScore((0, 0), 0, 0.9), GroupScore((0, 2), 2, 0.04), GroupScore((0, 3), 3, 0.01),
             GroupScore((0, 4), 4, 0.0)]
    assert pick_group(front, 0.05).group == (0, 2)
    assert pick_group(front, 0.001).group == (0, 4)
    assert pick_group(front, 1.0).group == (0, 0)


def test_a_prefix_serves_only_its_own_scope(pair):
    reuse = CrossModelReuse(*pair, (0, 2), max_bytes=1 << 24)
    context = tokens(13, 25)
    reuse.prepare(context, scope="tenant-a")
    assert reuse.complete(context + [3], [25], 1, scope="tenant-b").reason == "no_sender_prefix"
    assert reuse.complete(context + [3], [25], 1, scope="tenant-a").reason == "reused"


@pytest.mark.parametrize("group", [(0, 0), (0, 2), (1, 3), (3, 3), (0, 4)])
def test_one_pass_reuse_equals_recompute_then_prefill(pair, group):
    from agentserve.kvshare.droidspeak import recompute, reuse_and_prefill
    from agentserve.kvshare.hf import prefill
    from agentserve.kvshare.reuse import forward_over

    sender, receiver = pair
    prefix, rest = tokens(14, 30), tokens(15, 7)
    kv, hidden = prefill(sender, prefix, hidden=True)
    two_pass = recompute(receiver, kv, hidden, group, prefix)
    want_kv, want_logits = forward_over(receiver, rest, range(30, 37), two_pass, range(30))
    got_kv, got_logits = reuse_and_prefill(receiver, kv, hidden, group, prefix, rest)
    assert torch.allclose(got_kv, want_kv, atol=1e-5) and torch.allclose(got_logits, want_logits, atol=1e-4)
