"""EngineSettings -> vLLM arguments: exact KV budget, validation, vLLM's own parser accepts them."""

import pytest

from agentserve.engine.settings import EngineSettings, kv_bytes_per_token, resolve_model, vllm_cli_args


def _arg(args, flag):
    return args[args.index(flag) + 1]


def test_kv_budget_is_exact_in_blocks_and_bytes():
    s = EngineSettings(model="tiny", kv_tokens=8192, block_size=32)
    assert s.num_blocks == 8192 // 32 + 1  # + vLLM's null block
    args = vllm_cli_args(s)
    assert int(_arg(args, "--num-gpu-blocks-override")) == s.num_blocks
    per_token = kv_bytes_per_token(resolve_model("tiny")[0], "float32")
    assert per_token == 2 * 2 * 4 * 32 * 4  # K and V, 2 layers, 4 KV heads, head dim 32, fp32
    assert int(_arg(args, "--kv-cache-memory-bytes")) == s.num_blocks * 32 * per_token
    assert int(_arg(args, "--max-model-len")) == 8192
    assert "--enable-prompt-tokens-details" in args and "--enable-prefix-caching" in args


def test_kv_tokens_round_up_to_whole_blocks():
    assert EngineSettings(kv_tokens=100, block_size=32).num_blocks == 4 + 1


@pytest.mark.parametrize("kwargs, message", [
    ({"kv_tokens": 16}, "smaller than one block"),
    ({"block_size": 48}, "multiple of 32"),
    ({"scheduling_policy": "lifo"}, "scheduling_policy"),
])
def test_bad_settings_are_refused_with_a_reason(kwargs, message):
    from agentserve.options import load

    with pytest.raises(ValueError, match=message):
        load(EngineSettings, kwargs)


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="neither a built-in model"):
        vllm_cli_args(EngineSettings(model="/nonexistent/model"))


def test_vllm_parser_accepts_the_arguments():
    from agentserve.engine.settings import vllm_namespace

    ns = vllm_namespace(EngineSettings(model="tiny", kv_tokens=4096, scheduler_cls="x.Y",
                                       scheduling_policy="priority"), port=9999)
    assert ns.num_gpu_blocks_override == 4096 // 32 + 1
    assert ns.enable_prefix_caching is True
    assert ns.scheduling_policy == "priority"
    assert ns.scheduler_cls == "x.Y"
    assert ns.served_model_name == ["tiny"]
    assert ns.port == 9999
