"""The host tier's copy worker on vLLM-CPU: blocks copied between the engine's KV tensors and a host
pool, both in host memory.

vLLM's `CPUOffloadingWorker` does the same on a GPU with CUDA streams and batched copy kernels; on
vLLM-CPU it refuses to start. This worker takes the same inputs (vLLM's canonical view of the KV
caches: per tensor, `(num_blocks, page_bytes)` int8, whatever the attention backend's layout inside
a page) and the same transfer specs, so the connector, its scheduler-side manager and the cache policy
are vLLM's own. A page is copied whole, so the CPU kernel's block layout (keys transposed within a
block) travels unchanged.

Trade-off: a transfer runs synchronously when it is submitted (inside the engine step, between model
forwards) and is reported finished at the next poll. Even with that, a load-back reaches the first token
6-16x sooner than a re-prefill here (docs/benchmarks.md); an asynchronous copy thread would compete
with the forward pass for the same two cores. Not measured: whether it would pay on a larger machine.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from vllm.v1.kv_offload.base import (
    BlockIDsLoadStoreSpec,
    CanonicalKVCaches,
    GPULoadStoreSpec,
    LoadStoreSpec,
    OffloadingWorker,
    TransferResult,
)


class HostCopyWorker(OffloadingWorker):
    def __init__(self, kv_caches: CanonicalKVCaches, blocks_per_chunk: int, num_chunks: int,
                 throttle: float = 1.0):
        self.blocks_per_chunk = blocks_per_chunk
        self.throttle = throttle  # >= 1: each copy takes this many times its own time (a slower link)
        self.engine: list[torch.Tensor] = []
        self.host: list[torch.Tensor] = []  # per tensor: (num_chunks, blocks_per_chunk, page_bytes)
        for t in kv_caches.tensors:
            page = t.page_size_bytes
            self.engine.append(t.tensor.view(torch.int8).view(-1, page))
            self.host.append(torch.zeros((num_chunks, blocks_per_chunk, page), dtype=torch.int8))
        # the tensors each KV cache group's blocks live in (aliased layers share one)
        self.group_tensors = [sorted({ref.tensor_idx for ref in refs}) for refs in kv_caches.group_data_refs]
        self._finished: list[TransferResult] = []

    def submit_store(self, job_id: int, src_spec: GPULoadStoreSpec, dst_spec: LoadStoreSpec) -> bool:
        return self._transfer(job_id, src_spec, dst_spec, store=True)

    def submit_load(self, job_id: int, src_spec: LoadStoreSpec, dst_spec: GPULoadStoreSpec) -> bool:
        return self._transfer(job_id, dst_spec, src_spec, store=False)

    def _transfer(self, job_id: int, engine_spec: GPULoadStoreSpec, host_spec: LoadStoreSpec, *, store: bool) -> bool:
        assert isinstance(host_spec, BlockIDsLoadStoreSpec)
        t0 = time.perf_counter()
        moved = 0
        for t_idx, (rows, chunks, slots) in self.plan(engine_spec, host_spec.block_ids).items():
            engine, host = self.engine[t_idx], self.host[t_idx]
            if store:
                host[chunks, slots] = engine.index_select(0, rows)
            else:
                engine.index_copy_(0, rows, host[chunks, slots])
            moved += len(rows) * engine.shape[1]
        elapsed = time.perf_counter() - t0
        if self.throttle > 1.0:
            time.sleep(elapsed * (self.throttle - 1.0))
            elapsed *= self.throttle
        self._finished.append(TransferResult(job_id, True, moved, elapsed))
        return True

    def plan(self, spec: GPULoadStoreSpec, host_chunks: np.ndarray) -> dict[int, tuple[torch.Tensor, ...]]:
        """tensor -> (engine block ids, host chunk ids, slots within those chunks). A group's blocks are a
        request's logical blocks from `block_indices[g]` on, so its first chunk may start mid-chunk."""
        bpc = self.blocks_per_chunk
        parts: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
        engine_offset, host_offset = 0, 0
        for g, (size, first) in enumerate(zip(spec.group_sizes, spec.block_indices)):
            if size == 0:
                continue
            logical = np.arange(first, first + size)
            rel_chunk = logical // bpc - first // bpc
            n_chunks = int(rel_chunk[-1]) + 1
            group = (spec.block_ids[engine_offset:engine_offset + size],
                     host_chunks[host_offset:host_offset + n_chunks][rel_chunk], logical % bpc)
            for t_idx in self.group_tensors[g]:
                parts.setdefault(t_idx, []).append(group)
            engine_offset += size
            host_offset += n_chunks
        assert engine_offset == len(spec.block_ids) and host_offset == len(host_chunks)
        return {t: tuple(torch.from_numpy(np.concatenate(column).astype(np.int64)) for column in zip(*groups))
                for t, groups in parts.items()}

    def get_finished(self) -> list[TransferResult]:
        done, self._finished = self._finished, []
        return done

    def wait(self, job_ids: set[int]) -> None:
        return  # every transfer completed when it was submitted
