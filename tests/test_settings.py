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
    ({"cuda_graphs": True}, "needs a GPU"),
    ({"scheduling_policy": "lifo"}, "scheduling_policy"),
])
def test_bad_settings_are_refused_with_a_reason(kwargs, message):
    from agentserve.options import load

    with pytest.raises(ValueError, match=message):
        load(EngineSettings, kwargs).for_device("cpu")


@pytest.fixture(params=["cpu", "gpu"])
def device(request, monkeypatch):
    """This process's device as vLLM reports it, faked: the settings decide by it alone."""
    import agentserve.options

    monkeypatch.setattr(agentserve.options, "this_device", lambda: request.param)
    return request.param


def test_the_devices_defaults_reach_vllms_arguments(device):
    from vllm.config import CacheConfig

    args = vllm_cli_args(EngineSettings(model="tiny", kv_tokens=4096))
    if device == "cpu":  # today's choices: fp32, blocks of 32, eager
        assert _arg(args, "--dtype") == "float32" and _arg(args, "--block-size") == "32"
        assert "--enforce-eager" in args
    else:  # bf16, vLLM's default block size, CUDA graphs on (no --enforce-eager)
        assert _arg(args, "--dtype") == "bfloat16"
        assert int(_arg(args, "--block-size")) == CacheConfig.DEFAULT_BLOCK_SIZE
        assert "--enforce-eager" not in args
    blocks = int(_arg(args, "--num-gpu-blocks-override"))
    assert (blocks - 1) * int(_arg(args, "--block-size")) == 4096  # the budget stays exact either way
    per_token = kv_bytes_per_token(resolve_model("tiny")[0], _arg(args, "--dtype"))
    assert int(_arg(args, "--kv-cache-memory-bytes")) == blocks * int(_arg(args, "--block-size")) * per_token


def test_set_values_win_over_the_devices_defaults(device):
    args = vllm_cli_args(EngineSettings(model="tiny", kv_tokens=4096, dtype="float16", block_size=64,
                                        cuda_graphs=False))
    assert _arg(args, "--dtype") == "float16" and _arg(args, "--block-size") == "64" and "--enforce-eager" in args


def test_a_ray_deployment_decides_for_its_replicas_device_not_the_drivers(device):
    """The driver building a Serve app may have no GPU; its replicas' accelerator decides."""
    from agentserve.engine.settings import engine_settings_for
    from agentserve.options import ProgramOptions
    from agentserve.rayserve.app import engine_kwargs

    _, kwargs = engine_kwargs(engine_settings_for(EngineSettings(model="tiny"), ProgramOptions(policy="vllm"),
                                                  device="gpu"))
    assert kwargs["dtype"] == "bfloat16" and not kwargs.get("enforce_eager")
    _, kwargs = engine_kwargs(engine_settings_for(EngineSettings(model="tiny"), ProgramOptions(policy="vllm"),
                                                  device="cpu"))
    assert kwargs["dtype"] == "float32" and kwargs["enforce_eager"] and kwargs["block_size"] == 32


def test_device_flags_parse_and_round_trip():
    import argparse

    from agentserve.options import add_flags, from_flags, to_flags

    parser = argparse.ArgumentParser()
    add_flags(parser, EngineSettings)
    for argv, want in [([], None), (["--cuda-graphs"], True), (["--no-cuda-graphs"], False)]:
        s = from_flags(EngineSettings, parser.parse_args(argv))
        assert s.cuda_graphs is want and s.dtype is None and s.block_size is None
        assert from_flags(EngineSettings, parser.parse_args(to_flags(s))) == s


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


def test_the_ablation_switches_reach_the_engine_and_the_plugin():
    """`--vllm-scheduling` becomes vLLM's scheduling policy and `--order` / `--one-off-blocks` the
    plugin's config; the defaults are the mechanisms on (priority, program order, evict-first)."""
    import argparse

    from agentserve.engine.settings import engine_settings_for
    from agentserve.options import ProgramOptions, add_flags, from_flags

    parser = argparse.ArgumentParser()
    add_flags(parser, ProgramOptions)
    for argv, policy, order, blocks in [([], "priority", "critical-path", "evict-first"),
                                        (["--vllm-scheduling", "fcfs", "--order", "arrival",
                                          "--one-off-blocks", "lru"], "fcfs", "arrival", "lru")]:
        options = from_flags(ProgramOptions, parser.parse_args(argv))
        s = engine_settings_for(EngineSettings(model="tiny"), options, device="cpu")
        plugin = s.additional_config["agentserve"]
        assert (s.scheduling_policy, plugin["order"], plugin["one_off_blocks"]) == (policy, order, blocks)
    with pytest.raises(SystemExit):  # argparse refuses a value the switch does not have
        parser.parse_args(["--one-off-blocks", "mru"])
