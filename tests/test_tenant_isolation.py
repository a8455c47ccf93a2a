"""Tenant isolation through every tier on the real engine (tiny model, 2,048 tokens of device KV, a
host tier of 16k): on every engine route, with and without a session id, tenant A's prompt is pushed
out of device memory into the host tier by other traffic, then tenant B sends exactly A's prompt and
finds nothing cached, while A gets its own prompt back from the host tier."""

from __future__ import annotations

import json
import os

import httpx
import pytest

from tests.test_hardening import metric
from tests.test_host_tier import BLOCK, words

pytestmark = pytest.mark.slow

KEYS = {"acme": "sk-acme-0123456789abcdef", "bolt": "sk-bolt-0123456789abcdef", "cold": "sk-cold-0123456789abcdef"}
# (route, body for a prompt, cached tokens of a response)
ROUTES = {
    "chat": ("/v1/chat/completions",
             lambda text: {"messages": [{"role": "user", "content": text}], "max_tokens": 2},
             lambda out: out["usage"]["prompt_tokens_details"]["cached_tokens"]),
    "completions": ("/v1/completions", lambda text: {"prompt": text, "max_tokens": 2},
                    lambda out: out["usage"]["prompt_tokens_details"]["cached_tokens"]),
    "messages": ("/v1/messages", lambda text: {"messages": [{"role": "user", "content": text}], "max_tokens": 2},
                 lambda out: out["usage"].get("cache_read_input_tokens") or 0),
    "responses": ("/v1/responses", lambda text: {"input": text, "max_output_tokens": 2},
                  lambda out: out["usage"]["input_tokens_details"]["cached_tokens"]),
    "batch": ("/v1/chat/completions/batch",  # its usage has no cached tokens: the engine's count only
              lambda text: {"messages": [[{"role": "user", "content": text}]], "max_tokens": 2},
              lambda out: None),
}


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    from agentserve.server.process import ServerProcess

    path = tmp_path_factory.mktemp("isolation") / "tenants.json"
    path.write_text(json.dumps({"tenants": [{"name": n, "api_keys": [k]} for n, k in KEYS.items()]}))
    args = ["--model", "tiny", "--kv-tokens", "2048", "--max-model-len", "2048", "--host-kv-tokens", "16384",
            "--tenants", str(path)]
    with ServerProcess(args, env={"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}) as s:
        yield s


def send(srv, tenant: str, route: str, text: str, session: str | None = None, header: str = "x-api-key") -> int:
    """The request's cached tokens, as the engine counted them (from any tier); the same as the
    response's usage says, where the route reports it."""
    path, body, reported = ROUTES[route]
    before = engine_cached(srv)
    headers = {"x-api-key": KEYS[tenant]} if header == "x-api-key" else {"Authorization": f"Bearer {KEYS[tenant]}"}
    if session is not None:
        headers["X-Session-ID"] = session
    r = httpx.post(srv.base_url + path, json={"model": "tiny", "temperature": 0, **body(text)}, headers=headers,
                   timeout=120)
    assert r.status_code == 200, (route, r.status_code, r.text)
    cached = engine_cached(srv) - before
    assert reported(r.json()) in (None, cached), (route, r.json()["usage"], cached)
    return cached


def engine_cached(srv, source: str = "") -> float:
    """Prompt tokens served from a cache so far (`source`: only those of one tier, e.g. host)."""
    return metric(srv.base_url, "vllm:prompt_tokens_cached_by_source_total", source,
                  headers={"x-api-key": KEYS["cold"]})


def host_loads(srv) -> float:
    return engine_cached(srv, 'source="host"')


def push_out_of_device(srv, seed: int) -> None:
    """One-off prompts of another tenant, twice the device KV: every block of A's prompt leaves the device."""
    for i in range(3):
        send(srv, "cold", "chat", words(seed * 100 + i, 1500))


@pytest.mark.parametrize("route, session", [(r, s) for r in ROUTES for s in (None, "s-1") if (r, s) != ("batch", "s-1")])
def test_another_tenant_never_gets_a_tenants_prefix_from_any_tier(srv, route, session):
    seed = 1 + list(ROUTES).index(route) * 2 + (session is not None)
    text = words(seed, 1000)
    assert send(srv, "acme", route, text, session, header="authorization") == 0
    push_out_of_device(srv, seed)
    loads = host_loads(srv)
    assert send(srv, "bolt", route, text, session) == 0  # the exact same prompt, another tenant
    assert host_loads(srv) == loads
    assert send(srv, "acme", route, text, session) >= 0.9 * (1000 // BLOCK * BLOCK)  # acme's own, kept
    assert host_loads(srv) > loads  # ... and it came back from the host tier
    if session is not None:
        for tenant in ("acme", "bolt"):
            r = httpx.post(f"{srv.base_url}/v1/programs/{session}/end", headers={"x-api-key": KEYS[tenant]})
            assert r.status_code == 200, r.text


def test_a_batch_refuses_a_session_and_nothing_is_left_held(srv):
    r = httpx.post(srv.base_url + "/v1/chat/completions/batch", headers={"x-api-key": KEYS["acme"], "X-Session-ID": "s"},
                   json={"model": "tiny", "messages": [[{"role": "user", "content": "x"}]], "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "agentserve"
    stats = httpx.get(srv.base_url + "/v1/agentserve/stats", headers={"x-api-key": KEYS["acme"]}, timeout=30).json()
    assert stats["programs"] == 0 and stats["engine"]["pins"] == 0 and stats["engine"]["host_tier"]["in_use"] == 0
