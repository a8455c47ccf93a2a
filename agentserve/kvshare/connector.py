"""KV sharing in the served path: a vLLM KV connector (`KVConnectorBase_V1`) around `SharePlanner`.

The connector is a thin adapter; every decision is the planner's (planner.py). KV never leaves the
process that holds the paged cache:
- worker side (the model runner's process, where the paged cache is): the planner with its segment
  store and anchor pools. `start_load_kv` builds each claimed plan and writes it into the paged cache
  before the forward pass; `wait_for_save` reads produced and recorded prompts' KV out of the cache
  after it and hands it to the planner. `build_connector_worker_meta` returns what the planner knows
  now (`ShareKnowledge`: keys, token lists and counts, no KV) and which claimed plans it could not build.
- scheduler side (engine core process): `get_num_new_matched_tokens` runs the planner's `decide` on
  its tensor-free copy of that knowledge (`ShareIndex`) and claims the tokens after the locally cached
  prefix as external, so vLLM prefills only the rest; `build_connector_meta` sends token ids, specs and
  slots. A plan the worker cannot build (the copy lagged, or the anchor pool refused on the values) is
  reported as failed loads of its blocks and vLLM recomputes them (`kv_load_failure_policy`
  "recompute"); the request is then recorded, as it would have been had the refusal been known.

Blocks filled with reused KV enter vLLM's prefix cache under their token hashes like any other, so the
front end salts sharing consumers' prompts (`cache_salt`): approximate KV never serves a prompt that
did not ask for sharing. Only DroidSpeak's partial recompute is not expressible here (docs/kvshare.md).

Paged cache layouts (`PagedLayout`): vLLM 0.32 gives every attention layer a logical [blocks, kv_heads,
block_tokens, 2 * head_dim] view (keys then values in the last dimension), whatever the physical order
(NHD or HND, layer- or block-major: RFC #42082), and GPU backends (FlashAttention, FlashInfer, Triton)
read it through that view; vLLM-CPU's `vec` kernel packs a block differently (below). fp8/fp4 caches
and MLA's latent cache are refused at start-up, as is tensor parallelism (each worker would hold a
share of the heads, and the planner needs them all).
"""

from __future__ import annotations

import logging
from collections import Counter
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
from agentserve.kvshare.index import ShareIndex, ShareKnowledge, describe
from agentserve.kvshare.planner import RECORDING, REUSE, SharePlanner, ShareSpec, decide, decode_spec

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
            "kv_load_failure_policy": "recompute",  # a plan the worker cannot build is recomputed
            "kv_connector_extra_config": {"store_bytes": store_bytes, "temperature": temperature,
                                          "entropy_gamma": str(entropy_gamma),  # JSON has no inf
                                          "correction": correction}}


