"""Tenants without an engine: keys, scoping, cache salts, limits, the body and path rewriting."""

from __future__ import annotations

import json

import msgspec
import pytest

from agentserve.options import TenantsConfig
from agentserve.programs.fields import XARG_PARENT, XARG_PROGRAM
from agentserve.programs.ids import tenant_of
from agentserve.server.middleware import _scoped_program_path, rewrite
from agentserve.server.tenants import TenantGate

KEY_A, KEY_B = "sk-acme-0123456789abcdef", "sk-bolt-0123456789abcdef"
CONFIG = msgspec.convert({"tenants": [
        {"name": "acme", "api_keys": [KEY_A], "max_programs": 2, "max_ttl_s": 5.0, "max_pinned_share": 0.25},
        {"name": "bolt", "api_keys": [KEY_B]}]}, TenantsConfig)


def test_keys_authenticate_their_tenant_only():
    gate = TenantGate(CONFIG)
    assert gate.authenticate(f"Bearer {KEY_A}").name == "acme"
    assert gate.authenticate(f"Bearer {KEY_B}").name == "bolt"
    for bad in (None, "", KEY_A, f"Bearer {KEY_A[:-1]}", "Bearer ", f"Basic {KEY_A}"):
        assert gate.authenticate(bad) is None


def test_cache_salts_differ_by_tenant_and_server_secret():
    gate = TenantGate(CONFIG, secret=b"s" * 32)
    acme, bolt = gate.tenants["acme"], gate.tenants["bolt"]
    assert gate.cache_salt(acme) != gate.cache_salt(bolt)
    assert gate.cache_salt(acme) == TenantGate(CONFIG, secret=b"s" * 32).cache_salt(acme)
    assert gate.cache_salt(acme) != TenantGate(CONFIG).cache_salt(acme)  # a fresh secret per server
    assert "acme" not in gate.cache_salt(acme) and gate.cache_salt(acme, "mine").endswith(":mine")


@pytest.mark.parametrize("bad, match", [
    ({"tenants": []}, "at least one"),
    ({"tenants": [{"name": "a b", "api_keys": [KEY_A]}]}, "tenant name"),
    ({"tenants": [{"name": "a", "api_keys": ["short"]}]}, "16 characters"),
    ({"tenants": [{"name": "a", "api_keys": [KEY_A]}, {"name": "b", "api_keys": [KEY_A]}]}, "unique"),
    ({"tenants": [{"name": "a", "api_keys": [KEY_A], "max_pinned_share": 2}]}, "max_pinned_share"),
    ({"tenants": [{"name": "a", "api_keys": [KEY_A], "colour": 1}]}, "colour"),
])
def test_bad_tenant_files_are_refused_with_the_reason(tmp_path, bad, match):
    path = tmp_path / "tenants.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=match):
        TenantsConfig.load(path)


def test_yaml_tenant_file(tmp_path):
    path = tmp_path / "tenants.yaml"
    path.write_text(f"tenants:\n  - name: acme\n    api_keys: [{KEY_A}]\n    max_pinned_share: 0.2\n")
    assert TenantsConfig.load(path).pin_shares() == {"acme": 0.2}


def body(**kw) -> bytes:
    return json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}], **kw}).encode()


def test_request_bodies_are_scoped_salted_and_limited():
    gate = TenantGate(CONFIG)
    acme = gate.tenants["acme"]
    out, _, error = rewrite(body(agentserve={"program_id": "p", "parent_program_id": "root"}), tenant=acme, gate=gate)
    data = json.loads(out)
    assert error is None and data["vllm_xargs"][XARG_PROGRAM] == "acme:p" and tenant_of("acme:p") == "acme"
    assert data["vllm_xargs"][XARG_PARENT] == "acme:root"
    assert data["cache_salt"] == gate.cache_salt(acme)
    plain, _, error = rewrite(body(), tenant=acme, gate=gate)  # no program: still salted
    assert error is None and json.loads(plain)["cache_salt"] == gate.cache_salt(acme)
    _, _, error = rewrite(body(vllm_xargs={"agentserve_program_id": "bolt:p"}), tenant=acme, gate=gate)
    assert error.status_code == 400 and b"reserved" in error.body
    _, _, error = rewrite(body(cache_salt=7), tenant=acme, gate=gate)
    assert error.status_code == 400
    _, _, error = rewrite(body(agentserve={"program_id": "new"}), tenant=acme, gate=gate, admit=lambda t, p: False)
    assert error.status_code == 429 and b"acme" in error.body
    untouched = body()
    assert rewrite(untouched) == (untouched, [], None)  # no tenants, no program: as stock vLLM


def test_program_route_paths_are_scoped():
    acme = TenantGate(CONFIG).tenants["acme"]
    scope = {"path": "/v1/programs/p%2F1/tool", "raw_path": b"/v1/programs/p%2F1/tool"}
    scoped = _scoped_program_path(scope, acme)
    assert scoped["path"] == "/v1/programs/acme:p/1/tool" and scoped["raw_path"] == b"/v1/programs/acme:p%2F1/tool"
    assert _scoped_program_path({"path": "/v1/models"}, acme) == {"path": "/v1/models"}


def test_either_key_header_authenticates_and_two_tenants_keys_do_not():
    gate = TenantGate(CONFIG)
    assert gate.authenticate(None, KEY_A).name == "acme"  # x-api-key: what the Anthropic SDK sends
    assert gate.authenticate(f"Bearer {KEY_A}", KEY_A).name == "acme"
    for bearer, api_key in ((f"Bearer {KEY_A}", KEY_B), (None, "sk-wrong-0123456789abcdef"), (None, ""),
                            (f"Bearer {KEY_A}", "sk-wrong-0123456789abcdef"), (f"Basic {KEY_A}", KEY_A)):
        assert gate.authenticate(bearer, api_key) is None, (bearer, api_key)


