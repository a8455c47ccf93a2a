"""The default policy's TTL rule (`--policy agentserve`, the Continuum paper's cost-benefit rule) on
the real engine, without a host tier: with tool calls measured shorter than a re-prefill it must pin; with tool
calls far longer than any reload it must not. The rule's other inputs (the reload profile) are measured
at the server's start, as in production."""

import httpx
import pytest

from agentserve.server.process import ServerProcess

pytestmark = pytest.mark.slow

MIN_SAMPLES = 20  # the predictor trusts a tool's own distribution from this many measurements on


@pytest.fixture(scope="module")
def server():
    with ServerProcess(["--model", "tiny", "--kv-tokens", "4096", "--max-model-len", "4096",
                        "--policy", "agentserve", "--host-kv-tokens", "0"]) as srv:
        yield srv


def pins_created(srv) -> int:
    return httpx.get(srv.base_url + "/v1/agentserve/stats", timeout=30).json()["engine"]["counters"].get(
        "pins_created", 0)


def turn(srv, program: str, tool: str | None, n: int) -> dict:
    words = " ".join(f"w{(n * 7919 + i * 104729) % 100003}" for i in range(230))  # ~1,000 tokens
    body = {"model": "tiny", "messages": [{"role": "user", "content": words}], "max_tokens": 8,
            "ignore_eos": True, "agentserve": {"program_id": program, **({"tool": tool} if tool else {})}}
    r = httpx.post(srv.base_url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def measure_tool(srv, program: str, tool: str, seconds: float) -> None:
    for _ in range(MIN_SAMPLES):
        for event in ({"name": tool, "event": "start"}, {"name": tool, "event": "end", "duration_s": seconds}):
            assert httpx.post(f"{srv.base_url}/v1/programs/{program}/tool", json=event).status_code == 200


@pytest.mark.parametrize("tool, seconds, pins", [("quick", 0.001, 1), ("slow", 3000.0, 0)])
def test_the_rule_pins_exactly_when_the_tool_returns_before_a_reload_would_pay_off(server, tool, seconds, pins):
    program = f"rule-{tool}"
    turn(server, program, None, 0)
    measure_tool(server, program, tool, seconds)
    before = pins_created(server)
    turn(server, program, tool, 1)  # a non-final turn whose answer runs `tool`
    assert pins_created(server) - before == pins
    assert httpx.post(f"{server.base_url}/v1/programs/{program}/end").status_code == 200
    stats = httpx.get(server.base_url + "/v1/agentserve/stats", timeout=30).json()
    assert stats["engine"]["pins"] == 0
