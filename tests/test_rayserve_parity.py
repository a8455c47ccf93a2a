"""The Ray Serve app serves what the single server serves (2 vLLM-CPU replicas of the tiny model):
tenants (keys, scoping, per-tenant cache salt, program limits), every process's metrics on the
ingress's /metrics, program spans and vLLM's spans at the OTLP endpoint; and it refuses KV sharing
at build time, before anything starts."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request

import msgspec
import pytest

from agentserve.engine.settings import EngineSettings
from agentserve.options import ProgramOptions, TenantsConfig
from tests.test_tracing_server import Collector

pytestmark = pytest.mark.slow

PORT = 8125
BASE = f"http://127.0.0.1:{PORT}"
KEY_A, KEY_B = "sk-acme-0123456789abcdef", "sk-bolt-0123456789abcdef"
SETTINGS = EngineSettings(model="tiny", kv_tokens=4096, max_model_len=2048)
TENANTS = msgspec.convert({"tenants": [{"name": "acme", "api_keys": [KEY_A], "max_programs": 2},
                                        {"name": "bolt", "api_keys": [KEY_B]}]}, TenantsConfig)


@pytest.fixture(scope="module")
def collector():
    c = Collector()
    yield c
    c.server.stop(0)


@pytest.fixture(scope="module")
def ray_app(collector):
    from tests.conftest import serve_app

    options = ProgramOptions(policy="fixed", fixed_ttl_s=30.0, tenants=TENANTS,
                             otlp_traces_endpoint=f"http://127.0.0.1:{collector.port}")
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "200"  # the actors' span exporters flush every 0.2 s
    with serve_app(SETTINGS, options, PORT):
        yield


def call(path: str, key: str | None, body: dict | None = None) -> tuple[int, dict, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    data = json.dumps(body).encode() if body is not None else (b"" if path.endswith("/end") else None)
    req = urllib.request.Request(BASE + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            raw = r.read()
            return r.status, dict(r.headers), json.loads(raw) if raw.startswith(b"{") else {"text": raw.decode()}
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read() or b"{}")


def chat(key: str, program: str, content: str) -> tuple[dict, str]:
    status, headers, out = call("/v1/chat/completions", key, {
        "model": "tiny", "max_tokens": 2, "temperature": 0, "messages": [{"role": "user", "content": content}],
        "agentserve": {"program_id": program}})
    assert status == 200, out
    return out["usage"], headers["x-agentserve-replica"]


def test_kv_sharing_is_refused_at_build_time():
    from agentserve.options import KVShareOptions
    from agentserve.rayserve.app import check_cluster_options

    with pytest.raises(ValueError, match="not served on Ray Serve"):
        check_cluster_options(ProgramOptions(kvshare=KVShareOptions(enabled=True)))


def test_tenant_keys_scoping_and_limits_through_the_ingress(ray_app):
    assert call("/v1/models", None)[0] == 401
    assert call("/v1/models", KEY_A)[0] == 200
    chat(KEY_A, "p", "hello " * 40)
    chat(KEY_B, "p", "hello " * 40)  # the same id, another tenant: another program
    assert call("/v1/programs/p", KEY_A)[2]["llm_calls"] == 1
    assert call("/v1/programs/p", KEY_B)[2]["llm_calls"] == 1
    chat(KEY_A, "q", "more " * 40)
    assert call("/v1/programs/q", KEY_B)[0] == 404  # acme's program is unknown to bolt
    status, _, out = call("/v1/chat/completions", KEY_A, {
        "model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}],
        "agentserve": {"program_id": "r"}})
    assert status == 429 and out["error"]["param"] == "agentserve.program_id"  # acme's limit: 2 live programs
    for key, program in ((KEY_A, "p"), (KEY_A, "q"), (KEY_B, "p")):
        assert call(f"/v1/programs/{program}/end", key)[0] == 200


def test_a_tenants_cached_prefix_never_serves_another_tenant_on_the_same_replica(ray_app):
    prompt = "the shared context of both tenants " * 60
    chat(KEY_A, "salt-a", prompt)
    usage, home = chat(KEY_A, "salt-a", prompt)
    assert usage["prompt_tokens_details"]["cached_tokens"] > 0  # acme's own cache works
    # bolt's new programs, one at a time and left open: each one's pinned KV and queue count lower its
    # replica's score, so placement turns to acme's replica within a few (timing decides only how many)
    first_on_home, opened = None, []
    for i in range(12):
        opened.append(f"salt-b{i}")
        usage, replica = chat(KEY_B, f"salt-b{i}", prompt)
        if replica == home:
            first_on_home = usage["prompt_tokens_details"]["cached_tokens"] or 0
            break
    for program in opened:
        call(f"/v1/programs/{program}/end", KEY_B)
    call("/v1/programs/salt-a/end", KEY_A)
    assert first_on_home is not None, "12 new bolt programs and none placed on acme's replica"
    # the same prompt on acme's replica, another tenant: bolt's first there finds nothing cached (with
    # acme's prefix shared across tenants it would find the whole prompt)
    assert first_on_home == 0, first_on_home


def test_metrics_of_every_process_reach_the_ingress(ray_app):
    from prometheus_client.parser import text_string_to_metric_families

    usage, _ = chat(KEY_B, "metrics", "count me " * 30)
    call("/v1/programs/metrics/end", KEY_B)
    assert call("/metrics", None)[0] == 401  # tenants configured: a key on every route but /health
    deadline = time.monotonic() + 30
    while True:  # replicas send their page every 2 s
        families = {f.name: f for f in text_string_to_metric_families(call("/metrics", KEY_B)[2]["text"])}
        sources = {s.labels["replica"] for s in families.get("vllm:prompt_tokens", []).samples} \
            if "vllm:prompt_tokens" in families else set()
        if len(sources) == 2 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert len(sources) == 2, f"vLLM metrics of both replicas, labelled apart: {sources}"
    def counted(family: str, suffix: str = "") -> set[str]:  # the processes where it counted something
        return {s.labels["replica"] for s in families[family].samples if s.name.endswith(suffix) and s.value > 0}

    # every process renders every agentserve metric; each is counted where its events happen
    assert counted("agentserve_ttl_seconds", "_count") == {"control-plane"}  # the TTL policy's choices
    assert counted("agentserve_pins_created", "_total") == {"control-plane"}  # the replicas' pins, via their sync
    assert counted("agentserve_program_requests", "_total") == {"ingress"}  # what named each program


def test_program_spans_and_vllm_spans_reach_the_otlp_endpoint(ray_app, collector):
    chat(KEY_B, "traced", "trace me " * 30)
    call("/v1/programs/traced/end", KEY_B)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (collector.named("invoke_workflow bolt:traced")
                                               and collector.named("llm_request")):
        time.sleep(0.5)
    workflow = collector.named("invoke_workflow bolt:traced")  # the control plane's spans
    assert workflow, [s.name for s in collector.named("invoke_workflow")]
    assert any(c.trace_id == workflow[0].trace_id for c in collector.named("chat tiny"))
    assert collector.named("llm_request"), [s.name for s in collector.spans]  # a replica's vLLM
