"""The LLM replica: Ray's `LLMServer` running vLLM with agentserve's scheduler plugin, joined to the
shared control plane (control_plane.py).

- its engine client is wrapped in the embedded server's `ProgramEngineClient`, with `RemoteControl`
  (remote.py) as the control: every program call is tracked and given its TTL by the one control plane;
- a sync task pulls the commands queued for this replica (end, release) and pushes its pin stats and
  load (free KV blocks, queue) every `SYNC_S`, and its Prometheus page (vLLM's metrics) every
  `METRICS_EVERY` syncs;
- every response stream starts with a `ReplicaTag`, which the ingress turns into the
  `x-agentserve-replica` header (and strips), so operators and tests see who served a request;
- `agentserve_scheduler_command` runs a control command on this replica's engine directly (tests, operators).
"""

from __future__ import annotations

import asyncio
import logging

import msgspec
from ray import serve
from ray.serve.llm import LLMServer

from agentserve.rayserve.control_plane import METRICS_EVERY, SYNC_S
from agentserve.rayserve.remote import RemoteControl
from agentserve.server.engine_client import ProgramEngineClient

log = logging.getLogger("agentserve.rayserve")


class ReplicaTag(msgspec.Struct, frozen=True):
    """First item of every response stream of a `ProgramLLMServer`: who serves it."""

    replica_id: str


def program_engine_cls(control: RemoteControl):
    """Ray's vLLM engine class, its engine client wrapped before the OpenAI serving objects see it."""
    from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine

    class ProgramVLLMEngine(VLLMEngine):
        def _start_async_llm_engine(self, *args, **kwargs):
            # the control plane releases every replica's pins at shutdown (app.release_all_pins)
            return ProgramEngineClient(super()._start_async_llm_engine(*args, **kwargs), control,
                                       release_at_shutdown=False)

    return ProgramVLLMEngine


class ProgramLLMServer(LLMServer):
    async def __init__(self, llm_config, *, control_plane=None, measure_reload: bool = False,
                       pins: bool = True, **kwargs):
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._sync_task: asyncio.Task | None = None
        if control_plane is not None:  # the deployment hands out its actor
            control_plane = await control_plane.handle.remote()
        self._control_plane = control_plane
        engine_cls = program_engine_cls(RemoteControl(control_plane, self.replica_id)) if control_plane else None
        await super().__init__(llm_config, engine_cls=engine_cls, **kwargs)
        if control_plane is None:
            return
        reload = None
        if await control_plane.register.remote(self.replica_id, None) and measure_reload:
            reload = await self._measure_reload()
            await control_plane.register.remote(self.replica_id, msgspec.to_builtins(reload))
        self._pins = pins  # the plugin runs (else the sync carries metrics only)
        self._sync_task = asyncio.get_running_loop().create_task(self._sync_loop())
        await control_plane.replica_started.remote(self.replica_id)

    async def _measure_reload(self):
        from agentserve.engine.profiling import measure_reload_profile

        client = self.engine._engine_client
        profile = await measure_reload_profile(client, max_tokens=min(client.model_config.max_model_len - 1, 8192))
        log.info("replica %s reload profile: %s", self.replica_id, profile)
        return profile

    async def _sync_loop(self) -> None:
        from agentserve.observability.exposition import this_process

        events: list[dict] = []
        syncs = done = 0  # done: commands carried out (or failed), so the control plane knows what is pending
        while True:
            await asyncio.sleep(SYNC_S)
            try:
                stats = await self.agentserve_scheduler_command("tick") if self._pins else {}
                stats["events"] = events + stats.get("events", [])
                stats["commands_done"] = done
                if syncs % METRICS_EVERY == 0:  # this replica's vLLM metrics, for the ingress's /metrics
                    stats["metrics"] = this_process()
                syncs += 1
                events = []
                commands = await self._control_plane.sync.remote(self.replica_id, stats)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - keep syncing; the failure is in the log
                log.exception("replica %s: control plane sync failed", self.replica_id)
                continue
            for command, payload in commands:  # one failing command costs only itself
                try:
                    events += (await self.agentserve_scheduler_command(command, payload)).get("events", [])
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001 - the failure is in the log; the pin still expires by TTL
                    log.exception("replica %s: control command %s failed", self.replica_id, command)
                done += 1

    async def agentserve_scheduler_command(self, command: str, payload: dict | None = None) -> dict:
        """`ProgramScheduler.command` on this replica's engine (end / release / tick ...)."""
        client = getattr(self.engine, "_engine_client", None) if self.engine is not None else None
        if client is None:
            raise RuntimeError("the replica's vLLM engine is not started")
        return await client.engine_core.call_utility_async("agentserve_scheduler_command", command, payload or {})

    async def chat(self, request, raw_request_info=None):
        return self._tagged(await super().chat(request, raw_request_info))

    async def completions(self, request, raw_request_info=None):
        return self._tagged(await super().completions(request, raw_request_info))

    async def _tagged(self, stream):
        yield ReplicaTag(self.replica_id)
        async for item in stream:
            yield item
