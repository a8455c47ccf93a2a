"""A vLLM scheduler without an engine: the real `Scheduler` class (stock or agentserve's plugin) built
from `EngineSettings` in this process, with a KV cache config of the settings' block count and no
model. Drives scheduler benchmarks (bench/scheduler_step.py) and fast scheduler tests; `step` plays the
model (`ModelRunnerOutput` with one sampled token per request that finished its prompt) and, under
async scheduling, the engine core's batch queue: the next step is scheduled before the previous one's
output is applied, as `EngineCore.step_with_batch_queue` does.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from agentserve.engine.settings import EngineSettings, engine_args


def build_scheduler(settings: EngineSettings, scheduler_cls: str | None = None, async_scheduling: bool = False):
    """(scheduler, block_hasher) for `settings`; `scheduler_cls` defaults to the settings' or vLLM's
    (resolved by vLLM, as the engine core does). `async_scheduling` is what vLLM decides on a GPU (this
    CPU platform turns it off)."""
    import torch
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    settings = settings.for_device()
    config = engine_args(settings).create_engine_config()
    config.cache_config.num_gpu_blocks = settings.num_blocks
    config.scheduler_config.async_scheduling = async_scheduling
    config.scheduler_config.scheduler_cls = scheduler_cls or settings.scheduler_cls
    spec = FullAttentionSpec(block_size=settings.block_size, num_kv_heads=1, head_size=64, dtype=torch.float32)
    kv = KVCacheConfig(num_blocks=settings.num_blocks, kv_cache_tensors=[],
                       kv_cache_groups=[KVCacheGroupSpec(["layer.0"], spec)])
    cls = config.scheduler_config.get_scheduler_cls()
    scheduler = cls(vllm_config=config, kv_cache_config=kv, structured_output_manager=StructuredOutputManager(config),
                    block_size=settings.block_size, log_stats=True)
    scheduler.offline_batches = deque()  # the batch queue: scheduled steps whose output is not applied
    hash_fn = get_hash_fn_by_name(config.cache_config.prefix_caching_hash_algo)
    init_none_hash(hash_fn)
    return scheduler, get_request_block_hasher(settings.block_size, hash_fn)


def step(scheduler, sample: Callable[[], int]) -> tuple[object, list[str]]:
    """One engine step with a stub model: schedule, sample a token for every request whose prompt this
    step completes, apply the output (the oldest in-flight step's, under async scheduling: two in
    flight, and none left once nothing more is scheduled). Returns (scheduler output, ids of requests
    that finished)."""
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler

    depth = 2 if isinstance(scheduler, AsyncScheduler) else 1
    batches = scheduler.offline_batches
    out = scheduler.schedule()
    batches.append((out, [r for r in out.num_scheduled_tokens if not scheduler.requests[r].is_prefill_chunk]))
    finished = []
    while len(batches) >= depth or (batches and not out.total_num_scheduled_tokens):
        finished += _apply(scheduler, *batches.popleft(), sample)
    return out, finished


def _apply(scheduler, out, sampling: list[str], sample: Callable[[], int]) -> list[str]:
    from vllm.v1.outputs import ModelRunnerOutput

    ids = list(out.num_scheduled_tokens)
    chosen = set(sampling)
    result = ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                               sampled_token_ids=[[sample()] if r in chosen else [] for r in ids])
    return [o.request_id for outs in scheduler.update_from_output(out, result).values()
            for o in outs.outputs if o.finish_reason is not None]
