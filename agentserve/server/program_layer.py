"""The program layer of the HTTP server: agentserve's additions around vLLM's OpenAI app.

- `AgentFieldsMiddleware` (ASGI): takes the `agentserve` object out of a chat / completion body,
  validates it (400 naming the bad field) and passes it to vLLM as `vllm_xargs`. Bodies without it
  are not touched, so such requests are served exactly as stock vLLM serves them.
- `ProgramEngineClient`: wraps vLLM's engine client; every program request's `generate` goes through
  `ProgramControl` (turn tracking, TTL decision) and reports its end (or abort) back.
- routes: `POST /v1/programs/{id}/tool`, `POST /v1/programs/{id}/end`, `GET /v1/programs/{id}`,
  `GET /v1/agentserve/stats`.
- a tick task: ends abandoned programs, expires pins while the engine is idle, refreshes metrics.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from collections.abc import Callable
from urllib.parse import quote, unquote
from typing import Any

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from agentserve.programs.control import TRACEPARENT, ProgramControl
from agentserve.programs.fields import XARG_PROGRAM, XARG_TURN, ProgramFields, ToolEvent, decode_fields
from agentserve.programs.tracker import ProgramError
from agentserve.server import metrics
from agentserve.server.tenants import DEFAULT_MAX_BODY_BYTES, Tenant, TenantGate

log = logging.getLogger("agentserve.server")

TICK_S = 0.2
SHUTDOWN_RELEASE_S = 5.0  # a graceful shutdown waits this long at most for the pins' release  # pin expiry resolution while the engine is idle; an engine step also expires pins
MAX_BODY_BYTES = DEFAULT_MAX_BODY_BYTES  # a request body larger than this is refused (413)
_PROGRAM_ROUTES = ("/v1/chat/completions", "/v1/completions")
_PROGRAMS_PREFIX = "/v1/programs/"
PUBLIC_PATHS = ("/health",)  # answered without an API key


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 409: "ConflictError",
            413: "PayloadTooLarge", 429: "RateLimitError", 503: "ServiceUnavailable"}
    return JSONResponse({"error": {"message": message, "type": kind.get(status, "Error"), "param": param,
                                   "code": status}}, status_code=status)


class AgentFieldsMiddleware:
    """With `gate` (tenants configured): every route but `/health` needs a tenant's API key, program
    ids are scoped by tenant (in program route paths and in request bodies), LLM requests get the
    tenant's cache salt, and `admit(tenant, program_id)` may refuse a new program (429)."""

    def __init__(self, app, gate: TenantGate | None = None,
                 admit: Callable[[Tenant, str], bool] | None = None):
        self.app = app
        self.gate = gate
        self.admit = admit
        self.max_body = gate.config.max_body_bytes if gate is not None else MAX_BODY_BYTES

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        tenant = None
        if self.gate is not None and scope["path"] not in PUBLIC_PATHS:
            tenant = self.gate.authenticate(_header(scope, b"authorization"))
            if tenant is None:
                return await error_response(401, "missing or unknown API key (Authorization: Bearer KEY)",
                                            "authorization")(scope, receive, send)
            scope = _scoped_program_path(scope, tenant)
        if scope["method"] != "POST" or scope["path"] not in _PROGRAM_ROUTES:
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return await error_response(413, f"request body over {self.max_body} bytes")(scope, receive, send)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        body, error = rewrite_body(body, tenant, self.gate, self.admit)
        if error is not None:
            return await error(scope, receive, send)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _scoped_program_path(scope, tenant: Tenant):
    """`/v1/programs/{id}...` -> `/v1/programs/{tenant:id}...`: a tenant reaches only its programs."""
    path = scope["path"]
    if not path.startswith(_PROGRAMS_PREFIX) or len(path) == len(_PROGRAMS_PREFIX):
        return scope
    program, slash, rest = path[len(_PROGRAMS_PREFIX):].partition("/")
    scoped = f"{_PROGRAMS_PREFIX}{quote(TenantGate.scope(tenant, unquote(program)), safe=':')}{slash}{rest}"
    return {**scope, "path": unquote(scoped), "raw_path": scoped.encode()}


