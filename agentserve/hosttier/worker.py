"""The host tier's copy worker on vLLM-CPU: blocks copied between the engine's KV tensors and a host
pool, both in host memory.

vLLM's `CPUOffloadingWorker` does the same on a GPU with CUDA streams and batched copy kernels; on
vLLM-CPU it refuses to start. This worker takes the same inputs (vLLM's canonical view of the KV
caches: per tensor, `(num_blocks, page_bytes)` int8, whatever the attention backend's layout inside
a page) and the same transfer specs, so the connector, its scheduler-side manager and the cache policy
are vLLM's own. A page is copied whole, so the CPU kernel's block layout (keys transposed within a
block) travels unchanged.

With `verify`, every block stored gets a digest of its page; every block loaded back is checked against
it, before the copy (the host pool still holds those bytes) and after it (the engine's page is them):
differences are counted, never repaired (`verification()`; the exactness check of
tests/test_host_tier.py). Which chunk holds which block hash is vLLM's manager's business, and the
worker is not told the hashes, so a wrong chunk chosen for a hash is not caught here (the tests' greedy
outputs catch that). Nor is a block's position: a store's chunks need not be contiguous in its request.

Trade-off: a transfer runs synchronously when it is submitted (inside the engine step, between model
forwards) and is reported finished at the next poll. Even with that, a load-back reaches the first token
6-16x sooner than a re-prefill here (docs/benchmarks.md); an asynchronous copy thread would compete
with the forward pass for the same two cores. Not measured: whether it would pay on a larger machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

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


_reports: Path | None = None  # scheduler side: where this process's engine's copy worker reports its checks


def report_path(engine_id: str) -> Path:
    """The file a verifying copy worker keeps its counts in: vLLM-CPU runs the worker in a process of
    its own (the multiprocessing executor), the scheduler reads them from there."""
    return Path(tempfile.gettempdir()) / f"agentserve-host-verify-{engine_id}.json"


def expect_reports(path: Path) -> None:
    """Scheduler side: this engine's copy worker verifies and reports to `path` (`verification()` reads it)."""
    global _reports
    _reports = path


def verification() -> dict[str, int] | None:
    """The verifying copy worker's counts (blocks stored, blocks checked at load, differences by kind);
    None where the engine does not verify."""
    if _reports is None:
        return None
    try:
        return json.loads(_reports.read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # nothing copied yet
        return {"blocks_stored": 0, "blocks_checked": 0}


class HostCopyWorker(OffloadingWorker):
    def __init__(self, kv_caches: CanonicalKVCaches, blocks_per_chunk: int, num_chunks: int,
                 throttle: float = 1.0, verify: Path | None = None):
        self.blocks_per_chunk = blocks_per_chunk
        # verify (the file its counts go to): (tensor, chunk, slot) -> digest of the page stored there;
        # `checks`: blocks stored, blocks checked at load, and differences by kind (host: the pool's bytes
        # changed since the store; loaded: the engine's page after the copy; never_stored: a slot no store wrote)
        self.report = verify
        self.stored: dict[tuple[int, int, int], bytes] | None = {} if verify else None
        self.checks: Counter[str] = Counter({"blocks_stored": 0, "blocks_checked": 0})
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
                if self.stored is not None:
                    self._record(t_idx, chunks, slots, host[chunks, slots])
            else:
                if self.stored is not None:
                    self._check(t_idx, chunks, slots, host[chunks, slots], "host")
                engine.index_copy_(0, rows, host[chunks, slots])
                if self.stored is not None:
                    self._check(t_idx, chunks, slots, engine.index_select(0, rows), "loaded")
            moved += len(rows) * engine.shape[1]
        if self.report is not None:
            self._write_report()
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

    def _record(self, t_idx: int, chunks, slots, pages: torch.Tensor) -> None:
        for c, s, page in zip(chunks.tolist(), slots.tolist(), pages):
            self.stored[(t_idx, c, s)] = _digest(page)
        self.checks["blocks_stored"] += len(pages)

    def _check(self, t_idx: int, chunks, slots, pages: torch.Tensor, what: str) -> None:
        for c, s, page in zip(chunks.tolist(), slots.tolist(), pages):
            kept = self.stored.get((t_idx, c, s))
            if kept is None:
                self.checks["never_stored"] += what == "host"  # counted once, before the copy
            elif kept != _digest(page):
                self.checks[what] += 1
        if what == "loaded":
            self.checks["blocks_checked"] += len(pages)

    def _write_report(self) -> None:
        partial = self.report.with_suffix(".tmp")
        partial.write_text(json.dumps(self.checks))
        os.replace(partial, self.report)  # the reader never sees half a file

    def shutdown(self) -> None:
        if self.report is not None:
            self.report.unlink(missing_ok=True)

    def get_finished(self) -> list[TransferResult]:
        done, self._finished = self._finished, []
        return done

    def wait(self, job_ids: set[int]) -> None:
        return  # every transfer completed when it was submitted


def _digest(page: torch.Tensor) -> bytes:
    return hashlib.blake2b(page.contiguous().numpy().tobytes(), digest_size=16).digest()
