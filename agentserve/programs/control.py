"""The program control plane: tracker, tool-duration predictor and TTL policy behind one small API.

`ControlPlane` is called at every program event; it decides each turn's TTL and tells the engine
(`EngineLink`: the scheduler plugin's control utility) what to release. It holds no engine objects, so
it is tested with a fake link. With `--policy vllm` the link is None: programs are still tracked (the
API is the same) but nothing is pinned.

The front ends reach it through one interface, `Control`: in process (`LocalControl`, the embedded
server) or across Ray (`agentserve.rayserve.remote.RemoteControl`, a replica's engine client and the
ingress's routes, answered by the one control plane actor). Every method returns an awaitable, and its
effect happens when it is called (a remote call is sent then): a caller that does not need the answer
(an LLM call's end) hands the awaitable to a task instead of waiting on it.
"""

from __future__ import annotations

import logging
import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from agentserve.programs.fields import (JOIN_TOOL, XARG_DEPTH, XARG_LIFE, XARG_NEXT_USE, XARG_REMAINING, XARG_TTL,
                                       XARG_TURN, XARG_WORKFLOW, ProgramFields, to_xargs)
from agentserve.programs.remaining import RemainingWork
from agentserve.programs.tracker import Program, ProgramTracker
from agentserve.ttl.policy import OnlineBenefit, TTLPolicy, decide
from agentserve.ttl.predictor import ToolDurationPredictor

log = logging.getLogger("agentserve.programs")

# An inferred program (no client will end it) ends when silent this many times its last tool's p99
# duration, and never sooner than the floor: past that its conversation is most likely over, and a
# program that is not ended keeps its place in the admission gate and its pins.
INFERRED_END_FACTOR = 2.0
INFERRED_END_QUANTILE = 0.99
INFERRED_END_MIN_S = 5.0
# A returning turn that found less than this share of its prompt cached lost its KV: its queueing
# delay feeds T of the TTL rule.
EVICTED_HIT_SHARE = 0.5
# begin_call's answer carries the W3C trace context of the call's span here (when traced), which the
# engine client hands to vLLM as the request's trace headers; it never reaches the engine as an xarg.
TRACEPARENT = "agentserve_traceparent"
# engine control: (command, payload) -> stats dict (see ProgramScheduler.command)
EngineLink = Callable[[str, dict], Awaitable[dict]]


