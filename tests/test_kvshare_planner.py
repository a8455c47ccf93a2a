"""The served path's KV-sharing planner (agentserve/kvshare/planner.py), without an engine: KV from a tiny
random Llama on the HF path stands in for what the connector saves from vLLM's paged cache."""

from __future__ import annotations

import random

import pytest
import torch

from agentserve.kvshare.hf import prefill
from agentserve.kvshare.planner import SharePlanner, ShareSpec
from agentserve.kvshare.rope import RopeShift
from agentserve.kvshare.segments import SegmentStore


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                        max_position_embeddings=1024)).eval()


def planner(model, **pool):
    return SharePlanner("tiny", RopeShift(model.config), SegmentStore(1 << 26), **pool)


def prompt(rng: random.Random, segments: list[list[int]], prefix=(1, 5, 7), between=(11, 12), question=(20, 21, 22)):
    """(tokens, spec): prefix, then each segment followed by `between` (but the last), then the question."""
    tokens, spans = list(prefix), []
    for i, seg in enumerate(segments):
        spans.append((len(tokens), len(seg)))
        tokens += seg + (list(between) if i < len(segments) - 1 else [])
    return tokens + list(question), ShareSpec(template="reader", segments=spans)


def produce(p: SharePlanner, model, seg: list[int], scope: str = "", between=(11, 12)) -> None:
    """A shared part's base, and that of the template text between parts (what the front end produces)."""
    p.saved(ShareSpec(produce=True, scope=scope), seg, prefill(model, seg))
    p.saved(ShareSpec(produce=True, scope=scope), list(between), prefill(model, list(between)))


def segments(rng: random.Random, *lengths: int) -> list[list[int]]:
    return [[rng.randrange(30, 300) for _ in range(n)] for n in lengths]


def checked_plan(p: SharePlanner, spec: ShareSpec, tokens: list[int], computed: int):
    """`p.plan`, after checking that the scheduler process's copy of `p`'s knowledge (ShareIndex over
    what the worker reports, pickled as vLLM ships it) decides as `p` does: the same reason, or a plan
    tried that the values then refuse."""
    import pickle

    from agentserve.kvshare.index import ShareIndex, describe
    from agentserve.kvshare.planner import REUSE, decide

    index = ShareIndex(p.model, p.correction)
    index.update(pickle.loads(pickle.dumps(describe(p, version=1))))
    expected = decide(spec, tokens, computed, index) if not spec.produce else "produce"
    got = p.plan(spec, tokens, computed)
    assert got.reason == expected or (expected == REUSE and got.reason in ("reused", "anchors_refused")), \
        (expected, got.reason)
    return got


def test_a_recorded_prompt_is_planned_back_exactly_from_its_locally_cached_prefix(model):
    rng = random.Random(0)
    segs = segments(rng, 40, 25)
    p = planner(model)
    tokens, spec = prompt(rng, segs)
    assert checked_plan(p, spec, tokens, 0).reason == "no_base"  # nothing produced: full prefill, nothing to record
    for seg in segs:
        produce(p, model, seg)
    first = checked_plan(p, spec, tokens, 0)
    assert (first.plan, first.record, first.reason) == (None, True, "new_template")
    real = prefill(model, tokens)
    p.saved(spec, tokens, real)  # the connector hands back the full prefill's KV
    end = spec.segments[-1][0] + spec.segments[-1][1]
    for computed in (0, 32):  # nothing cached locally; one block cached locally
        again = checked_plan(p, spec, tokens, computed)
        assert again.reason == "reused" and again.plan.start == computed
        assert torch.allclose(again.plan.kv, real[:, :, :, computed:end], atol=1e-5)
    assert checked_plan(p, spec, tokens, end).plan is None  # all cached locally already
    assert p.stats()["tokens_reused"] == 2 * end - 32


