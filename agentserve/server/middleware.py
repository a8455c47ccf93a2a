"""The request middleware of the HTTP server: the wire contract and tenancy applied to requests
before vLLM's OpenAI app parses them.

`AgentFieldsMiddleware` (ASGI) takes the `agentserve` object out of the body of an engine route
(server/routes.py: chat, completions, Anthropic messages, responses; or names the program from a
session convention: `session_id`, `X-Session-ID`; programs/sessions.py), validates it (400 naming the
bad field) and passes it to vLLM as `vllm_xargs`; bodies without either are not touched, so such
requests are served exactly as stock vLLM serves them. With tenants configured (server/tenants.py)
it also checks the API key on every route, refuses every route that routes.py does not list (deny by
default), scopes program ids by tenant in bodies and program-route paths, salts the prefix cache per
tenant on every engine route and applies the program and body-size limits. A sub-agent's first call whose parent is unknown, ended, or would make a
cycle is refused here (404 / 409, `lineage`), before vLLM sees it, where the server holds the program
forest (the embedded server; on Ray Serve the control plane refuses it, inside the response stream).

A body is decoded once (`Incoming.decode`: JSON into builtins, the fields agentserve reads into
typed structs), edited by an ordered list of rewriters (`Rewriter`: the shared prompt, the tenant,
the program fields into `vllm_xargs`), and encoded once; vLLM then parses it as it parses any body.
A body that mentions nothing of agentserve's, on a server without tenants, is not decoded at all.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote, unquote

import inspect

import msgspec
from fastapi.responses import JSONResponse

from agentserve.programs import hints
from agentserve.programs.continuity import Conversations, Pending
from agentserve.programs.fields import XARG_CONVERSATION, XARG_PREFIX, XARG_PRIORITY, ProgramFields, SharedPrompt, to_xargs
from agentserve.programs.sessions import HEADERS as SESSION_HEADERS, SessionError, program_fields
from agentserve.server import metrics, routes
from agentserve.server.transcripts import TRANSCRIPTS, Transcript
from agentserve.server.cross_model_front import CrossModelFront
from agentserve.server.shared_prompts import ShareError, SharedPrompts
from agentserve.server.streams import request_streams
from agentserve.options import DEFAULT_MAX_BODY_BYTES, Tenant
from agentserve.server.tenants import TenantGate

MAX_BODY_BYTES = DEFAULT_MAX_BODY_BYTES  # a request body larger than this is refused (413)
_PROGRAMS_PREFIX = "/v1/programs/"
PROGRAM_HEADER = b"x-agentserve-program"  # names the program inferred for a request, in its response
# Conventions whose parent id is passive identity (a trace's): a parent this server cannot take is dropped
ADVISORY_PARENTS = ("agent_hint.session_id", "nvext.agent_context")
# Body fields a tenant may not send: they name state that is not scoped by tenant (vLLM's stored
# responses, a KV connector's transfer handles).
_UNSCOPED_FIELDS = {
    "/v1/responses": ("previous_response_id", "background", "kv_transfer_params"),
    "/v1/chat/completions": ("kv_transfer_params",), "/v1/completions": ("kv_transfer_params",),
    "/v1/messages": ("kv_transfer_params",), "/v1/chat/completions/batch": ("kv_transfer_params",)}


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
            404: "NotFoundError", 409: "ConflictError",
            413: "PayloadTooLarge", 429: "RateLimitError", 503: "ServiceUnavailable"}
    return JSONResponse({"error": {"message": message, "type": kind.get(status, "Error"), "param": param,
                                   "code": status}}, status_code=status)


class AgentFieldsMiddleware:
    """With `gate` (tenants configured): every route but `/health` needs a tenant's API key, a tenant
    may use only the routes routes.py lists (403), program ids are scoped by tenant (in program route
    paths and in request bodies), engine requests get the tenant's cache salt, and `admit(tenant,
    program_id)` may refuse a new program (429)."""

    def __init__(self, app, gate: TenantGate | None = None,
                 admit: Callable[[Tenant, str], bool] | None = None, shares: SharedPrompts | None = None,
                 cross: CrossModelFront | None = None, lineage_error: LineageCheck | None = None,
                 conversations: Conversations | None = None, hint_rules: hints.HintRules | None = None):
        self.app = app
        self.conversations = conversations
        self.hint_rules = hint_rules
        self.cross = cross
        self.gate = gate
        self.shares = shares
        self.max_body = gate.config.max_body_bytes if gate is not None else MAX_BODY_BYTES
        self.rewriters = {path: rewriters(path, shares=shares, gate=gate, admit=admit, lineage_error=lineage_error,
                                          conversations=conversations, hint_rules=hint_rules)
                          for path in routes.ENGINE_ROUTES}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket" and self.gate is not None:  # no websocket route is a tenant's
            return await send({"type": "websocket.close", "code": 1008, "reason": "not served to tenants"})
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        tenant = None
        if self.gate is not None and not routes.is_public(method, path):
            tenant = self.gate.authenticate(_header(scope, b"authorization"), _header(scope, b"x-api-key"))
            if tenant is None:
                return await error_response(
                    401, "missing or unknown API key (Authorization: Bearer KEY, or x-api-key: KEY)",
                    "authorization")(scope, receive, send)
            if not routes.tenant_may_use(method, path):
                return await error_response(403, f"{method} {path} is not served to tenants",
                                            "path")(scope, receive, send)
            scope = _scoped_program_path(scope, tenant)
        if not routes.is_engine_route(method, path):
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
        incoming = None
        headers = _session_headers(scope)
        mentions = (tenant is not None or self.cross is not None or headers or _mentions_program(body)
                    or (self.hint_rules is not None and _mentions_hints(body, self.hint_rules)))
        if mentions or (self.conversations is not None and path in TRANSCRIPTS):
            incoming = Incoming.decode(body, tenant, headers)
        if incoming is not None:
            if self.cross is not None and scope["path"] == "/v1/completions" and self.cross.wants(incoming.data):
                return await cross_model_response(incoming.data, self.cross, incoming.scope)(scope, receive, send)
            error = apply(incoming, self.rewriters[scope["path"]])
            if error is None and incoming.admission is not None and not await incoming.admission:
                error = over_limit(incoming.tenant) if not incoming.inferred else served_as_one_off(incoming)
            if error is not None:
                return await error(scope, receive, send)
            if mentions or incoming.fields is not None or incoming.pending is not None:
                body = incoming.encode()
            if incoming.produce:
                await self.shares.produce(incoming.produce, incoming.scope)
            if incoming.outcomes:
                send = with_header(send, hints.HEADER, hints.header_value(incoming.outcomes))
            if incoming.pending is not None:
                send = answer_recorder(send, self.conversations, TRANSCRIPTS[path], incoming.pending,
                                       incoming.pending.program_id if incoming.inferred else None)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async with request_streams():  # a disconnected client's engine request ends with its response
            await self.app(scope, replay, send)


def _mentions_program(body: bytes) -> bool:
    """Cheap test before any decode: the object, a client's own agentserve_* xargs (refused), or a
    session id or a user id's session (programs/sessions.py); or any escape, which could spell one of
    them (`"\\u0061gent..."`)."""
    return b"agentserve" in body or b"session_" in body or b"nvext" in body or b"\\u" in body


def _mentions_hints(body: bytes, rules: hints.HintRules) -> bool:
    """Cheap test: a hint convention's object (`nvext` is `_mentions_program`'s: it names programs too), or
    vLLM's own priority where the plugin orders by it."""
    return b"agent_hint" in body or b"kv_hints" in body or (rules.orders_by_priority and b'"priority"' in body)


def _session_headers(scope) -> dict[str, str]:
    """The session convention headers a request carries (lower-case names)."""
    return {name: value for name in SESSION_HEADERS if (value := _header(scope, name.encode())) is not None}


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _scoped_program_path(scope, tenant: Tenant):
    """`/v1/programs/{id}...` -> `/v1/programs/{tenant:id}...`: a tenant reaches only its programs.
    The id is split off the raw path, where a `/` inside it is still `%2F`."""
    path = scope["path"]
    if not path.startswith(_PROGRAMS_PREFIX) or len(path) == len(_PROGRAMS_PREFIX):
        return scope
    raw = scope.get("raw_path") or quote(path).encode()
    program, slash, rest = raw.decode("latin-1")[len(_PROGRAMS_PREFIX):].partition("/")
    program = unquote(program)
    scoped = f"{_PROGRAMS_PREFIX}{quote(TenantGate.scope(tenant, program), safe=':')}{slash}{rest}"
    return {**scope, "path": unquote(scoped), "raw_path": scoped.encode()}


class Incoming:
    """A chat / completion body, decoded once. `data` is the body as builtins (rewriters edit it in
    place); `fields` and `share` are the `agentserve` object as typed structs (None when absent)."""

    __slots__ = ("data", "fields", "share", "tenant", "scope", "produce", "headers", "admission", "pending", "asked",
                 "rules", "priority", "outcomes", "named_by")

    def __init__(self, data: dict[str, Any], fields: ProgramFields | None, share: SharedPrompt | None,
                 tenant: Tenant | None, headers: dict[str, str] | None = None):
        self.data = data
        self.headers = headers or {}  # the session convention headers (programs/sessions.py)
        self.fields = fields
        self.share = share
        self.tenant = tenant
        self.scope = tenant.name if tenant is not None else ""  # the KV-sharing scope
        self.produce: list[list[int]] = []  # shared parts to produce before the request runs
        self.admission: Awaitable[bool] | None = None  # a tenant limit answered elsewhere (Ray Serve)
        self.pending: Pending | None = None  # a turn of a conversation whose answer the index awaits
        self.asked: list = []  # the request's hints (programs/hints.py), judged into the next three
        self.rules: hints.HintRules | None = None
        self.priority: int | None = None  # the priority level the engine's book orders by
        self.outcomes: list[hints.Outcome] = []  # each hint applied, clipped or ignored (the response says)
        self.named_by: str | None = None  # what named the program (programs/sessions.py)

    @property
    def inferred(self) -> bool:
        """The program was inferred from the conversation, not named by the client."""
        return self.fields is not None and self.fields.inferred

    @classmethod
    def decode(cls, body: bytes, tenant: Tenant | None = None,
               headers: dict[str, str] | None = None) -> "Incoming | None":
        """None for a body that is not a JSON object (vLLM answers it with its own 400)."""
        try:
            data = msgspec.json.decode(body)
        except msgspec.DecodeError:
            return None
        if not isinstance(data, dict):
            return None
        return cls(data, None, None, tenant, headers)

    def encode(self) -> bytes:
        return msgspec.json.encode(self.data)


# A rewriter edits an incoming body in place, or refuses it with the response to send.
Rewriter = Callable[[Incoming], JSONResponse | None]
# (program, parent) -> (status, message) if the program may not be the parent's sub-agent, else None
LineageCheck = Callable[[str, str], tuple[int, str] | None]


def apply(incoming: Incoming, steps: list[Rewriter]) -> JSONResponse | None:
    for step in steps:
        if (error := step(incoming)) is not None:
            return error
    return None


def rewriters(path: str, *, shares: SharedPrompts | None = None, gate: TenantGate | None = None,
              admit: Callable[[Tenant, str], bool] | None = None,
              lineage_error: LineageCheck | None = None, conversations: Conversations | None = None,
              hint_rules: hints.HintRules | None = None) -> list[Rewriter]:
    """The rewriters of a route, in order: typed fields, the session conventions, the program inferred
    from the conversation (chat), the shared prompt (completions with --kvshare), the tenant (salt,
    scoping, limits), the sub-agent's parent, the request hints, the program fields into vllm_xargs."""
    steps: list[Rewriter] = [typed_fields, sessions]
    if conversations is not None and path in TRANSCRIPTS:
        steps.append(inferred(conversations, TRANSCRIPTS[path]))
    if path in routes.NO_PROGRAM_ROUTES:
        steps.append(no_program(path))
    if shares is not None and path == "/v1/completions":
        steps.append(shared_prompt(shares))
    if gate is not None:
        steps.append(tenancy(gate, admit, _UNSCOPED_FIELDS.get(path, ())))
    if lineage_error is not None:
        steps.append(lineage(lineage_error))
    if hint_rules is not None:
        steps.append(request_hints(hint_rules))
    steps.append(program_xargs)
    return steps


def no_program(path: str) -> Rewriter:
    """A route whose request is not one call of one program (a batch of conversations) takes no program."""

    def rewrite(incoming: Incoming) -> JSONResponse | None:
        if incoming.fields is None and incoming.share is None:
            return None
        return error_response(400, f"{path} serves no program: send a program's calls one by one to "
                                   f"/v1/chat/completions", "agentserve")

    return rewrite


def lineage(check: LineageCheck) -> Rewriter:
    """A sub-agent's parent must be a live program, and no program gets a second parent (no cycles)."""

    def rewrite(incoming: Incoming) -> JSONResponse | None:
        fields = incoming.fields
        if fields is None or fields.parent_program_id is None:
            return None
        problem = check(fields.program_id, fields.parent_program_id)
        if problem is not None and incoming.named_by in ADVISORY_PARENTS:
            incoming.fields = msgspec.structs.replace(fields, parent_program_id=None)  # a hint: dropped, not refused
            return None
        return error_response(*problem, "agentserve.parent_program_id") if problem is not None else None

    return rewrite


def typed_fields(incoming: Incoming) -> JSONResponse | None:
    """The `agentserve` object out of the body, as `ProgramFields` and `SharedPrompt`. Sharing
    without a program id is a plain (non-program) request."""
    raw = incoming.data.pop("agentserve", None)
    if raw is None:
        return None
    if not isinstance(raw, dict):
        return error_response(400, "invalid agentserve object: expected an object", "agentserve")
    share = raw.pop("share", None)
    try:
        incoming.share = msgspec.convert(share, SharedPrompt) if share is not None else None
    except msgspec.ValidationError as e:
        return error_response(400, f"invalid agentserve.share: {e}", "agentserve.share" + _error_path(str(e)))
    if raw or share is None:
        if "inferred" in raw:
            return error_response(400, "agentserve.inferred is set by the server, not by a client",
                                  "agentserve.inferred")
        try:
            incoming.fields = msgspec.convert(raw, ProgramFields)
        except msgspec.ValidationError as e:
            return error_response(400, f"invalid agentserve object: {e}", "agentserve" + _error_path(str(e)))
    return None


def sessions(incoming: Incoming) -> JSONResponse | None:
    """A program named by a session convention when the object names none; the end header."""
    try:
        incoming.fields, named_by = program_fields(incoming.fields, incoming.data, incoming.headers)
    except SessionError as e:
        return error_response(400, str(e), e.param)
    incoming.named_by = named_by
    if named_by is not None:
        metrics.PROGRAM_REQUESTS.labels(named_by).inc()
    return None


def inferred(conversations: Conversations, transcript: Transcript) -> Rewriter:
    """A request that names no program: the next turn of the conversation it extends, if any
    (programs/continuity.py). A first turn stays a one-off; its answer is recorded either way."""

    def rewrite(incoming: Incoming) -> JSONResponse | None:
        data = incoming.data
        if incoming.fields is not None or data.get("n") not in (None, 1):
            return None
        messages = transcript.messages(data)
        if messages is None:
            return None
        salt = data.get("cache_salt")
        turn, incoming.pending = conversations.begin(incoming.scope, messages, (
            type(transcript).__name__, str(data.get("model") or ""), salt if isinstance(salt, str) else ""))
        metrics.CONVERSATION_TURNS.labels(turn.kind).inc()
        if turn.program_id is not None:
            incoming.fields = ProgramFields(program_id=turn.program_id, turn=turn.turn, tools_done=turn.tools_done,
                                            inferred=True)
            metrics.PROGRAM_REQUESTS.labels("inferred").inc()
        return None

    return rewrite


def answer_recorder(send, conversations: Conversations, transcript: Transcript, pending: Pending,
                    program: str | None):
    """`send`, reading the response's answer on its way out; the index gets it when the body ends.
    The response names the inferred `program` in a header (PROGRAM_HEADER), for the client's program routes."""
    reader = transcript.reader()

    async def recording_send(message) -> None:
        if message["type"] == "http.response.start":
            reader.start(message["status"], message.get("headers", ()))
            if program is not None:
                message = {**message, "headers": [*message.get("headers", ()),
                                                   (PROGRAM_HEADER, program.encode("latin-1"))]}
        elif message["type"] == "http.response.body":
            reader.feed(message.get("body", b""))
            if not message.get("more_body") and (answer := reader.answer()) is not None:
                conversations.answered(pending, *transcript.answer(answer))
        await send(message)

    return recording_send


def served_as_one_off(incoming: Incoming) -> None:
    """An inferred program its tenant has no room for: the request is served without one (a client
    that named no program is never refused for the program it was given); its hints are judged again,
    as a one-off's."""
    xargs = incoming.data.get("vllm_xargs") or {}
    for key in [k for k in xargs if str(k).startswith(XARG_PREFIX)]:
        del xargs[key]
    incoming.fields = None
    metrics.CONVERSATION_TURNS.labels("over_limit").inc()
    if incoming.rules is not None:
        _judge(incoming)
        if incoming.priority is not None:
            incoming.data.setdefault("vllm_xargs", {})[XARG_PRIORITY] = incoming.priority
    return None


def request_hints(rules: hints.HintRules) -> Rewriter:
    """The hint conventions a request carries (programs/hints.py), judged: the values applied go into
    its program fields and priority level, and the response will say what became of each."""

    def rewrite(incoming: Incoming) -> JSONResponse | None:
        try:
            incoming.asked = hints.take(incoming.data, incoming.fields, rules)
        except hints.HintError as e:
            return error_response(400, str(e), e.param)
        if incoming.asked:
            incoming.rules = rules
            _judge(incoming)
        return None

    return rewrite


def _judge(incoming: Incoming) -> None:
    data = incoming.data
    bound = next((data[k] for k in ("max_completion_tokens", "max_tokens", "max_output_tokens")
                  if isinstance(data.get(k), int)), None)
    judged = hints.judge(incoming.asked, incoming.rules, fields=incoming.fields, tenant=incoming.tenant,
                         max_tokens=bound)
    incoming.fields, incoming.priority, incoming.outcomes = judged.fields, judged.priority_level, judged.outcomes
    for o in judged.outcomes:
        metrics.HINTS.labels(hints.label(o.hint), o.status).inc()


def with_header(send, name: bytes, value: bytes):
    """`send`, adding a header to the response."""

    async def sending(message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), (name, value)]}
        await send(message)

    return sending


def shared_prompt(shares: SharedPrompts) -> Rewriter:
    """A completion whose `agentserve` object has `share`: its prompt from the parts, the segment map
    and the cache salt set (server/shared_prompts.py); the shared parts are produced first."""

    def rewrite(incoming: Incoming) -> JSONResponse | None:
        if incoming.share is None:
            return None
        try:
            incoming.produce = shares.translate(incoming.data, incoming.share, incoming.scope)
        except ShareError as e:
            return error_response(400, str(e), e.param)
        incoming.share = None  # taken
        return None

    return rewrite


def over_limit(tenant: Tenant) -> JSONResponse:
    return error_response(429, f"tenant {tenant.name!r} has {tenant.max_programs} live programs, its limit",
                          "agentserve.program_id")


def tenancy(gate: TenantGate, admit: Callable[[Tenant, str], bool | Awaitable[bool]] | None,
            unscoped: tuple[str, ...] = ()) -> Rewriter:
    """The tenant's cache salt (a client's own kept, appended), its program ids scoped, its program
    limit; the route's `unscoped` fields (state not scoped by tenant) refused."""

    def rewrite(incoming: Incoming) -> JSONResponse | None:
        tenant, data = incoming.tenant, incoming.data
        for name in unscoped:
            if data.get(name) not in (None, False):
                return error_response(400, f"{name} is not served to tenants: it names state that is not "
                                           f"kept apart by tenant", name)
        salt = data.get("cache_salt")
        if salt is not None and not isinstance(salt, str):
            return error_response(400, "cache_salt must be a string", "cache_salt")
        data["cache_salt"] = gate.cache_salt(tenant, salt)
        fields = incoming.fields
        if fields is None:
            return None
        parent = fields.parent_program_id
        incoming.fields = fields = msgspec.structs.replace(
            fields, program_id=TenantGate.scope(tenant, fields.program_id),
            parent_program_id=TenantGate.scope(tenant, parent) if parent else None)
        if admit is not None:
            admitted = admit(tenant, fields.program_id)
            if inspect.isawaitable(admitted):  # the answer comes from another process: the middleware awaits it
                incoming.admission = admitted
            elif not admitted:
                return over_limit(tenant) if not incoming.inferred else served_as_one_off(incoming)
        return None

    return rewrite


def program_xargs(incoming: Incoming) -> JSONResponse | None:
    """The program fields into `vllm_xargs`, where the engine client and the scheduler read them. A
    client's own `agentserve_*` xargs are refused: they would reach the scheduler unchecked (a TTL
    past --max-ttl, another tenant's program)."""
    data = incoming.data
    xargs = data.get("vllm_xargs")
    if xargs is not None and not isinstance(xargs, dict):
        return error_response(400, "vllm_xargs must be an object", "vllm_xargs")
    if xargs and any(str(k).startswith(XARG_PREFIX) for k in xargs):
        return error_response(400, f"vllm_xargs keys {XARG_PREFIX}* are reserved; use the agentserve object",
                              "vllm_xargs")
    if incoming.share is not None:  # not taken by shared_prompt
        return error_response(400, "agentserve.share needs a server started with --kvshare, on /v1/completions",
                              "agentserve.share")
    if incoming.priority is not None:
        data["vllm_xargs"] = xargs = {**(xargs or {}), XARG_PRIORITY: incoming.priority}
    if incoming.fields is not None:
        data["vllm_xargs"] = {**(xargs or {}), **to_xargs(incoming.fields)}
    elif incoming.pending is not None:  # a conversation's first turn: its next turn may come, as this program
        program = incoming.pending.program_id
        data["vllm_xargs"] = {**(xargs or {}), XARG_CONVERSATION: TenantGate.scope(incoming.tenant, program)
                              if incoming.tenant is not None else program}
    return None


def cross_model_response(data: dict, cross: CrossModelFront, scope: str):
    """The ASGI response to a completion for the cross-model variant (server/cross_model_front.py)."""

    async def respond(asgi_scope, receive, send):
        try:
            response = JSONResponse(await cross.complete(data, scope))
        except ShareError as e:
            response = error_response(400, str(e), e.param)
        await response(asgi_scope, receive, send)

    return respond


def rewrite(body: bytes, *, path: str = "/v1/chat/completions", tenant: Tenant | None = None,
            gate: TenantGate | None = None, admit: Callable[[Tenant, str], bool] | None = None,
            shares: SharedPrompts | None = None,
            headers: dict[str, str] | None = None) -> tuple[bytes, list[list[int]], JSONResponse | None]:
    """What the middleware does to one body (`headers`: the session convention headers, lower-case):
    (body to pass on, shared parts to produce, or the error response). A body it does not decode
    passes through unchanged."""
    if tenant is None and not headers and not _mentions_program(body):
        return body, [], None
    incoming = Incoming.decode(body, tenant, headers)
    if incoming is None:
        return body, [], None
    error = apply(incoming, rewriters(path, shares=shares, gate=gate, admit=admit))
    return (body, [], error) if error is not None else (incoming.encode(), incoming.produce, None)


def _error_path(message: str) -> str:
    """The field a msgspec validation message names: `... - at `$.turn`` or `... field `name``."""
    if " - at `$" in message:
        return message.rpartition(" - at `$")[2].rstrip("`")
    if "field `" in message:
        return "." + message.rpartition("field `")[2].rstrip("`")
    return ""
