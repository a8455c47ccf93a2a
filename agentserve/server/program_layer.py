"""The program layer of the HTTP server: agentserve's additions around vLLM's OpenAI app.

- the request middleware (`server/middleware.py`): the `agentserve` object into `vllm_xargs`, tenancy.
- `ProgramEngineClient`: wraps vLLM's engine client; every program request's `generate` goes through
  `ProgramControl` (turn tracking, TTL decision) and reports its end (or abort) back.
- routes: `POST /v1/programs/{id}/tool`, `POST /v1/programs/{id}/end`, `GET /v1/programs/{id}`,
  `GET /v1/agentserve/stats`.
- a tick task: ends abandoned programs, expires pins while the engine is idle, refreshes metrics.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec
from fastapi import FastAPI, Request

from agentserve.programs.control import TRACEPARENT, ProgramControl
from agentserve.programs.fields import XARG_TURN, ProgramFields, ToolEvent
from agentserve.programs.tracker import ProgramError
from agentserve.server import metrics
from agentserve.server.middleware import error_response
from agentserve.server.periodic import every
from agentserve.server.streams import track

log = logging.getLogger("agentserve.server")

TICK_S = 0.2  # pin expiry resolution while the engine is idle; an engine step also expires pins
SHUTDOWN_RELEASE_S = 5.0  # a graceful shutdown waits this long at most for the pins' release


async def resolved(value):
    """The value of a control call: `ProgramControl` answers directly, a remote control plane (Ray
    Serve) with an awaitable; callers here accept both."""
    return await value if inspect.isawaitable(value) else value


def _running_loop():
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class ProgramEngineClient:
    """vLLM's engine client, with program requests routed through the program control plane: a local
    `ProgramControl`, or a proxy to the shared one (`agentserve.rayserve.replica.RemoteControl`)."""

    def __init__(self, engine, control):
        self._engine = engine
        self.control = control
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Future] = set()

    def shutdown(self, *args, **kwargs):
        """vLLM's launcher stops the engine on SIGTERM/SIGINT (from a worker thread): every pin is
        released first, while the engine still runs (a graceful shutdown leaves no pinned KV)."""
        release = getattr(self.control, "shutdown", None)  # a remote control plane releases its own
        on_loop = _running_loop() is self._loop
        if release is not None and not on_loop and self._loop.is_running():
            try:
                stats = asyncio.run_coroutine_threadsafe(release(), self._loop).result(timeout=SHUTDOWN_RELEASE_S)
                released = sum(1 for e in stats.get("events", ()) if e["kind"] == "unpin")
                log.info("released %d pin(s) at shutdown", released)
            except Exception:  # noqa: BLE001 - shutting down regardless
                log.exception("could not release pins at shutdown")
        return self._engine.shutdown(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def generate(self, prompt, sampling_params, request_id, *args, **kwargs):
        """vLLM's `generate`, as a stream its HTTP request closes when the response ends (streams.py)."""
        return track(self._stream(prompt, sampling_params, request_id, *args, **kwargs))

    async def _stream(self, prompt, sampling_params, request_id, *args, **kwargs):
        program = await self._begin_call(prompt, sampling_params, kwargs)  # None: not a program's call
        out, finished, engine_ids, t0 = None, False, [], time.perf_counter()
        try:
            async for out in self._engine.generate(prompt, sampling_params, request_id, *args, **kwargs):
                if t0 is not None:  # the first output
                    engine_ids = self._engine_request_ids(request_id)
                    if program is not None:  # its TTFT and prefix hit
                        await resolved(self.control.first_token(
                            program[0], program[1], time.perf_counter() - t0,
                            len(out.prompt_token_ids or ()), out.num_cached_tokens))
                    t0 = None
                finished = out.finished
                yield out
        finally:
            if not finished and engine_ids:
                # vLLM aborts a request whose stream is cancelled, but a disconnected client's stream is
                # cancelled through Starlette's anyio cancel scope, which re-delivers the cancellation
                # at every await, vLLM's own abort included: its message to the engine core can be
                # dropped after the front end forgot the request. This abort runs in a task of its own,
                # outside that scope, by the engine core's ids (the front end's mapping is gone by
                # then); the engine ignores an abort of a request it no longer has.
                self._background(self._engine.engine_core.abort_requests_async(engine_ids))
            if program is not None:
                context = ((len(out.prompt_token_ids or ()) + sum(len(o.token_ids) for o in out.outputs))
                           if out else 0)
                ended = self.control.end_call(program[0], context)
                if inspect.isawaitable(ended):
                    self._background(ended)
                if not finished:  # client disconnect or abort: the engine drops the pin too
                    self._background(self.control.abort_call(program[0]))

    async def _begin_call(self, prompt, sampling_params, kwargs: dict) -> tuple[str, int] | None:
        """A program's call (the middleware put its fields into extra_args): tell the control plane,
        attach the xargs it answers (TTL, turn) and the program's trace context. Returns (program id,
        turn), or None for a request with no program fields."""
        extra = sampling_params.extra_args or {}
        raw = extra.pop("agentserve_fields", None)
        if raw is None:
            return None
        fields = msgspec.json.decode(raw, type=ProgramFields)
        tokens = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None
        xargs = await resolved(self.control.begin_call(fields, len(tokens or ()), sampling_params.max_tokens or 0))
        traceparent = xargs.pop(TRACEPARENT, None)
        if traceparent is not None:  # vLLM's spans of this request nest under the program's chat span
            kwargs["trace_headers"] = {**(kwargs.get("trace_headers") or {}), "traceparent": traceparent}
        sampling_params.extra_args = {**extra, **xargs}
        return fields.program_id, xargs[XARG_TURN]

    def _engine_request_ids(self, request_id: str) -> list[str]:
        """The engine core's ids of a request (vLLM gives each request an internal id of its own)."""
        processor = getattr(self._engine, "output_processor", None)
        return list(getattr(processor, "external_req_ids", {}).get(request_id, ()))

    def _background(self, awaitable) -> None:
        """Run a control or abort call in a task of its own (held until done: the loop keeps only a
        weak reference), its failure logged, never raised into a request."""
        task = asyncio.ensure_future(self._safe(awaitable))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _safe(coro) -> None:
        try:
            await coro
        except Exception:  # noqa: BLE001 - a failed release is logged, never raised into a request
            log.exception("agentserve control call failed")


