"""Shared fixtures. One agentserve server (and so one vLLM engine) per test session: engine start
costs ~20-40 s on this machine."""

from __future__ import annotations

import contextlib
import os

import pytest

# A small KV budget so tests can fill it; a max model length that over-long prompts can exceed.
TEST_KV_TOKENS = 8192
TEST_MAX_MODEL_LEN = 2048


@contextlib.contextmanager
def serve_app(settings, options, port: int, replicas: int = 2):
    """agentserve's Ray Serve app on a local Ray cluster, shut down on the way out."""
    import ray
    from ray import serve

    from agentserve.rayserve.app import APP_NAME, build_app

    ray.init(num_cpus=8, include_dashboard=False)  # logical CPUs: the ingress must schedule on 2 cores
    try:
        serve.start(http_options={"port": port})
        serve.run(build_app(settings, model_id="tiny", options=options, replicas=replicas), name=APP_NAME)
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(params=["sync", "async"])
def both_schedulers(request, monkeypatch):
    """Runs a test under both of vLLM's schedulers: `offline.build_scheduler` builds what vLLM builds
    with async scheduling off (CPU) or on (GPU's default): `Scheduler` or `AsyncScheduler`, and the
    plugin's matching variant."""
    import functools

    from agentserve.engine import offline

    monkeypatch.setattr(offline, "build_scheduler",
                        functools.partial(offline.build_scheduler, async_scheduling=request.param == "async"))
    return request.param


@pytest.fixture(scope="session")
def server():
    from agentserve.server.process import ServerProcess

    # a tool-call parser: the framework integrations' agents send tools (tests/test_integrations.py)
    args = ["--model", "tiny", "--kv-tokens", str(TEST_KV_TOKENS), "--max-model-len", str(TEST_MAX_MODEL_LEN),
            "--tool-call-parser", "hermes"]
    with ServerProcess(args, env={"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}) as srv:
        yield srv
        assert srv.alive(), f"server died during the tests:\n{srv.log_tail()}"


@pytest.fixture(scope="session")
def openai_client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=120)
