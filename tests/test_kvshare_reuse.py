"""KVCOMM reuse of shared segments on the HF path (agentserve/kvshare/reuse.py), on a tiny random Llama
and Qwen2 over the multi-agent retrieval task's prompts: the masked forward pass is plain prefill, a
content seen before is reused exactly, and naive reuse is not exact."""

from __future__ import annotations

import random

import pytest
import torch

from agentserve.models import kvret_task as kvret
from agentserve.kvshare.parts import Shared, Text, flatten
from agentserve.kvshare.reuse import SharedPrefill, decode, forward_over
from agentserve.kvshare.segments import SegmentStore


def tiny(arch: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=len(kvret.VOCAB), max_position_embeddings=1024)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=False)).eval()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request):
    return tiny(request.param)


def prompt(ep: kvret.Episode, agent: int = 4) -> list:
    q = kvret.questions(random.Random(1), ep, agent, 1)[0]
    return kvret.consumer_parts(ep, agent) + [Text(q.prompt)]


def plain_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1]


def test_forward_over_any_cache_order_is_plain_prefill(model):
    ep = kvret.episode(random.Random(0), filler=(2, 6))
    ids = flatten(prompt(ep))
    kv, logits = forward_over(model, ids, range(len(ids)), None, [])
    assert (logits - plain_logits(model, ids)).abs().max() < 1e-4
    # the first half's KV as a past (stored in reverse order), the rest computed on top of it
    half = len(ids) // 2
    back = kv[:, :, :, :half].flip(3)
    _, tail_logits = forward_over(model, ids[half:], range(half, len(ids)), back, list(range(half))[::-1])
    assert (tail_logits - logits).abs().max() < 1e-4


def test_a_segment_content_seen_before_is_reused_exactly_and_naive_reuse_is_not(model):
    rng = random.Random(2)
    episodes = [kvret.episode(rng, filler=(2, 6)) for _ in range(2)]
    sp = SharedPrefill(model, "tiny", SegmentStore(1 << 26))
    for ep in episodes:
        for report in ep.reports:
            sp.produce(report)
    first = sp(prompt(episodes[0]), "agent4", "anchors")
    assert not first.reused  # empty pools: full prefill, which records an anchor per placeholder
    assert all(len(pool) == 1 for pool in sp.pools.values()) and len(sp.pools) == 4
    again = sp(prompt(episodes[0]), "agent4", "anchors")
    assert again.reused
    ids = flatten(prompt(episodes[0]))
    ref = plain_logits(model, ids)
    assert (again.logits - ref).abs().max() < 1e-4
    first_token = int(ref.argmax())
    with torch.no_grad():
        plain = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)[0, len(ids):].tolist()
    assert decode(model, again.kv, first_token, len(ids), 4) == plain
    naive = sp(prompt(episodes[0]), "agent4", "naive")
    assert naive.reused and (naive.logits - ref).abs().max() > 1e-3  # deeper layers miss the prefix
    assert sp(prompt(episodes[0]), "agent4", "full").reused is False


def test_a_new_content_is_prefilled_fully_until_the_pool_has_anchors_then_estimated(model):
    rng = random.Random(3)
    # random contents are all about as far from each other: the entropy gate (tests/test_anchors.py)
    # would refuse them; off here, this test is about when estimates start and what they give
    sp = SharedPrefill(model, "tiny", SegmentStore(1 << 26), temperature=0.05, entropy_gamma=float("inf"))
    eps = [kvret.episode(rng, filler=(4, 4), facts=(6, 6)) for _ in range(4)]
    assert [sp(prompt(ep), "agent4", "anchors").reused for ep in eps[:2]] == [False, False]
    assert all(len(pool) == 2 for pool in sp.pools.values())
    got = sp(prompt(eps[3]), "agent4", "anchors")  # two anchors per placeholder now: estimated
    assert got.reused and all(len(pool) == 2 for pool in sp.pools.values())
    ref = plain_logits(model, flatten(prompt(eps[3])))
    naive = sp(prompt(eps[3]), "agent4", "naive")
    assert (got.logits - ref).abs().max() < (naive.logits - ref).abs().max(), "the correction helps"


def test_bad_prompts_are_refused(model):
    sp = SharedPrefill(model, "tiny", SegmentStore(1 << 20))
    with pytest.raises(ValueError, match="mode"):
        sp([Text([1, 2])], "t", "cheap")
    with pytest.raises(ValueError, match="end with a template part"):
        sp([Text([1]), Shared([2, 3])], "t")
    with pytest.raises(ValueError, match="vocabulary"):
        kvret.ids("k1 = bogus")
