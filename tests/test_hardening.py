"""Bad input, load and lifecycle on a real server: >= 1,000 fuzzed requests over every route never
get a 5xx and leak no pin; 200 concurrent programs complete; a client that disconnects mid-stream
frees its request; a graceful shutdown releases every pin."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.slow

PROGRAMS = [f"fuzz-{i}" for i in range(4)]
scalars = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                      max_leaves=6)
agent_fields = st.fixed_dictionaries({}, optional={
    "program_id": st.sampled_from(PROGRAMS) | values, "turn": st.integers(-2, 6) | values,
    "is_last_turn": st.booleans() | values, "tool": st.sampled_from(["bash", None]) | values,
    "parent_program_id": st.sampled_from(PROGRAMS + [None]) | values, "extra": values})
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]) | values,
                                           "content": st.text(max_size=40) | values}), max_size=3) | values
chat_body = st.fixed_dictionaries({"model": st.just("tiny") | values, "messages": messages}, optional={
    "max_tokens": st.integers(-2, 6) | values, "stream": st.booleans(), "temperature": st.floats(-1, 3) | values,
    "agentserve": agent_fields | values, "vllm_xargs": values, "n": st.integers(0, 2)})
completion_body = st.fixed_dictionaries({"model": st.just("tiny"), "prompt": st.text(max_size=40) | values}, optional={
    "max_tokens": st.integers(-2, 6), "agentserve": agent_fields})
tool_body = st.fixed_dictionaries({}, optional={"name": st.sampled_from(["bash", "search"]) | values,
                                                "event": st.sampled_from(["start", "end"]) | values,
                                                "duration_s": st.floats(-5, 5) | values})
requests = st.one_of(
    st.tuples(st.just("POST"), st.just("/v1/chat/completions"), chat_body),
    st.tuples(st.just("POST"), st.just("/v1/completions"), completion_body),
    st.tuples(st.just("POST"), st.sampled_from([f"/v1/programs/{p}/tool" for p in PROGRAMS]), tool_body | values),
    st.tuples(st.just("POST"), st.sampled_from([f"/v1/programs/{p}/end" for p in PROGRAMS]), st.none()),
    st.tuples(st.just("GET"), st.sampled_from([f"/v1/programs/{p}" for p in PROGRAMS] + ["/v1/agentserve/stats"]),
              st.none()),
    st.tuples(st.just("POST"), st.sampled_from(["/v1/chat/completions", "/v1/programs/x/tool"]),
              st.binary(max_size=40)),  # not JSON at all
)


def test_fuzzed_requests_never_get_a_5xx_and_leak_no_pin(server):
    client = httpx.Client(base_url=server.base_url, timeout=60)
    seen: dict[int, int] = {}

    @settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(requests)
    def fuzz(request):
        method, path, body = request
        kwargs = {"content": body} if isinstance(body, bytes) else ({"json": body} if body is not None else {})
        r = client.request(method, path, **kwargs)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (method, path, body, r.status_code, r.text[:500])

    try:
        fuzz()
        assert sum(seen.values()) >= 1000 and any(200 <= s < 300 for s in seen), seen
        assert client.get("/health").status_code == 200  # still up
        for p in PROGRAMS:
            client.post(f"/v1/programs/{p}/end")
        deadline = time.monotonic() + 10
        while (stats := client.get("/v1/agentserve/stats").json())["engine"].get("pins") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert stats["engine"]["pins"] == 0 and stats["engine"]["pinned_blocks"] == 0, stats
    finally:
        client.close()


def test_two_hundred_concurrent_programs_complete(server):
    from agentserve.models.build import ensure_model
    from workloads import DEFAULT_TRACE
    from workloads.driver import Driver
    from workloads.filler import Filler, single_token_words
    from workloads.formats import load_trace
    from workloads.plan import ReplayConfig, plan
    from workloads.tool_times import ToolTimeModel

    cfg = ReplayConfig(programs=200, rate=None, concurrency=200, token_scale=0.05, time_scale=0.2, max_turns=3,
                       seed=3)
    programs = plan(load_trace(str(DEFAULT_TRACE)), cfg, ToolTimeModel.load(), 2048)
    driver = Driver(server.base_url, "tiny", Filler(single_token_words(ensure_model("tiny"))), seed=3)
    records = asyncio.run(driver.run(programs, cfg.concurrency))
    assert [r.error for r in records if r.error] == [] and len(records) == 200
    assert sum(len(r.turns) for r in records) == sum(len(p.turns) for p in programs)
    stats = httpx.get(server.base_url + "/v1/agentserve/stats").json()
    assert stats["programs"] == 0 and stats["engine"]["pins"] == 0


def test_concurrent_programs_that_disconnect_or_end_mid_call_leave_nothing_live():
    """96 programs at once, three turns each, every turn pinned for 60 s: a quarter disconnect
    mid-stream and then end, a quarter end while their last call still streams (the end reaches the
    engine before the call leaves it), the rest run to completion and end. Once all are done: no live
    program, no pin, no host chunk held."""
    from agentserve.server.process import ServerProcess

    args = ["--model", "tiny", "--kv-tokens", "16384", "--max-model-len", "2048", "--policy", "fixed",
            "--fixed-ttl", "60"]
    with ServerProcess(args, env={"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}) as srv:
        concurrent_programs_leave_nothing_live(srv.base_url)


def concurrent_programs_leave_nothing_live(base: str) -> None:

    async def program(client: httpx.AsyncClient, i: int) -> None:
        pid = f"churn-{i}"
        kind = ("disconnect", "end-mid-call", "complete", "complete")[i % 4]
        history = " ".join(f"p{i}w{j}" for j in range(120))
        for turn in range(3):
            last = turn == 2
            body = {"model": "tiny", "max_tokens": 64, "ignore_eos": True, "stream": True, "temperature": 0,
                    "messages": [{"role": "user", "content": history}],
                    "agentserve": {"program_id": pid, "turn": turn}}
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200, await r.aread()
                lines = r.aiter_lines()
                for _ in range(4):
                    await anext(lines)
                if last and kind == "disconnect":
                    break  # the connection closes mid-generation
                if last and kind == "end-mid-call":
                    assert (await client.post(f"/v1/programs/{pid}/end")).status_code == 200
                async for _ in lines:
                    pass
            history += f" turn {turn} " + " ".join(f"t{turn}x{j}" for j in range(30))
        if kind != "end-mid-call":
            assert (await client.post(f"/v1/programs/{pid}/end")).status_code == 200

    async def run() -> None:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as client:
            await asyncio.gather(*(program(client, i) for i in range(96)))

    asyncio.run(run())

    def settled() -> dict:
        return httpx.get(base + "/v1/agentserve/stats").json()

    assert wait_for(lambda: settled()["engine"]["queued"] == 0, 30)
    time.sleep(1.0)  # the calls' ends are reported in tasks of their own
    stats = settled()
    assert stats["programs"] == 0, stats
    engine = stats["engine"]
    assert engine["pins"] == 0 and engine["pinned_blocks"] == 0 and engine["programs"] == 0, engine
    assert engine["host_tier"] is None or engine["host_tier"]["in_use"] == 0, engine["host_tier"]


def metric(base_url: str, name: str, labels: str = "", headers: dict | None = None) -> float:
    r = httpx.get(base_url + "/metrics", headers=headers)
    assert r.status_code == 200, r.text
    text = r.text
    pattern = rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$"  # with or without labels
    return sum(float(v) for ls, v in re.findall(pattern, text, re.M) if labels in ls)


def wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_a_client_disconnecting_mid_stream_frees_its_request(server):
    """The engine stops generating where the client left: tokens are counted from just after the client
    closes, not from the request's start, because this 2-core machine can stall the test process
    (garbage collection, CPU contention: ~1 s seen) while the engine streams ~500 tokens/s into socket
    buffers. An attempt in which the client left late (the request past its middle) proves nothing
    either way and is repeated."""
    base = server.base_url
    for attempt in range(3):
        program = f"disconnect-{attempt}"
        body = {"model": "tiny", "max_tokens": 1900, "stream": True, "ignore_eos": True,
                "messages": [{"role": "user", "content": "go"}], "agentserve": {"program_id": program}}
        start = metric(base, "vllm:generation_tokens_total")
        with httpx.Client(base_url=base, timeout=60) as client:
            with client.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200, r.read()
                lines = r.iter_lines()
                for _ in range(20):  # tokens are streaming: the request is running
                    next(lines)
            # the connection closes here, mid-generation
        closed = metric(base, "vllm:generation_tokens_total")
        assert wait_for(lambda: metric(base, "vllm:num_requests_running") == 0, 15)
        time.sleep(3)  # ~1,500 tokens' time here: had the request run on, they would be counted
        after = metric(base, "vllm:generation_tokens_total")
        httpx.post(f"{base}/v1/programs/{program}/end")
        if closed - start > 1000:  # the client left late: a request left running has < 900 tokens to go
            continue
        # a request left running would add its remaining >= 900 tokens, an aborted one next to none
        assert after - closed < 500, (f"{after - closed:.0f} tokens generated after the client left "
                                      f"({closed - start:.0f} before)")
        return
    pytest.fail("the client left late in all 3 attempts: no disconnect was measured")


def test_graceful_shutdown_releases_every_pin():
    from agentserve.server.process import ServerProcess

    args = ["--model", "tiny", "--kv-tokens", "4096", "--max-model-len", "2048", "--policy", "fixed",
            "--fixed-ttl", "60"]
    srv = ServerProcess(args, env={"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}).start()
    try:
        for p in ("down-1", "down-2"):
            r = httpx.post(srv.base_url + "/v1/chat/completions", timeout=60, json={
                "model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hello " * 100}],
                "agentserve": {"program_id": p}})
            assert r.status_code == 200
        assert httpx.get(srv.base_url + "/v1/agentserve/stats").json()["engine"]["pins"] == 2
        os.kill(srv.proc.pid, signal.SIGTERM)  # as a container runtime or systemd stops the server
        srv.proc.wait(timeout=60)
        assert "released 2 pin(s) at shutdown" in srv.log_tail(200)
    finally:
        srv.stop()
