"""Engine settings: one struct that says how a vLLM engine is started, and its translation to vLLM.

The translation goes through vLLM's own argument parser (`make_arg_parser`), so the embedded engine,
the HTTP server and a Ray Serve replica all get the exact arguments `vllm serve` would, with no
hand-kept copy of vLLM's defaults. The KV budget is exact: `kv_tokens` usable tokens, rounded up to
whole blocks plus vLLM's reserved null block, given to vLLM both as a block count (`num_gpu_blocks_override`) and as the matching byte size
(`kv_cache_memory_bytes`), because vLLM-CPU otherwise tries to reserve 92 % of memory and fails.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import msgspec

# fp32 on CPU: bf16 is ~3x slower on AVX2 machines without AMX/AVX512-BF16.
DEFAULT_DTYPE = "float32"
# Prefix caching only reuses full blocks; an agent turn adds few tokens, so small blocks lose less.
# 32 is the smallest block the CPU attention backend takes.
DEFAULT_BLOCK_SIZE = 32


class EngineSettings(msgspec.Struct, kw_only=True):
    """How to start one vLLM engine. `model` is a catalog name (`tiny`, ...) or a model directory."""

    model: str = "tiny"
    kv_tokens: int = 16384
    block_size: int = DEFAULT_BLOCK_SIZE
    max_model_len: int | None = None  # default: min(kv_tokens, the model's context length)
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None  # default: max(max_model_len, 2048)
    dtype: str = DEFAULT_DTYPE
    seed: int = 0
    prefix_caching: bool = True
    scheduling_policy: str = "fcfs"  # or "priority"
    scheduler_cls: str | None = None  # "module.Class" of a vLLM v1 Scheduler subclass
    kv_transfer_config: dict | None = None
    additional_config: dict | None = None  # vLLM's plugin config; agentserve's scheduler reads "agentserve"
    served_model_name: str | None = None  # default: the catalog name or the directory's name
    extra_vllm_args: list[str] = []

    def __post_init__(self) -> None:
        if self.kv_tokens < self.block_size:
            raise ValueError(f"kv_tokens={self.kv_tokens} is smaller than one block ({self.block_size})")
        if self.block_size % 32:
            raise ValueError(f"block_size={self.block_size} must be a multiple of 32 (CPU attention)")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy must be 'fcfs' or 'priority', not {self.scheduling_policy!r}")

    @property
    def num_blocks(self) -> int:
        # vLLM reserves one block (the null block) that never holds tokens.
        return math.ceil(self.kv_tokens / self.block_size) + 1


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
    """The `vllm serve` arguments (without host/port) that start the engine `s` describes."""
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
        "--enforce-eager",
        "--enable-prompt-tokens-details",
        "--enable-prefix-caching" if s.prefix_caching else "--no-enable-prefix-caching",
    ]
    if s.scheduler_cls:
        args += ["--scheduler-cls", s.scheduler_cls]
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
