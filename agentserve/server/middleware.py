"""The request middleware of the HTTP server: the wire contract and tenancy applied to requests
before vLLM's OpenAI app parses them.

`AgentFieldsMiddleware` (ASGI) takes the `agentserve` object out of a chat / completion body,
validates it (400 naming the bad field) and passes it to vLLM as `vllm_xargs`; bodies without it
are not touched, so such requests are served exactly as stock vLLM serves them. With tenants
configured (server/tenants.py) it also checks the API key on every route, scopes program ids by
tenant in bodies and program-route paths, salts the prefix cache per tenant and applies the
program and body-size limits.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from urllib.parse import quote, unquote

import msgspec
from fastapi.responses import JSONResponse

from agentserve.programs.fields import XARG_PROGRAM, SharedPrompt, decode_fields
from agentserve.server.cross_model import CrossModelFront
from agentserve.server.shared_prompts import ShareError, SharedPrompts
from agentserve.server.streams import request_streams
from agentserve.options import DEFAULT_MAX_BODY_BYTES, Tenant
from agentserve.server.tenants import TenantGate

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
                 admit: Callable[[Tenant, str], bool] | None = None, shares: SharedPrompts | None = None,
                 cross: CrossModelFront | None = None):
        self.app = app
        self.cross = cross
        self.gate = gate
        self.admit = admit
        self.shares = shares
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
        produce, scope_name = [], tenant.name if tenant is not None else ""
        if self.cross is not None and scope["path"] == "/v1/completions" and self.cross.name.encode() in body:
            response = await cross_model_response(body, self.cross, scope_name)
            if response is not None:  # a request for the cross-model variant: answered here
                return await response(scope, receive, send)
        if self.shares is not None and scope["path"] == "/v1/completions" and b'"share"' in body:
            body, produce, error = rewrite_shared_prompt(body, self.shares, scope_name)
            if error is not None:
                return await error(scope, receive, send)
        body, error = rewrite_body(body, tenant, self.gate, self.admit)
        if error is not None:
            return await error(scope, receive, send)
        if produce:
            await self.shares.produce(produce, scope_name)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async with request_streams():  # a disconnected client's engine request ends with its response
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


async def cross_model_response(body: bytes, cross: CrossModelFront, scope: str) -> JSONResponse | None:
    """The response to a completion for the cross-model variant (server/cross_model.py), None for
    any other body."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or not cross.wants(data):
        return None
    try:
        return JSONResponse(await cross.complete(data, scope))
    except ShareError as e:
        return error_response(400, str(e), e.param)


def rewrite_shared_prompt(body: bytes, shares: SharedPrompts, scope: str
                          ) -> tuple[bytes, list[list[int]], JSONResponse | None]:
    """A completion whose `agentserve` object has `share`: its prompt from the parts, the segment map
    and the cache salt set (server/shared_prompts.py); returns the shared parts to produce first."""
    try:
        data = json.loads(body)
    except ValueError:
        return body, [], None
    fields = data.get("agentserve") if isinstance(data, dict) else None
    if not isinstance(fields, dict) or "share" not in fields:
        return body, [], None
    try:
        share = msgspec.convert(fields.pop("share"), SharedPrompt)
        if not fields:  # sharing without program fields: a plain (non-program) request
            del data["agentserve"]
        parts = shares.translate(data, share, scope)
    except msgspec.ValidationError as e:
        return body, [], error_response(400, f"invalid agentserve.share: {e}", "agentserve.share" + _error_path(str(e)))
    except ShareError as e:
        return body, [], error_response(400, str(e), e.param)
    return json.dumps(data).encode(), parts, None


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
        if fields.share is not None:  # not taken by rewrite_shared_prompt
            return body, error_response(400, "agentserve.share needs a server started with --kvshare, on "
                                             "/v1/completions", "agentserve.share")
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
