"""A vLLM scheduler without an engine: the real `Scheduler` class (stock or agentserve's plugin) built
from `EngineSettings` in this process, with a KV cache config of the settings' block count and no
model. Drives scheduler benchmarks (bench/scheduler_step.py) and fast scheduler tests; the caller plays
the model (`ModelRunnerOutput` with one sampled token per request that finished its prompt).
"""

from __future__ import annotations

from collections.abc import Callable

from agentserve.engine.settings import EngineSettings, engine_args


def build_scheduler(settings: EngineSettings, scheduler_cls: str | None = None):
    """(scheduler, block_hasher) for `settings`; `scheduler_cls` defaults to the settings' or vLLM's."""
    import torch
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    config = engine_args(settings).create_engine_config()
    config.cache_config.num_gpu_blocks = settings.num_blocks
    spec = FullAttentionSpec(block_size=settings.block_size, num_kv_heads=1, head_size=64, dtype=torch.float32)
    kv = KVCacheConfig(num_blocks=settings.num_blocks, kv_cache_tensors=[],
                       kv_cache_groups=[KVCacheGroupSpec(["layer.0"], spec)])
    name = scheduler_cls or settings.scheduler_cls
    cls = resolve_obj_by_qualname(name) if name else Scheduler
    scheduler = cls(vllm_config=config, kv_cache_config=kv, structured_output_manager=StructuredOutputManager(config),
                    block_size=settings.block_size, log_stats=True)
    hash_fn = get_hash_fn_by_name(config.cache_config.prefix_caching_hash_algo)
    init_none_hash(hash_fn)
    return scheduler, get_request_block_hasher(settings.block_size, hash_fn)


def step(scheduler, sample: Callable[[], int]) -> tuple[object, list[str]]:
    """One engine step with a stub model: schedule, sample a token for every request whose prompt is
    computed, update. Returns (scheduler output, ids of requests that finished)."""
    from vllm.v1.outputs import ModelRunnerOutput

    out = scheduler.schedule()
    ids = list(out.num_scheduled_tokens)
    sampled = [[sample()] if scheduler.requests[r].num_computed_tokens >= scheduler.requests[r].num_tokens else []
               for r in ids]
    result = ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                               sampled_token_ids=sampled)
    finished = [o.request_id for outs in scheduler.update_from_output(out, result).values()
                for o in outs.outputs if o.finish_reason is not None]
    return out, finished