def asgi_call(middleware, method: str, path: str, body: bytes = b"", headers: dict | None = None,
              kind: str = "http") -> tuple[int, dict, dict | None]:
    """One request through the middleware: (status, the scope and body the app got or {}, the error body)."""
    import asyncio

    seen: dict = {}

    async def app(scope, receive, send):
        message = await receive()
        seen.update(scope=scope, body=message.get("body", b""))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": kind, "method": method, "path": path, "raw_path": path.encode(),
             "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]}
    middleware.app = app
    asyncio.run(middleware(scope, receive, send))
    if kind == "websocket":
        return sent[0].get("code"), seen, None
    status = sent[0]["status"]
    error = json.loads(b"".join(m.get("body", b"") for m in sent[1:])) if status != 200 else None
    return status, seen, error


def gated():
    from agentserve.server.middleware import AgentFieldsMiddleware

    return AgentFieldsMiddleware(None, gate=TenantGate(CONFIG, secret=b"s" * 32))


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/responses",
                                  "/v1/chat/completions/batch"])
def test_every_engine_route_is_salted_under_tenants(path):
    gate = TenantGate(CONFIG, secret=b"s" * 32)
    for headers, tenant in (({"Authorization": f"Bearer {KEY_A}"}, "acme"), ({"x-api-key": KEY_B}, "bolt")):
        status, seen, _ = asgi_call(gated(), "POST", path, b'{"model": "tiny"}', headers)
        assert status == 200 and json.loads(seen["body"])["cache_salt"] == gate.cache_salt(gate.tenants[tenant])


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages", "/v1/responses"])
def test_program_fields_are_scoped_on_every_program_route(path):
    status, seen, _ = asgi_call(gated(), "POST", path, body(agentserve={"program_id": "p"}), {"x-api-key": KEY_A})
    assert status == 200 and json.loads(seen["body"])["vllm_xargs"][XARG_PROGRAM] == "acme:p"
    status, seen, _ = asgi_call(gated(), "POST", path, body(session_id="s"), {"x-api-key": KEY_A})
    assert status == 200 and json.loads(seen["body"])["vllm_xargs"][XARG_PROGRAM] == "acme:s"


def test_reserved_xargs_are_refused_on_every_engine_route_even_escaped():
    from agentserve.server.middleware import AgentFieldsMiddleware

    escaped = b'{"model": "tiny", "vllm_xargs": {"\\u0061gentserve_program_id": "bolt:p"}}'
    for path in sorted(__import__("agentserve.server.routes", fromlist=["x"]).ENGINE_ROUTES):
        for middleware, headers in ((gated(), {"x-api-key": KEY_A}), (AgentFieldsMiddleware(None), {})):
            status, seen, error = asgi_call(middleware, "POST", path, escaped, headers)
            assert status == 400 and error["error"]["param"] == "vllm_xargs", (path, status, seen)


def test_a_batch_takes_no_program_and_tenants_send_no_unscoped_state():
    status, _, error = asgi_call(gated(), "POST", "/v1/chat/completions/batch", body(agentserve={"program_id": "p"}),
                                 {"x-api-key": KEY_A})
    assert status == 400 and error["error"]["param"] == "agentserve"
    for path, field, value in (("/v1/responses", "previous_response_id", "resp_1"), ("/v1/responses", "background", True),
                               ("/v1/chat/completions", "kv_transfer_params", {"do_remote_prefill": True})):
        status, _, error = asgi_call(gated(), "POST", path, body(**{field: value}), {"x-api-key": KEY_A})
        assert status == 400 and error["error"]["param"] == field, (path, field)
    status, seen, _ = asgi_call(gated(), "POST", "/v1/responses", body(background=False), {"x-api-key": KEY_A})
    assert status == 200


def test_tenants_are_denied_every_route_not_listed():
    allowed = [("GET", "/v1/models"), ("GET", "/v1/models/tiny"), ("POST", "/tokenize"), ("GET", "/v1/agentserve/stats"),
               ("POST", "/v1/messages/count_tokens"), ("GET", "/v1/programs/p"), ("POST", "/v1/programs/p/end")]
    denied = [("GET", "/v1/responses/resp_1"), ("POST", "/v1/responses/resp_1/cancel"), ("POST", "/invocations"),
              ("POST", "/v1/embeddings"), ("POST", "/pooling"), ("POST", "/reset_prefix_cache"), ("GET", "/load"),
              ("POST", "/v1/chat/completions/"), ("GET", "/v1/chat/completions"), ("POST", "/v1/some_future_route"),
              ("POST", "/scale_elastic_ep"), ("GET", "/v1/programs/"), ("DELETE", "/v1/programs/p")]
    for method, path in allowed:
        assert asgi_call(gated(), method, path, b"{}", {"x-api-key": KEY_A})[0] == 200, (method, path)
    for method, path in denied:
        status, seen, error = asgi_call(gated(), method, path, b"{}", {"x-api-key": KEY_A})
        assert status == 403 and not seen and error["error"]["param"] == "path", (method, path)
        assert asgi_call(gated(), method, path, b"{}")[0] == 401  # no key: 401 first, nothing about routes
    assert asgi_call(gated(), "GET", "/health")[0] == 200  # public
    assert asgi_call(gated(), "GET", "/v1/realtime", kind="websocket")[0] == 1008