def document_wire_contract(app: FastAPI) -> None:
    """Put the `agentserve` request object (and the tool event body) into the app's OpenAPI spec: the
    middleware takes the object out before vLLM's pydantic models see the body, so FastAPI cannot
    infer it."""
    original = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        spec = original()
        (fields, _), defs = msgspec.json.schema_components(
            [ProgramFields, ToolEvent], ref_template="#/components/schemas/{name}")
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        schemas.update(defs)
        for name in ("ChatCompletionRequest", "CompletionRequest"):
            if name in schemas:
                schemas[name].setdefault("properties", {})["agentserve"] = {
                    **fields, "description": "agentserve program fields (README: the wire contract); "
                                             "requests without them are served as stock vLLM serves them"}
        app.openapi_schema = spec
        return spec

    app.openapi = openapi


def add_program_routes(app: FastAPI, programs: Callable[[], Any]) -> None:
    """The program routes. `programs()` gives the control plane that answers them: the server's
    `ProgramControl`, or on Ray Serve a proxy to the shared control-plane deployment (same methods,
    awaitable)."""
    document_wire_contract(app)

    async def call(method: str, *args) -> Any:
        try:
            return await resolved(getattr(programs(), method)(*args)), None
        except ProgramError as e:
            return None, error_response(e.status, str(e), "program_id")

    @app.post("/v1/programs/{program_id}/tool", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/ToolEvent"}}}}})
    async def tool_event(program_id: str, request: Request):
        try:
            event = msgspec.json.decode(await request.body(), type=ToolEvent)
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            return error_response(400, f"invalid tool event: {e}", "body")
        duration, error = await call("tool_event", program_id, event.name, event.event, event.duration_s)
        return error or {"program_id": program_id, "tool": event.name, "event": event.event,
                         "duration_s": duration}

    @app.post("/v1/programs/{program_id}/end")
    async def end_program(program_id: str):
        _, error = await call("end_program", program_id)
        return error or {"program_id": program_id, "ended": True}

    @app.get("/v1/programs/{program_id}")
    async def get_program(program_id: str):
        described, error = await call("describe", program_id)
        return error or described

    @app.get("/v1/agentserve/stats")
    async def stats():
        result, _ = await call("stats")
        metrics.record_engine_stats(result["engine"])
        return result


async def tick_loop(control: ProgramControl) -> None:
    async def tick() -> None:
        metrics.record_engine_stats(await control.tick())
        metrics.PROGRAMS_LIVE.set(len(control.tracker))
        metrics.record_ttl_inputs(control.ttl_inputs())

    await every(TICK_S, tick, "agentserve tick")
