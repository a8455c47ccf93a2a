"""The LLM replica: Ray's `LLMServer` plus agentserve's control call into its engine's scheduler
plugin (pin stats, release, end), so a router or control plane can act on one replica's pins."""

from __future__ import annotations

from ray.serve.llm import LLMServer


class ProgramLLMServer(LLMServer):
    async def agentserve_control(self, command: str, payload: dict | None = None) -> dict:
        """`ProgramScheduler.agentserve_control` on this replica's engine (end / release / tick ...)."""
        client = getattr(self.engine, "_engine_client", None) if self.engine is not None else None
        if client is None:
            raise RuntimeError("the replica's vLLM engine is not started")
        return await client.engine_core.call_utility_async("agentserve_control", command, payload or {})