def slots(block_ids: list[int], start: int, stop: int, block_size: int) -> torch.Tensor:
    """Slot numbers of token positions [start, stop) of a request holding `block_ids`."""
    pos = torch.arange(start, stop)
    return torch.tensor(block_ids, dtype=torch.long)[pos // block_size] * block_size + pos % block_size


@dataclass
class ShareLoad:
    req_id: str
    spec: ShareSpec
    tokens: list[int]  # the prompt
    start: int  # its locally cached prefix: the plan covers [start, start + len(slots))
    slots: torch.Tensor


@dataclass
class ShareSave:
    req_id: str
    spec: ShareSpec
    tokens: list[int]  # the prompt's first len(slots) tokens, whose KV the planner gets
    slots: torch.Tensor


@dataclass
class ShareConnectorMeta(KVConnectorMetadata):
    loads: list[ShareLoad] = field(default_factory=list)
    saves: list[ShareSave] = field(default_factory=list)


@dataclass
class ShareReport(KVConnectorWorkerMetadata):
    refused: dict[str, bool] = field(default_factory=dict)  # request id -> record it (its plan was not built)
    known: ShareKnowledge | None = None  # the planner's knowledge, when it changed

    def aggregate(self, other: ShareReport) -> ShareReport:
        newer = max((self.known, other.known), key=lambda k: k.version if k else -1)
        return ShareReport({**self.refused, **other.refused}, newer)


class PagedLayout:
    """Reads and writes token slots of one layer's paged KV cache as [kv_heads, tokens, head_dim].

    The view is [blocks, heads, block_tokens, 2 * head_dim], indexed logically, so any physical
    stride order reads right. A block's tokens are the view's own (a kernel block may be a part of the
    scheduler's block, which is split into consecutive kernel blocks, so slot // tokens still finds it).
    `cpu`: vLLM-CPU's `vec` kernel (x86, fp32) keeps, inside each (block, head), the block's keys
    transposed, [head_dim][block_size], then its values, [block_size][head_dim] (found by matching
    saved KV against HF's: reading keys as rows scrambles them, which a read-write round trip hides;
    tests/test_kvshare_layout.py checks this against the kernel that writes the cache)."""

    def __init__(self, cache: torch.Tensor, head_size: int, cpu: bool):
        if cache.dim() != 4 or cache.shape[3] != 2 * head_size:
            raise ValueError(f"paged KV view {tuple(cache.shape)} is not [blocks, heads, tokens, 2 x {head_size}]: "
                             "KVShareConnector reads unquantized, non-MLA caches only")
        b, h, self.block_size, _ = cache.shape
        d = head_size
        self.cpu = cpu
        if cpu:
            flat = cache.view(b, h, 2, self.block_size * d)
            self.keys = flat[:, :, 0].view(b, h, d, self.block_size)  # [block, head, dim, token]
            self.values = flat[:, :, 1].view(b, h, self.block_size, d)  # [block, head, token, dim]
        else:
            self.keys, self.values = cache[..., :d], cache[..., d:]  # [block, head, token, dim] each

    def read(self, s: torch.Tensor) -> torch.Tensor:
        """[2, heads, n, dim] of slots `s`."""
        s = s.to(self.values.device)
        b, o = s // self.block_size, s % self.block_size
        k = self.keys[b, :, :, o] if self.cpu else self.keys[b, :, o]  # [n, H, D]
        return torch.stack([k, self.values[b, :, o]]).transpose(1, 2)

    def write(self, s: torch.Tensor, kv: torch.Tensor) -> None:
        s = s.to(self.values.device)
        b, o = s // self.block_size, s % self.block_size
        k, v = (x.transpose(0, 1).to(self.values.device, self.values.dtype) for x in kv)  # [n, H, D]
        if self.cpu:
            self.keys[b, :, :, o] = k
        else:
            self.keys[b, :, o] = k
        self.values[b, :, o] = v


def check_engine(vllm_config) -> None:
    """Refuse, at start-up, an engine whose KV this connector cannot read whole or right."""
    if vllm_config.parallel_config.tensor_parallel_size != 1:
        raise ValueError("KV sharing (--kvshare) needs tensor_parallel_size 1: with tensor parallelism each "
                         "worker holds a share of the KV heads, and a shared segment's KV needs all of them")
    if vllm_config.parallel_config.pipeline_parallel_size != 1:
        raise ValueError("KV sharing (--kvshare) needs pipeline_parallel_size 1 (a worker holds every layer)")
    if vllm_config.cache_config.cache_dtype not in ("auto", vllm_config.model_config.dtype):
        raise ValueError(f"KV sharing (--kvshare) reads unquantized KV; the cache dtype is "
                         f"{vllm_config.cache_config.cache_dtype!r}")
    if getattr(vllm_config.model_config, "use_mla", False):
        raise ValueError("KV sharing (--kvshare) cannot move MLA's latent KV (RoPE is applied to part of it)")


def check_cpu_layout(vllm_config) -> None:
    """The CPU layout above is the `vec` kernel's; refuse the others (AMX bf16, vec16, NEON, ...)."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    model = vllm_config.model_config
    isa = _get_attn_isa(model.dtype, vllm_config.cache_config.block_size, model.get_head_size(),
                        vllm_config.cache_config.cache_dtype)
    if isa != "vec":
        raise ValueError(f"KVShareConnector reads vLLM-CPU's 'vec' KV layout only; this engine uses {isa!r}")


def build_planner(vllm_config, extra: dict) -> SharePlanner:
    from transformers import AutoConfig

    from agentserve.kvshare.rope import RopeShift
    from agentserve.kvshare.segments import SegmentStore

    model = vllm_config.model_config.model
    return SharePlanner(model, RopeShift(AutoConfig.from_pretrained(model)),
                        SegmentStore(int(extra.get("store_bytes", DEFAULT_STORE_BYTES))),
                        correction=str(extra.get("correction", "anchors")),
                        temperature=float(extra.get("temperature", 1.0)),
                        entropy_gamma=float(extra.get("entropy_gamma", ENTROPY_GAMMA)))


class KVShareConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        check_engine(vllm_config)
        self.block_size = vllm_config.cache_config.block_size
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        if role == KVConnectorRole.SCHEDULER:
            self.index = ShareIndex(vllm_config.model_config.model, str(extra.get("correction", "anchors")))
            self.counts: Counter[str] = Counter()  # decisions made here (those the worker makes are in its stats)
            self._planned: dict[str, tuple[ShareSpec, list[int], int]] = {}  # claimed, waiting for blocks
            self._loads: dict[str, tuple[ShareSpec, list[int], int, int]] = {}  # + tokens claimed: load next step
            self._loading: dict[str, tuple[ShareSpec, list[int]]] = {}  # sent; the worker may refuse
            self._to_save: dict[str, tuple[ShareSpec, list[int], int]] = {}  # (spec, tokens, tokens to save)
            self._manager = None
        else:
            from vllm.platforms import current_platform

            self._cpu = current_platform.is_cpu()
            if self._cpu:
                check_cpu_layout(vllm_config)
            self._head_size = vllm_config.model_config.get_head_size()
            self.planner = build_planner(vllm_config, extra)
            self._layouts: list[PagedLayout] = []
            self._refused: dict[str, bool] = {}
            self._failed_blocks: set[int] = set()
            self._version = 0
            self._changed = False

    # ---- scheduler side ------------------------------------------------------------------------
    def bind_kv_cache_manager(self, kv_cache_manager) -> None:
        self._manager = kv_cache_manager

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        try:
            spec = decode_spec(request.kv_transfer_params)
            if spec is None:
                return 0, False
            tokens = list(request.prompt_token_ids or [])
            spec.check(len(tokens))
        except (msgspec.ValidationError, ValueError) as e:  # the front end validates; a direct client may not
            log.warning("request %s: ignoring invalid %s: %s", request.request_id, "agentserve_share", e)
            return 0, False
        if spec.produce:
            self._to_save[request.request_id] = (spec, tokens, len(tokens))
            return 0, False
        reason = decide(spec, tokens, num_computed_tokens, self.index)
        log.debug("request %s: %s", request.request_id, reason)
        if reason in RECORDING:
            self._to_save[request.request_id] = (spec, tokens, spec.end)
        if reason != REUSE:
            self.counts[reason] += 1
            self._planned.pop(request.request_id, None)
            return 0, False
        self._planned[request.request_id] = (spec, tokens, num_computed_tokens)
        return spec.end - num_computed_tokens, False

    def update_state_after_alloc(self, request: Request, blocks, num_external_tokens: int) -> None:
        planned = self._planned.pop(request.request_id, None)
        if planned is not None and num_external_tokens > 0:
            self._loads[request.request_id] = (*planned, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = ShareConnectorMeta()
        for req in scheduler_output.scheduled_new_reqs:
            load = self._loads.pop(req.req_id, None)
            if load is not None:
                spec, tokens, start, n = load
                meta.loads.append(ShareLoad(req.req_id, spec, tokens, start,
                                            slots(req.block_ids[0], start, start + n, self.block_size)))
                self._loading[req.req_id] = (spec, tokens)
        computed = {r.req_id: r.num_computed_tokens for r in scheduler_output.scheduled_new_reqs}
        cached = scheduler_output.scheduled_cached_reqs
        computed.update(zip(cached.req_ids, cached.num_computed_tokens))
        for req_id, (spec, tokens, n) in list(self._to_save.items()):
            done = computed.get(req_id, -1) + scheduler_output.num_scheduled_tokens.get(req_id, 0)
            if req_id in computed and done >= n:
                block_ids = self._manager.get_block_ids(req_id)[0]
                meta.saves.append(ShareSave(req_id, spec, tokens[:n], slots(block_ids, 0, n, self.block_size)))
                del self._to_save[req_id]
        self._loads.clear()  # a claimed load whose request was not scheduled is planned again
        return meta

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        report = connector_output.kv_connector_worker_meta
        if not isinstance(report, ShareReport):
            return
        if report.known is not None:
            self.index.update(report.known)
        for req_id, record in report.refused.items():  # its blocks are recomputed (failed loads)
            self.counts["recomputed"] += 1
            entry = self._loading.pop(req_id, None)
            if entry is not None and record:
                self._to_save[req_id] = (*entry, entry[0].end)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        for table in (self._planned, self._loads, self._loading, self._to_save):
            table.pop(request.request_id, None)
        return False, None

    def stats(self) -> dict:
        """The worker planner's stats, with the decisions made here added."""
        stats = dict(self.index.known.stats) or {"decisions": {}, "tokens_reused": 0, "segments": 0,
                                                  "segment_bytes": 0, "templates": 0, "anchors": 0}
        stats["decisions"] = dict(Counter(stats["decisions"]) + self.counts)
        return stats

    # ---- worker side ---------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.model_executor.models.utils import extract_layer_index

        names = sorted(kv_caches, key=extract_layer_index)
        self._layouts = [PagedLayout(kv_caches[n], self._head_size, self._cpu) for n in names]

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        for load in meta.loads:
            n = len(load.slots)
            decision = self.planner.plan(load.spec, load.tokens, load.start)
            self._changed = True
            if decision.plan is None or decision.plan.kv.shape[3] < n:
                self._refused[load.req_id] = decision.record
                self._failed_blocks.update((load.slots // self.block_size).tolist())
                continue
            for layout, layer_kv in zip(self._layouts, decision.plan.kv[:, :, :, :n], strict=True):
                layout.write(load.slots, layer_kv)

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are written whole before the forward pass

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        return  # saved whole after the forward pass (wait_for_save)

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        for save in meta.saves:
            kv = torch.stack([layout.read(save.slots) for layout in self._layouts]).to("cpu", torch.float32)
            self.planner.saved(save.spec, save.tokens, kv)
            self._changed = True

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        if not (self._changed or self._refused):
            return None
        known = None
        if self._changed:
            self._version += 1
            known = describe(self.planner, self._version)
        report, self._refused, self._changed = ShareReport(self._refused, known), {}, False
        return report


@utilities.register
def agentserve_kvshare_stats(core) -> dict:
    connector = getattr(core.scheduler, "connector", None)
    # alone, or next to the host tier's connector inside vLLM's MultiConnector
    for c in getattr(connector, "_connectors", None) or [connector]:
        if isinstance(c, KVShareConnector):
            return c.stats()
    raise RuntimeError("the engine does not run agentserve's KVShareConnector")