def rewrite_body(body: bytes, tenant: Tenant | None = None, gate: TenantGate | None = None,
                 admit: Callable[[Tenant, str], bool] | None = None) -> tuple[bytes, JSONResponse | None]:
    """Move `agentserve` into `vllm_xargs`; with a tenant, scope its program ids and salt its cache.
    Bodies that are not JSON objects pass through (vLLM answers them with its own 400)."""
    try:
        data = json.loads(body)
    except ValueError:
        return body, None
    if not isinstance(data, dict) or ("agentserve" not in data and tenant is None):
        return body, None
    xargs = data.get("vllm_xargs") or {}
    if not isinstance(xargs, dict):
        return body, error_response(400, "vllm_xargs must be an object", "vllm_xargs")
    if tenant is not None:
        if any(str(k).startswith("agentserve_") for k in xargs):
            return body, error_response(400, "vllm_xargs keys agentserve_* are reserved; use the agentserve "
                                             "object", "vllm_xargs")
        salt = data.get("cache_salt")
        if salt is not None and not isinstance(salt, str):
            return body, error_response(400, "cache_salt must be a string", "cache_salt")
        data["cache_salt"] = gate.cache_salt(tenant, salt)
    if "agentserve" in data:
        raw = data.pop("agentserve")
        try:
            fields = decode_fields(raw)
        except msgspec.ValidationError as e:
            return body, error_response(400, f"invalid agentserve object: {e}", "agentserve" + _error_path(str(e)))
        if tenant is not None:
            parent = fields.parent_program_id
            fields = msgspec.structs.replace(fields, program_id=TenantGate.scope(tenant, fields.program_id),
                                             parent_program_id=TenantGate.scope(tenant, parent) if parent else None)
            if admit is not None and not admit(tenant, fields.program_id):
                return body, error_response(429, f"tenant {tenant.name!r} has {tenant.max_programs} live programs, "
                                                 "its limit", "agentserve.program_id")
        xargs.update({XARG_PROGRAM: fields.program_id, "agentserve_fields": msgspec.json.encode(fields).decode()})
        data["vllm_xargs"] = xargs
    return json.dumps(data).encode(), None


def _error_path(message: str) -> str:
    """The field a msgspec validation message names: `... - at `$.turn`` or `... field `name``."""
    if " - at `$" in message:
        return message.rpartition(" - at `$")[2].rstrip("`")
    if "field `" in message:
        return "." + message.rpartition("field `")[2].rstrip("`")
    return ""


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

    async def generate(self, prompt, sampling_params, request_id, *args, **kwargs):
        extra = sampling_params.extra_args or {}
        raw = extra.pop("agentserve_fields", None)
        if raw is None:
            async for out in self._engine.generate(prompt, sampling_params, request_id, *args, **kwargs):
                yield out
            return
        fields = msgspec.json.decode(raw, type=ProgramFields)
        tokens = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None
        xargs = await resolved(self.control.begin_call(fields, len(tokens or ()), sampling_params.max_tokens or 0))
        traceparent = xargs.pop(TRACEPARENT, None)
        if traceparent is not None:  # vLLM's spans of this request nest under the program's chat span
            kwargs["trace_headers"] = {**(kwargs.get("trace_headers") or {}), "traceparent": traceparent}
        sampling_params.extra_args = {**extra, **xargs}
        out, finished, t0 = None, False, time.perf_counter()
        try:
            async for out in self._engine.generate(prompt, sampling_params, request_id, *args, **kwargs):
                if t0 is not None:  # the first output: its TTFT and prefix hit
                    await resolved(self.control.first_token(
                        fields.program_id, xargs[XARG_TURN], time.perf_counter() - t0,
                        len(out.prompt_token_ids or ()), out.num_cached_tokens))
                    t0 = None
                finished = out.finished
                yield out
        finally:
            context = (len(out.prompt_token_ids or ()) + sum(len(o.token_ids) for o in out.outputs)) if out else 0
            ended = self.control.end_call(fields.program_id, context)
            if inspect.isawaitable(ended):
                asyncio.ensure_future(self._safe(ended))
            if not finished:  # client disconnect or abort: the engine drops the pin too
                asyncio.ensure_future(self._safe(self.control.abort_call(fields.program_id)))

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
    while True:
        await asyncio.sleep(TICK_S)
        try:
            metrics.record_engine_stats(await control.tick())
            metrics.PROGRAMS_LIVE.set(len(control.tracker))
            metrics.record_ttl_inputs(control.ttl_inputs())
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - keep ticking; the failure is in the log
            log.exception("agentserve tick failed")
