"""A Ray Serve LLM app (one CPU replica of the tiny model) running agentserve's scheduler plugin:
a program's turn is pinned inside the replica and released by a control call through Serve."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from agentserve.engine.settings import EngineSettings
from agentserve.server.app import SCHEDULER_CLS

pytestmark = pytest.mark.slow

SETTINGS = EngineSettings(model="tiny", kv_tokens=4096, max_model_len=2048, scheduling_policy="priority",
                          scheduler_cls=SCHEDULER_CLS, additional_config={"agentserve": {"pin_cap_share": 0.5}})


def test_engine_kwargs_carry_the_plugin_and_the_exact_kv_budget():
    from agentserve.rayserve.app import engine_kwargs

    source, kw = engine_kwargs(SETTINGS)
    assert (Path(source) / "config.json").exists()  # the locally built model directory
    assert kw["scheduler_cls"] == SCHEDULER_CLS and kw["scheduling_policy"] == "priority"
    assert kw["num_gpu_blocks_override"] == SETTINGS.num_blocks and kw["kv_cache_memory_bytes"] > 0
    assert kw["additional_config"] == {"agentserve": {"pin_cap_share": 0.5}}
    assert "model" not in kw and "served_model_name" not in kw


@pytest.fixture(scope="module")
def ray_app():
    import ray
    from ray import serve

    from agentserve.rayserve.app import build_app

    ray.init(num_cpus=8, include_dashboard=False)  # logical CPUs: the ingress must schedule on 2 cores
    try:
        serve.start(http_options={"port": 8123})
        serve.run(build_app(SETTINGS, model_id="tiny", replicas=1), name="agentserve", blocking=False)
        yield serve.get_deployment_handle("ProgramLLMServer:tiny", app_name="agentserve")
    finally:
        serve.shutdown()
        ray.shutdown()


def chat(program: str, ttl: float) -> dict:
    body = json.dumps({"model": "tiny", "max_tokens": 4, "temperature": 0,
                       "messages": [{"role": "user", "content": " ".join(f"w{i}" for i in range(200))}],
                       "vllm_xargs": {"agentserve_program_id": program, "agentserve_ttl_s": ttl}}).encode()
    req = urllib.request.Request("http://127.0.0.1:8123/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def test_replica_pins_a_program_turn_and_releases_it_on_end(ray_app):
    assert chat("ray-p1", ttl=60.0)["choices"][0]["message"]["content"] is not None
    stats = ray_app.agentserve_control.remote("tick", {}).result(timeout_s=60)
    assert stats["pins"] == 1 and stats["pinned_blocks"] > 0 and stats["counters"]["pins_created"] == 1
    stats = ray_app.agentserve_control.remote("end", {"program_id": "ray-p1"}).result(timeout_s=60)
    assert stats["pins"] == 0 and stats["pinned_blocks"] == 0