class ControlPlane:
    def __init__(self, tracker: ProgramTracker, predictor: ToolDurationPredictor, policy: TTLPolicy | None,
                 link: EngineLink | None, benefit: OnlineBenefit | None = None,
                 on_event: Callable[[str, dict[str, Any]], None] | None = None, tracer=None,
                 ttl_cap: Callable[[str], float | None] | None = None):
        self.tracker = tracker
        self.predictor = predictor
        self.policy = policy
        self.link = link
        self.benefit = benefit or OnlineBenefit()
        self.on_event = on_event or (lambda kind, data: None)
        self.tracer = tracer  # a ProgramTracer fed by on_event: its call spans' context goes to vLLM
        self.ttl_cap = ttl_cap  # program -> longest TTL it may get (a tenant's limit), None: no cap
        self.remaining = RemainingWork()  # each program's predicted remaining work (the critical path)
        self.last_stats: dict = {}

    @property
    def pins_enabled(self) -> bool:
        return self.policy is not None and self.link is not None

    def begin_call(self, fields: ProgramFields, prompt_tokens: int, max_tokens: int) -> dict:
        """An LLM call of a program arrives: track it, decide the TTL its pin will get.
        Returns the extra_args to attach to the engine request."""
        for run in fields.tools_done or ():
            self._tool_ran(fields.program_id, run.name, run.duration_s)
        turn, gap, gap_tool = self.tracker.llm_start(fields.program_id, turn=fields.turn, tool=fields.tool,
                                                     parent=fields.parent_program_id, inferred=fields.inferred)
        if gap is not None:
            self.predictor.observe(gap_tool, gap, client_measured=False)
        program = self.tracker.programs[fields.program_id]
        tool = fields.tool or program.last_tool
        xargs = to_xargs(fields)
        xargs[XARG_TURN] = turn  # the server's count when the client did not say
        xargs[XARG_WORKFLOW], xargs[XARG_DEPTH] = program.workflow, program.depth
        xargs[XARG_LIFE] = program.life
        xargs[XARG_REMAINING] = float(self.remaining_s(program))
        self.on_event("call_start", {"program": fields.program_id, "turn": turn, "prompt_tokens": prompt_tokens,
                                     "parent": fields.parent_program_id, "last": fields.is_last_turn,
                                     "workflow": program.workflow, "depth": program.depth})
        if self.pins_enabled and not fields.is_last_turn:
            # The request's hints (programs/hints.py judged them applicable here): the client's estimate of
            # this call's tool, its expected output length, the TTL it asked for.
            told = fields.expected_tool_s is not None
            expected = fields.expected_tool_s
            if not told and tool == JOIN_TOOL:  # a join waits for its sub-agents: its expected length is theirs
                expected = self.remaining.seconds(program.depth + 1, 0, self._tool_s(None))
            context = prompt_tokens + (max_tokens if fields.output_tokens is None else min(max_tokens, fields.output_tokens))
            ttl = (min(fields.ttl_s, self.policy.max_ttl_s) if fields.ttl_s is not None
                   else self.policy.ttl(tool, context, expected, told=told))
            cap = self.ttl_cap(fields.program_id) if self.ttl_cap is not None else None
            if cap is not None:
                ttl = min(ttl, cap)
            xargs[XARG_TTL] = float(ttl)
            predicted = self.predictor.predict_mean(tool)
            if self.predictor.trusts(tool, expected, told=told):
                predicted = expected
            if predicted is not None:  # when the program's KV is next needed (the host tier's eviction order)
                xargs[XARG_NEXT_USE] = float(predicted)
            self.on_event("ttl", {"program": fields.program_id, "turn": turn, "tool": tool, "ttl_s": ttl,
                                  "asked_ttl_s": fields.ttl_s, "predicted_tool_s": predicted, "told": told,
                                  "tier": decide(self.policy, ttl, context, False)})
        if self.tracer is not None:
            traceparent = self.tracer.chat_context(fields.program_id).get("traceparent")
            if traceparent:
                xargs[TRACEPARENT] = traceparent
        return xargs

    def remaining_s(self, program: Program) -> float:
        """Predicted seconds of work `program` has left, this call included (the critical-path key)."""
        return self.remaining.seconds(program.depth, max(0, program.llm_calls - 1), self._tool_s(program.last_tool))

    def _tool_s(self, tool: str | None) -> float:
        return self.predictor.predict_mean(tool) or 0.0

    def critical_path(self, program_id: str) -> list[str]:
        """The program and, down its live sub-agents, the one with the most predicted work left at each level."""
        path, p = [program_id], self.tracker.programs.get(program_id)
        while p is not None and p.children:
            live = [self.tracker.programs[c] for c in sorted(p.children) if c in self.tracker.programs]
            if not live:
                break
            p = max(live, key=self.remaining_s)
            path.append(p.program_id)
        return path

    def first_token(self, program_id: str, turn: int, ttft_s: float, prompt_tokens: int,
                    cached_tokens: int | None) -> None:
        """A program's call produced its first token. A returning turn that found most of its prompt
        gone feeds T of the TTL rule (see OnlineBenefit)."""
        self.on_event("first_token", {"program": program_id, "turn": turn, "ttft_s": ttft_s,
                                      "prompt": prompt_tokens, "cached": cached_tokens})
        if turn == 0 or cached_tokens is None or cached_tokens >= EVICTED_HIT_SHARE * prompt_tokens:
            return
        reload = getattr(self.policy, "reload", None)
        self.benefit.observe_evicted_turn(ttft_s, prompt_tokens - cached_tokens, reload)
        self.on_event("evicted_turn", {"program": program_id, "turn": turn, "ttft_s": ttft_s,
                                       "prompt": prompt_tokens, "cached": cached_tokens})

    def ttl_inputs(self) -> dict:
        """What the TTL rule currently works with: T, eta and the measured reload curve."""
        reload = getattr(self.policy, "reload", None)
        host = getattr(self.policy, "host", None)
        return {"T_s": self.benefit.T, "eta": self.benefit.eta,
                "finished_programs": self.benefit.finished_programs,
                "reload_s_per_1k_tokens": reload.seconds(1000) if reload is not None else None,
                "host_load_s_per_1k_tokens": host.seconds(1000) if host is not None else None}

    def end_call(self, program_id: str, context_tokens: int, life: int | None = None) -> None:
        """A call ended; `life`: of the program's life it began in (begin_call's XARG_LIFE)."""
        self.tracker.llm_end(program_id, context_tokens=context_tokens, life=life)
        p = self.tracker.programs.get(program_id)
        if p is not None and (life is None or p.life == life):
            node = p.graph.nodes[p.last_node]
            if node.get("kind") == "llm" and "end" in node:  # (a tool event may have come first)
                self.remaining.observe_call(node["end"] - node["start"])
        self.on_event("call_end", {"program": program_id, "context_tokens": context_tokens})

    def tool_event(self, program_id: str, name: str, event: str, duration_s: float | None) -> float | None:
        if event == "start":
            self.tracker.tool_start(program_id, name)
            self.on_event("tool_start", {"program": program_id, "tool": name})
            return None
        if event == "ran":
            self.tracker.get(program_id)  # 404 for an unknown program, as the other events
            self._tool_ran(program_id, name, duration_s)
            return duration_s
        duration = self.tracker.tool_end(program_id, name, duration_s)
        self._observe_tool(program_id, name, duration)
        return duration

    def _tool_ran(self, program_id: str, name: str, duration_s: float) -> None:
        """A tool call the client reports once it ran (with the program's next call, or on its own).
        Its duration is evidence even when the server no longer knows the program (ended, reaped)."""
        if self.knows(program_id):
            self.tracker.tool_ran(program_id, name, duration_s)
        self._observe_tool(program_id, name, duration_s)

    def _observe_tool(self, program_id: str, name: str, duration_s: float) -> None:
        predicted = self.predictor.predict_mean(name)
        self.predictor.observe(name, duration_s, client_measured=True)
        self.on_event("tool", {"program": program_id, "tool": name, "actual_s": duration_s,
                               "predicted_s": predicted})

    async def end_program(self, program_id: str, reason: str = "program_end") -> None:
        await self._ended(self.tracker.end(program_id), reason)

    async def _ended(self, program: Program, reason: str) -> None:
        self.benefit.observe_finished_program(program.llm_calls)
        self.remaining.observe_program(program.depth, program.llm_calls)
        await self._send("end", {"program_id": program.program_id, "life": program.life})
        self.on_event("program_end", {"program": program.program_id, "reason": reason, "turns": program.llm_calls})

    def live_programs(self, owner: Callable[[str], bool] = lambda program_id: True) -> int:
        return sum(1 for p in self.tracker.programs if owner(p))

    def knows(self, program_id: str) -> bool:
        return program_id in self.tracker.programs

    def lineage_error(self, program_id: str, parent: str) -> tuple[int, str] | None:
        """Why `program_id` may not start as `parent`'s sub-agent (status, message), or None."""
        return self.tracker.lineage_error(program_id, parent)

    def describe(self, program_id: str) -> dict:
        """A program's state and DAG (the `GET /v1/programs/{id}` body)."""
        p = self.tracker.get(program_id)
        return {"program_id": p.program_id, "llm_calls": p.llm_calls, "active_calls": p.active_calls,
                "parent_program_id": p.parent, "children": sorted(p.children), "last_tool": p.last_tool,
                "workflow": p.workflow, "depth": p.depth, "remaining_s": self.remaining_s(p),
                "critical_path": self.critical_path(program_id),
                "nodes": [{"id": n, **d} for n, d in p.graph.nodes(data=True)],
                "edges": [list(e) for e in p.graph.edges]}

    async def stats(self) -> dict:
        """The `GET /v1/agentserve/stats` body: policy, programs, TTL inputs, the engine's pin stats."""
        live = await self.tick() if self.pins_enabled else {}
        return {"policy": self.policy.name if self.policy else "vllm", "programs": len(self.tracker),
                "ttl_inputs": self.ttl_inputs(), "tools": self.predictor.summary(),
                "engine": {k: v for k, v in live.items() if k != "events"}}

    async def abort_call(self, program_id: str, life: int | None = None) -> None:
        await self._send("release", {"program_id": program_id, "reason": "abort", "life": life})

    async def tick(self) -> dict:
        """Periodic: end abandoned programs and inferred ones that fell silent, expire pins in an idle
        engine, fetch engine stats."""
        for program in self.tracker.reap(self._silence_s):
            silent = program.inferred and self.tracker.clock() - program.last_activity <= self.tracker.idle_timeout_s
            await self._ended(program, "conversation_silent" if silent else "abandoned")
        return await self._send("tick", {})

    def _silence_s(self, program: Program) -> float:
        """How long an inferred program may be silent before it ends (others: the tracker's timeout)."""
        if not program.inferred:
            return self.tracker.idle_timeout_s
        q = self.predictor.distribution(program.last_tool).quantile(INFERRED_END_QUANTILE)
        return self.tracker.idle_timeout_s if q is None else max(INFERRED_END_MIN_S, INFERRED_END_FACTOR * q)

    async def shutdown(self) -> dict:
        return await self._send("release_all", {"reason": "program_end"})

    async def _send(self, command: str, payload: dict) -> dict:
        if not self.pins_enabled:
            return {}
        stats = await self.link(command, payload)
        self.last_stats = stats
        for ev in stats.get("events", ()):
            self.on_event("engine_" + ev["kind"], ev)
        return stats


