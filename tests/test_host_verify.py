"""The host tier's exactness check (`--host-verify`, agentserve/hosttier/worker.py) on the copy worker
alone: a block loaded back is checked against the bytes it was stored with, and each kind of difference
is counted (the check must fail when the bytes are wrong)."""

from __future__ import annotations

from pathlib import Path

import torch
from vllm.v1.kv_offload.base import (CanonicalKVCacheRef, CanonicalKVCaches, CanonicalKVCacheTensor,
                                     GPULoadStoreSpec)
from vllm.v1.kv_offload.cpu.common import CPULoadStoreSpec

from agentserve.hosttier import worker as module
from agentserve.hosttier.worker import HostCopyWorker

BLOCKS, PAGE, BPC, CHUNKS = 16, 64, 2, 8


def copy_worker(report: Path | None) -> tuple[HostCopyWorker, torch.Tensor]:
    kv = torch.randint(-128, 127, (BLOCKS, PAGE), dtype=torch.int8)
    caches = CanonicalKVCaches([CanonicalKVCacheTensor(kv, PAGE)], [[CanonicalKVCacheRef(0, PAGE)]])
    return HostCopyWorker(caches, BPC, CHUNKS, verify=report), kv


def store(w: HostCopyWorker, blocks: list[int], chunks: list[int], first: int = 0) -> None:
    w.submit_store(1, GPULoadStoreSpec(blocks, [len(blocks)], [first]), CPULoadStoreSpec(chunks))


def load(w: HostCopyWorker, blocks: list[int], chunks: list[int], first: int = 0) -> None:
    w.submit_load(2, CPULoadStoreSpec(chunks), GPULoadStoreSpec(blocks, [len(blocks)], [first]))


def test_blocks_loaded_back_equal_the_bytes_stored(monkeypatch, tmp_path):
    monkeypatch.setattr(module.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(module, "_reports", None)  # restored after the test
    engine = "test-engine"
    module.expect_reports(module.report_path(engine))
    assert module.verification() == {"blocks_stored": 0, "blocks_checked": 0}  # nothing copied yet
    w, kv = copy_worker(module.report_path(engine))
    original = kv[[0, 1, 2, 3]].clone()
    store(w, [0, 1, 2, 3], [5, 6])  # a request's first 4 blocks: 2 chunks of 2
    kv[[0, 1, 2, 3]] = 0  # the device reuses those blocks
    load(w, [9, 10, 11, 12], [5, 6])  # the same request's blocks come back elsewhere on the device
    assert torch.equal(kv[[9, 10, 11, 12]], original)
    assert w.checks == {"blocks_stored": 4, "blocks_checked": 4}  # no difference of any kind
    assert module.verification() == w.checks  # what the scheduler reads, from the worker's process
    w.shutdown()
    assert not module.report_path(engine).exists()


def test_every_kind_of_difference_is_counted(tmp_path):
    w, kv = copy_worker(tmp_path / "report.json")
    store(w, [0, 1, 2, 3], [5, 6])
    w.host[0][6, 1] += 1  # the pool's copy of block 3 changed after the store
    load(w, [9, 10, 11, 12], [5, 6])
    assert w.checks["host"] == 1 and w.checks["loaded"] == 1
    load(w, [9, 10], [7])  # a chunk no store wrote
    assert w.checks["never_stored"] == 2


def test_without_verify_nothing_is_kept():
    w, kv = copy_worker(None)
    store(w, [0, 1], [0])
    load(w, [2, 3], [0])
    assert w.stored is None and w.report is None and torch.equal(kv[2], kv[0])
