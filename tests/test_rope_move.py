"""KV-sharing invariants 1-2 (docs/kvshare.md) for the RoPE move, on tiny random Llama and Qwen2 models (HF)."""

from __future__ import annotations

import pytest
import torch

from agentserve.kvshare.rope import RopeShift, UnsupportedRope

ROPES = {
    "default": None,
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
}


def tiny(arch: str, rope: dict | None):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=512)
    if rope is not None:
        kw["rope_scaling"] = dict(rope)
    torch.manual_seed(0)
    config, model_cls = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    return model_cls(config(**kw)).eval()


def kv_at(model, ids: torch.Tensor, start: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    positions = torch.arange(start, start + ids.shape[1])[None]
    with torch.no_grad():
        cache = model(input_ids=ids, position_ids=positions, use_cache=True).past_key_values
    return [(layer.keys, layer.values) for layer in cache.layers]


def test_moving_by_delta_then_back_returns_the_keys():
    shift = RopeShift(tiny("llama", ROPES["yarn"]).config)
    keys = torch.randn(2, 4, 7, 16)
    for delta in (1, 37, 500):
        assert torch.allclose(shift.move(shift.move(keys, delta), -delta), keys, atol=1e-5)
    assert shift.move(keys, 0) is keys


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("rope", list(ROPES))
def test_a_segment_moved_from_position_zero_equals_it_computed_there_in_every_layer(arch, rope):
    model = tiny(arch, ROPES[rope])
    shift = RopeShift(model.config)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    at_zero, p = kv_at(model, ids, 0), 93
    there = kv_at(model, ids, p)
    for (k0, v0), (kp, vp) in zip(at_zero, there):
        assert (shift.move(k0, p) - kp).abs().max() <= 5e-6
        assert (v0 - vp).abs().max() <= 5e-6
    if rope == "yarn":  # forgetting HF's attention_scaling breaks it (docs/kvshare.md, invariant 2)
        k0, kp = at_zero[0][0], there[0][0]
        assert (shift.move(k0, p, divide_scaling=False) - kp).abs().max() > 1e-2


def test_length_dependent_and_partial_rope_are_refused():
    from transformers import LlamaConfig

    for rope in ({"rope_type": "dynamic", "factor": 2.0}, {"rope_type": "longrope", "short_factor": [1.0] * 8,
                                                            "long_factor": [1.0] * 8,
                                                            "original_max_position_embeddings": 64}):
        config = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_scaling=rope, max_position_embeddings=512)
        with pytest.raises(UnsupportedRope, match="sequence length"):
            RopeShift(config)
    config = LlamaConfig(hidden_size=64, num_attention_heads=4)
    config.partial_rotary_factor = 0.5
    with pytest.raises(UnsupportedRope, match="partial"):
        RopeShift(config)