def test_a_new_content_is_estimated_from_anchors_and_beats_the_naive_move(model):
    rng = random.Random(1)
    # equally distant random contents would fail the entropy gate (tests/test_anchors.py): off here
    p = planner(model, temperature=0.1, entropy_gamma=float("inf"))
    new = segments(rng, 30, 30)

    def variant(seg):  # anchors' contents are like the new one: a few tokens differ
        out = list(seg)
        for i in rng.sample(range(len(seg)), 4):
            out[i] = rng.randrange(30, 300)
        return out

    history = [[variant(seg) for seg in new] for _ in range(5)]
    for segs in history:
        for seg in segs:
            produce(p, model, seg)
        tokens, spec = prompt(rng, segs)
        decision = checked_plan(p, spec, tokens, 0)
        if decision.record:
            p.saved(spec, tokens, prefill(model, tokens))
    assert p.stats()["anchors"] >= 4
    for seg in new:
        produce(p, model, seg)
    tokens, spec = prompt(rng, new)
    got = checked_plan(p, spec, tokens, 0)
    assert got.reason == "reused"
    end = spec.segments[-1][0] + spec.segments[-1][1]
    real = prefill(model, tokens)[:, :, :, :end]
    naive = planner(model)
    for seg in new:
        produce(naive, model, seg)
    from agentserve.kvshare.segments import place

    moved = real.clone()  # the naive move: each base at its place
    for (start, n), seg in zip(spec.segments, new):
        moved[:, :, :, start:start + n] = place(naive.store.get("tiny\0", seg), start, naive.shift)
    on_segments = torch.cat([torch.arange(s, s + n) for s, n in spec.segments])

    def err(kv):  # relative error over the segments' tokens in layers >= 1 (layer 0 is exact)
        return float((kv[1:, :, :, on_segments] - real[1:, :, :, on_segments]).norm()
                     / real[1:, :, :, on_segments].norm())

    assert err(got.plan.kv) < err(moved), "the anchors' correction helps"
    # the naive mode plans exactly that move, from one recorded prompt of the template, no anchors
    naive.correction = "none"
    assert checked_plan(naive, spec, tokens, 0).reason == "new_template"
    naive.saved(spec, tokens, prefill(model, tokens))
    plain = checked_plan(naive, spec, tokens, 0)
    assert plain.reason == "reused"
    assert torch.allclose(plain.plan.kv[:, :, :, on_segments], moved[:, :, :, on_segments], atol=1e-5)
    with pytest.raises(ValueError, match="correction"):
        SharePlanner("tiny", naive.shift, naive.store, correction="magic")


def test_template_changes_scopes_and_bad_specs(model):
    rng = random.Random(2)
    segs = segments(rng, 20, 20)
    p = planner(model)
    for seg in segs:
        produce(p, model, seg, scope="acme")
    tokens, spec = prompt(rng, segs)
    assert checked_plan(p, spec, tokens, 0).reason == "no_base"  # produced under another tenant's scope
    scoped = ShareSpec(template="reader", scope="acme", segments=spec.segments)
    assert checked_plan(p, scoped, tokens, 0).reason == "new_template"
    p.saved(scoped, tokens, prefill(model, tokens))
    assert checked_plan(p, scoped, tokens, 0).reason == "reused"
    produce(p, model, segs[0], scope="acme", between=(13, 14))
    other, spec2 = prompt(rng, segs, between=(13, 14))
    scoped2 = ShareSpec(template="reader", scope="acme", segments=spec2.segments)
    assert checked_plan(p, scoped2, other, 0).reason == "template_changed"
    with pytest.raises(ValueError, match="go on after"):
        ShareSpec(template="t", segments=[(0, 5)]).check(5)
    with pytest.raises(ValueError, match="overlap"):
        ShareSpec(template="t", segments=[(0, 5), (3, 2)]).check(20)
    with pytest.raises(ValueError, match="template"):
        ShareSpec(segments=[(0, 5)]).check(20)
    with pytest.raises(ValueError, match="no segments"):
        ShareSpec(produce=True, segments=[(0, 5)]).check(20)
