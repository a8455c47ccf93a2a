"""The host tier's offloading spec: vLLM's `CPUOffloadingSpec`, with agentserve's copy worker on vLLM-CPU.

Named to vLLM's offloading connector through `kv_connector_extra_config` (`spec_name`,
`spec_module_path`: vLLM's out-of-tree spec seam). On a GPU this is vLLM's spec unchanged (its CUDA
worker, its manager); on vLLM-CPU, where vLLM's worker refuses to start, the worker is
`HostCopyWorker`. The manager, the connector and the cache policy are vLLM's in both cases.
"""

from __future__ import annotations

from vllm.platforms import current_platform
from vllm.v1.kv_offload.base import CanonicalKVCaches, OffloadingWorker
from vllm.v1.kv_offload.cpu.spec import CPUOffloadingSpec

from agentserve.hosttier.worker import HostCopyWorker, expect_reports, report_path


class HostTierSpec(CPUOffloadingSpec):
    def get_worker(self, kv_caches: CanonicalKVCaches) -> OffloadingWorker:
        if current_platform.is_cuda_alike() or current_platform.is_xpu():
            self._verify  # noqa: B018 - refuses --host-verify here
            return super().get_worker(kv_caches)
        if self._worker is None:
            if self.config.canonical_layout:
                raise ValueError("the host tier on vLLM-CPU copies whole pages; canonical_layout is not supported")
            self._worker = HostCopyWorker(kv_caches, self.blocks_per_chunk, self.num_chunks,
                                          throttle=float(self.extra_config.get("copy_throttle", 1.0)),
                                          verify=report_path(self.config.engine_id) if self._verify else None)
        return self._worker

    def get_manager(self):
        if self._verify:  # the scheduler's stats report what the copy worker verified (worker.py)
            expect_reports(self.config.engine_id)
        return super().get_manager()

    @property
    def _verify(self) -> bool:
        if not self.extra_config.get("verify", False):
            return False
        if current_platform.is_cuda_alike() or current_platform.is_xpu():
            raise ValueError("--host-verify checks vLLM-CPU's copy worker; on this device vLLM's own worker copies")
        return True