class Control(Protocol):
    """What a front end asks of the program control plane (see the module docstring)."""

    def begin_call(self, fields: ProgramFields, prompt_tokens: int, max_tokens: int) -> Awaitable[dict]: ...

    def first_token(self, program_id: str, turn: int, ttft_s: float, prompt_tokens: int,
                    cached_tokens: int | None) -> Awaitable[None]: ...

    def end_call(self, program_id: str, context_tokens: int, life: int | None = None) -> Awaitable[None]: ...

    def abort_call(self, program_id: str, life: int | None = None) -> Awaitable[None]: ...

    def tool_event(self, program_id: str, name: str, event: str, duration_s: float | None
                   ) -> Awaitable[float | None]: ...

    def end_program(self, program_id: str) -> Awaitable[None]: ...

    def describe(self, program_id: str) -> Awaitable[dict]: ...

    def stats(self) -> Awaitable[dict]: ...

    def shutdown(self) -> Awaitable[dict]: ...


def _done(value: Any = None) -> asyncio.Future:
    future = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


class LocalControl:
    """`Control` over a `ControlPlane` in this process: bookkeeping happens at the call, an engine
    command when the answer is awaited."""

    def __init__(self, control: ControlPlane):
        self.control = control

    def begin_call(self, fields: ProgramFields, prompt_tokens: int, max_tokens: int) -> Awaitable[dict]:
        return _done(self.control.begin_call(fields, prompt_tokens, max_tokens))

    def first_token(self, program_id: str, turn: int, ttft_s: float, prompt_tokens: int,
                    cached_tokens: int | None) -> Awaitable[None]:
        return _done(self.control.first_token(program_id, turn, ttft_s, prompt_tokens, cached_tokens))

    def end_call(self, program_id: str, context_tokens: int, life: int | None = None) -> Awaitable[None]:
        return _done(self.control.end_call(program_id, context_tokens, life))

    def abort_call(self, program_id: str, life: int | None = None) -> Awaitable[None]:
        return self.control.abort_call(program_id, life)

    def tool_event(self, program_id: str, name: str, event: str, duration_s: float | None
                   ) -> Awaitable[float | None]:
        return _done(self.control.tool_event(program_id, name, event, duration_s))

    def end_program(self, program_id: str) -> Awaitable[None]:
        return self.control.end_program(program_id)

    def describe(self, program_id: str) -> Awaitable[dict]:
        return _done(self.control.describe(program_id))

    def stats(self) -> Awaitable[dict]:
        return self.control.stats()

    def shutdown(self) -> Awaitable[dict]:
        return self.control.shutdown()
