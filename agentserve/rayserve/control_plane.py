"""The program control plane of a Ray Serve app: one deployment that the ingress, the request router
and every LLM replica share, so there is one tracker, one tool-duration predictor, one TTL policy
state and one program -> replica map, not a copy per replica that drifts.

Design: the embedded server's `ControlPlane` runs here unchanged; only its engine link differs.
Pins live inside each replica's scheduler, so a command about a program (end, release) goes to the
replica that served the program's last turn (its home, from `ProgramAffinity`). The link does not
call replicas: commands wait in a per-replica outbox and every replica pulls its own when it syncs
(every `SYNC_S`), handing over its pin stats and load at the same time. The trade-off: an end or a
release reaches the engine up to `SYNC_S` late (pins still expire on time, inside the engine), in
exchange for no calls from here into replicas that may be dead or restarting, and no replica
handles to keep. So a replica's stats say how many commands it has yet to carry out
(`commands_pending`): 0 means they reflect every end and release sent to it. The router asks `place`
for every program request (one small call per LLM call), which keeps routers in several ingress
processes consistent by construction.

Methods answering the HTTP routes return `{"ok": value}` or `{"error": [status, message]}` rather
than raising: an exception crossing Ray loses its type, and a client error must stay a 4xx.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from agentserve.programs.control import LocalControl, ControlPlane
from agentserve.programs.fields import ProgramFields
from agentserve.programs.tracker import ProgramError, ProgramTracker
from agentserve.routing.affinity import ProgramAffinity, ReplicaLoad
from agentserve.observability.events import program_events
from agentserve.options import ProgramOptions
from agentserve.server import metrics
from agentserve.server.tenants import TenantGate, ttl_caps, under_limit
from agentserve.policies import POLICIES, make_ttl
from agentserve.ttl.policy import OnlineBenefit
from agentserve.ttl.predictor import ToolDurationPredictor
from agentserve.ttl.reload import ReloadProfile

log = logging.getLogger("agentserve.rayserve")

# How often replicas sync (pull commands, push stats) and the control plane ticks (reaps abandoned
# programs): the same 0.2 s as the embedded server's tick, so a release is as timely on both paths.
SYNC_S = 0.2
# A replica that synced before and then stayed silent this long is left out of the cluster's stats
# (killed, node lost, or stalled). Only the router's report of its death forgets it (its queued
# commands and programs): a stalled replica that syncs again is back, with nothing lost. 50 sync
# periods: a replica's event loop stalls for seconds on a saturated machine.
REPLICA_SILENT_S = 10.0
# Engine events kept between two stats reads: the embedded scheduler's own bound.
MAX_EVENTS = 4096
# Replicas send their Prometheus page every this many syncs (the ingress's /metrics merges them).
METRICS_EVERY = 10
# Stats summed over replicas in the cluster view.
_SUMMED = ("pins", "pinned_blocks", "pin_cap_blocks", "programs", "free_blocks", "total_blocks", "queued",
           "commands_pending")


class ClusterControlPlane:
    def __init__(self, options: dict, replicas: int = 1, model: str = ""):
        self.options = msgspec.convert(options, ProgramOptions)
        self.expected_replicas = replicas
        self.started: set[str] = set()  # replicas that finished starting, ever
        self.affinity = ProgramAffinity()
        self.outbox: dict[str, list[tuple[str, dict]]] = {}
        self.sent: dict[str, int] = {}  # replica -> commands queued for it, ever (its stats count those done)
        self.replicas: dict[str, dict] = {}  # replica -> its last stats (without events)
        self.last_sync: dict[str, float] = {}  # replica -> monotonic time of its last sync
        self.events: list[dict] = []
        self.metrics: dict[str, str] = {}  # replica -> its last Prometheus page
        predictor, benefit = ToolDurationPredictor(), OnlineBenefit()
        policy = None
        described = POLICIES[self.options.policy]
        if described.plugin and not described.reload_profile:
            policy = self._policy(None, predictor, benefit)
        # a rule that needs the reload profile measured on a replica's engine gets it on registration
        link = self._link if described.plugin else None
        on_event, tracer = program_events(self.options, model)
        # tenants' TTL limits; the gate's secret salts nothing here (the ingress salts the cache)
        cap = ttl_caps(TenantGate(self.options.tenants)) if self.options.tenants is not None else None
        self.control = ControlPlane(ProgramTracker(self.options.idle_timeout_s), predictor, policy, link,
                                      benefit, on_event=on_event, tracer=tracer, ttl_cap=cap)
        self.local = LocalControl(self.control)
        self._ticker: asyncio.Task | None = None

    def _policy(self, reload: ReloadProfile | None, predictor, benefit):
        o = self.options
        return make_ttl(o.policy, predictor=predictor, reload=reload, benefit=benefit,
                        fixed_ttl_s=o.fixed_ttl_s, max_ttl_s=o.max_ttl_s)

    async def start(self) -> None:
        """Tick in the background (abandoned programs end, their pins are released, the metrics of
        this process are refreshed), as the single server's control plane does."""
        from agentserve.server.program_routes import tick_loop

        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(tick_loop(self.control))

    # ---- replicas -----------------------------------------------------------------------------
    def register(self, replica_id: str, reload: dict | None) -> bool:
        """A replica started. Returns whether the policy still needs its measured reload profile."""
        self.replicas.setdefault(replica_id, {})
        if POLICIES[self.options.policy].reload_profile and self.control.policy is None:
            if reload is None:
                return True
            c = self.control
            c.policy = self._policy(msgspec.convert(reload, ReloadProfile), c.predictor, c.benefit)
            log.info("TTL policy uses the reload profile measured on replica %s", replica_id)
        return False

    def replica_started(self, replica_id: str) -> None:
        self.started.add(replica_id)

    def ready(self) -> bool:
        """The app has started: every configured replica finished starting once. A latch: a replica
        lost later costs capacity, not readiness (Serve replaces it)."""
        return len(self.started) >= self.expected_replicas

    def sync(self, replica_id: str, stats: dict) -> list[tuple[str, dict]]:
        """A replica's periodic report; returns the commands queued for it."""
        events = stats.pop("events", [])
        if "metrics" in stats:
            self.metrics[replica_id] = stats.pop("metrics")
        self.events.extend(events[: max(0, MAX_EVENTS - len(self.events))])
        self.replicas[replica_id] = stats
        self.last_sync[replica_id] = time.monotonic()
        if stats.get("total_blocks"):
            self.affinity.report([ReplicaLoad(replica_id, stats["free_blocks"], stats["total_blocks"],
                                              stats["queued"])])
        return self.outbox.pop(replica_id, [])

    def replica_gone(self, replica_id: str) -> list[str]:
        """A replica died or was removed: its pins died with it; its programs move on their next call."""
        self.replicas.pop(replica_id, None)
        self.outbox.pop(replica_id, None)
        self.sent.pop(replica_id, None)
        self.last_sync.pop(replica_id, None)
        log.info("replica %s gone; its programs move on their next call", replica_id)
        return self.affinity.replica_gone(replica_id)

    def live(self) -> dict[str, dict]:
        """Replicas' last stats, without those silent for longer than REPLICA_SILENT_S, each with the
        commands it has not carried out yet when it reported (queued since, or handed over then)."""
        now = time.monotonic()
        return {r: {**{k: v for k, v in s.items() if k != "commands_done"},
                    "commands_pending": self.sent.get(r, 0) - s.get("commands_done", 0)}
                for r, s in self.replicas.items() if now - self.last_sync.get(r, now) <= REPLICA_SILENT_S}

    # ---- router -------------------------------------------------------------------------------
    def place(self, program_id: str | None, candidates: list[str]) -> list[str]:
        placement = self.affinity.place(program_id, candidates)
        metrics.ROUTING.labels(placement.decision).inc()
        return placement.ranked

    # ---- LLM calls (from the replica serving them) ---------------------------------------------
    def begin_call(self, replica_id: str, fields: bytes, prompt_tokens: int, max_tokens: int) -> dict:
        decoded = msgspec.json.decode(fields, type=ProgramFields)
        previous = self.affinity.served(decoded.program_id, replica_id)
        if previous is not None:
            metrics.ROUTING.labels("fallback").inc()
        if previous is not None and previous in self.replicas:  # served elsewhere: the old pin is useless
            self._queue(previous, "release", {"program_id": decoded.program_id, "reason": "moved"})
        return self.control.begin_call(decoded, prompt_tokens, max_tokens)

    def first_token(self, program_id: str, turn: int, ttft_s: float, prompt_tokens: int,
                    cached_tokens: int | None) -> None:
        self.control.first_token(program_id, turn, ttft_s, prompt_tokens, cached_tokens)

    def end_call(self, program_id: str, context_tokens: int, life: int | None = None) -> None:
        self.control.end_call(program_id, context_tokens, life)

    async def abort_call(self, program_id: str, life: int | None = None) -> None:
        await self.control.abort_call(program_id, life)

    # ---- program routes (from the ingress) -----------------------------------------------------
    async def tool_event(self, program_id: str, name: str, event: str, duration_s: float | None) -> dict:
        return await self._answer(lambda: self.local.tool_event(program_id, name, event, duration_s))

    async def end_program(self, program_id: str) -> dict:
        return await self._answer(lambda: self.local.end_program(program_id))

    async def describe(self, program_id: str) -> dict:
        return await self._answer(lambda: self.local.describe(program_id))

    async def stats(self) -> dict:
        answer = await self._answer(self.local.stats)
        answer["ok"]["replicas"] = {r: {k: v for k, v in s.items() if k != "counters"} for r, s in self.live().items()}
        answer["ok"]["routed_programs"] = len(self.affinity.home)
        return answer

    async def shutdown(self) -> dict:
        return await self._answer(self.local.shutdown)

    def metrics_pages(self) -> dict[str, str]:
        """Prometheus pages of this process and of every live replica (their last)."""
        from agentserve.observability.exposition import this_process

        live = self.live()
        return {"control-plane": this_process(), **{r: page for r, page in self.metrics.items() if r in live}}

    def admit(self, program_id: str, tenant: str, max_programs: int) -> bool:
        """The tenant gate's program limit, for an ingress."""
        return under_limit(self.control, tenant, max_programs, program_id)

    @staticmethod
    async def _answer(call: Callable[[], Awaitable[Any]]) -> dict:
        """`{"ok": value}`, or `{"error": [status, message]}` for a client error (see the docstring)."""
        try:
            return {"ok": await call()}
        except ProgramError as e:
            return {"error": [e.status, str(e)]}

    # ---- the engine link of ControlPlane -----------------------------------------------------
    async def _link(self, command: str, payload: dict) -> dict:
        program = payload.get("program_id")
        if command == "release_all":
            for replica in self.replicas:
                self._queue(replica, command, payload)
        elif program is not None:
            home = self.affinity.home.get(program)
            if home is not None:
                self._queue(home, command, payload)
            if command == "end":
                self.affinity.end(program)
        elif command != "tick":
            raise ValueError(f"unknown agentserve control command {command!r}")
        return self._merged()

    def _queue(self, replica_id: str, command: str, payload: dict) -> None:
        self.outbox.setdefault(replica_id, []).append((command, payload))
        self.sent[replica_id] = self.sent.get(replica_id, 0) + 1

    def _merged(self) -> dict:
        """The cluster's pin stats: replica stats summed, the events reported since the last read."""
        live = self.live()
        merged: dict[str, Any] = {k: sum(s.get(k, 0) for s in live.values()) for k in _SUMMED}
        counters: dict[str, int] = {}
        for s in live.values():
            for k, v in s.get("counters", {}).items():
                counters[k] = counters.get(k, 0) + v
        merged["counters"] = counters
        merged["events"], self.events = self.events, []
        return merged



NAMESPACE = "agentserve"


def actor_name(app_name: str) -> str:
    return f"control-plane:{app_name}"


class ControlPlaneDeployment:
    """The Serve deployment that owns the control plane: a named Ray actor (an asyncio actor, so its
    methods run one at a time), created with the application and gone with it. Callers talk to the
    actor, not through Serve: a request router awaits it from Serve's router event loop, where a
    Serve handle call never completes, while an actor call is awaitable from any loop."""

    async def __init__(self, options: dict, replicas: int, model: str):
        import ray
        from ray import serve

        name = actor_name(serve.get_replica_context().app_name)
        self.actor = ray.remote(ClusterControlPlane).options(
            name=name, namespace=NAMESPACE, num_cpus=0, get_if_exists=True).remote(options, replicas, model)
        await self.actor.start.remote()

    def handle(self):
        return self.actor
