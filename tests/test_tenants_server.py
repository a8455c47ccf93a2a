"""Tenants on a real server: keys on every route, programs owned by their tenant, a tenant's prefix
cache never serves another tenant (no cached tokens, no TTFT gain), per-tenant limits."""

from __future__ import annotations

import json
import os
import statistics
import time
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.slow

KEY_A, KEY_B, KEY_C = "sk-acme-0123456789abcdef", "sk-bolt-0123456789abcdef", "sk-cold-0123456789abcdef"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from agentserve.server.process import ServerProcess

    path = tmp_path_factory.mktemp("tenants") / "tenants.json"
    path.write_text(json.dumps({"tenants": [
        {"name": "acme", "api_keys": [KEY_A], "max_programs": 2, "max_ttl_s": 1.0},
        {"name": "bolt", "api_keys": [KEY_B]},
        {"name": "cold", "api_keys": [KEY_C], "max_pinned_share": 0.0}]}))
    # No host tier: the timing test below contrasts a device hit with a re-prefill, and every miss would
    # also write its blocks to the tier (the tier's keys carry the tenant's salt as the device's do).
    args = ["--model", "tiny", "--kv-tokens", "16384", "--max-model-len", "4096", "--policy", "fixed",
            "--fixed-ttl", "30", "--tenants", str(path), "--host-kv-tokens", "0"]
    with ServerProcess(args, env={"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}) as srv:
        yield srv.base_url


def call(base: str, path: str, key: str | None, body: dict | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    data = json.dumps(body).encode() if body is not None else (b"" if path.endswith("/end") else None)
    req = urllib.request.Request(base + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def chat(base: str, key: str, content: str, program: str | None = None) -> tuple[dict, float]:
    body = {"model": "tiny", "max_tokens": 1, "temperature": 0, "messages": [{"role": "user", "content": content}]}
    if program:
        body["agentserve"] = {"program_id": program}
    t0 = time.perf_counter()
    status, out = call(base, "/v1/chat/completions", key, body)
    assert status == 200, out
    return out["usage"], time.perf_counter() - t0


def test_every_route_but_health_needs_a_tenant_key(base):
    assert urllib.request.urlopen(base + "/health").status == 200
    assert call(base, "/v1/models", None)[0] == 401
    assert call(base, "/v1/models", "sk-wrong-0123456789abcdef")[0] == 401
    assert call(base, "/v1/models", KEY_A)[0] == 200
    status, out = call(base, "/v1/chat/completions", None, {"model": "tiny", "messages": []})
    assert status == 401 and out["error"]["param"] == "authorization"
    status, out = call(base, "/v1/chat/completions", KEY_A, {"model": "tiny", "max_tokens": 1,
                       "messages": [{"role": "user", "content": "x"}], "vllm_xargs": {"agentserve_program_id": "x"}})
    assert status == 400 and out["error"]["param"] == "vllm_xargs"


def test_a_tenants_prefix_cache_never_serves_another_tenant(base):
    import random

    from agentserve.models.build import ensure_model
    from workloads.filler import Filler, single_token_words

    filler = Filler(single_token_words(ensure_model("tiny")))
    warm, other = [], []
    for i in range(5):
        prompt = filler.text(1500, random.Random(i))
        cold_usage, _ = chat(base, KEY_A, prompt)
        assert cold_usage["prompt_tokens_details"]["cached_tokens"] == 0
        usage, t = chat(base, KEY_A, prompt)
        assert usage["prompt_tokens_details"]["cached_tokens"] > 1000  # the tenant's own cache works
        warm.append(t)
        usage, t = chat(base, KEY_B, prompt)  # the exact same prompt, another tenant
        assert usage["prompt_tokens_details"]["cached_tokens"] == 0
        other.append(t)
    # a hit would make B's request as fast as A's warm one; it costs a full prefill instead
    assert statistics.median(other) > 2 * statistics.median(warm), (warm, other)


def test_programs_belong_to_their_tenant_and_limits_hold(base):
    chat(base, KEY_A, "hello " * 50, program="p")
    chat(base, KEY_B, "hello " * 50, program="p")  # the same id, another tenant: another program
    assert call(base, "/v1/programs/p", KEY_A)[1]["llm_calls"] == 1
    assert call(base, "/v1/programs/q", KEY_B)[0] == 404
    chat(base, KEY_A, "more " * 50, program="q")
    status, out = call(base, "/v1/chat/completions", KEY_A, {
        "model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}],
        "agentserve": {"program_id": "r"}})
    assert status == 429 and out["error"]["param"] == "agentserve.program_id"  # acme: 2 live programs at most
    assert call(base, "/v1/programs/q/end", KEY_B)[0] == 404  # bolt cannot end acme's program
    stats = call(base, "/v1/agentserve/stats", KEY_A)[1]
    assert stats["engine"]["pins"] == 3  # acme:p, acme:q, bolt:p
    time.sleep(2.0)  # acme's pins are capped at 1 s, bolt's run the server's 30 s
    stats = call(base, "/v1/agentserve/stats", KEY_A)[1]
    assert stats["engine"]["pins"] == 1
    for key, program in ((KEY_A, "p"), (KEY_A, "q"), (KEY_B, "p")):
        assert call(base, f"/v1/programs/{program}/end", key)[0] == 200
    assert call(base, "/v1/agentserve/stats", KEY_A)[1]["engine"]["pins"] == 0
    chat(base, KEY_A, "x " * 10, program="r")  # room again
    assert call(base, "/v1/programs/r/end", KEY_A)[0] == 200
    refused = call(base, "/v1/agentserve/stats", KEY_C)[1]["engine"]["counters"].get("pins_refused", 0)
    chat(base, KEY_C, "cold " * 80, program="c")  # a tenant with no share of the KV budget for pins
    stats = call(base, "/v1/agentserve/stats", KEY_C)[1]["engine"]
    assert stats["pins"] == 0 and stats["counters"].get("pins_refused", 0) == refused + 1
    assert call(base, "/v1/programs/c/end", KEY_C)[0] == 200
