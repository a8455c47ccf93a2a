"""KV sharing on a real server (`agentserve serve --kvshare`, the vLLM connector in the engine): a prompt
given as parts through the SDK reuses its shared parts' KV under its own prefix; a content seen before
is reused exactly (same greedy tokens as a plain prefill); approximate KV never serves a plain
request; bad parts get a 400 naming the field; a server without --kvshare refuses `share`."""

from __future__ import annotations

import os
import random

import httpx
import pytest

from agentserve.sdk import AgentServe, part

pytestmark = pytest.mark.slow

MODEL = "tiny"


@pytest.fixture(scope="module")
def base():
    from agentserve.server.process import ServerProcess

    args = ["--model", MODEL, "--kv-tokens", "8192", "--max-model-len", "2048", "--kvshare"]
    with ServerProcess(args, env={"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}) as srv:
        yield srv.base_url


def reports(seed: int, n: int = 3) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(300, 4000) for _ in range(rng.randrange(40, 90))] for _ in range(n)]


def parts_for(agent: int, outputs: list[list[int]], question: list[int]) -> list[dict]:
    parts = [part([1, 50 + agent, 60, 61, 62])]  # the agent's own prefix (token ids: exact boundaries)
    for i, out in enumerate(outputs):
        parts += [part([70, 80 + i, 71]), part(out, shared=True)]
    return parts + [part([72] + question)]


def flat(parts: list[dict]) -> list[int]:
    return [t for p in parts for t in p["token_ids"]]


def test_shared_parts_are_reused_exactly_when_seen_and_never_serve_plain_requests(base):
    client = AgentServe(base)
    outputs = reports(0)
    parts = parts_for(3, outputs, [90, 91])
    end = len(flat(parts)) - 3  # through the last shared part
    with client.program() as prog:
        first = prog.complete(model=MODEL, template="agent3", parts=parts, max_tokens=6, temperature=0)
        # the first prompt of a template is prefilled in full and recorded as anchors
        assert (first.usage.prompt_tokens_details.cached_tokens or 0) < end
        again = prog.complete(model=MODEL, template="agent3", parts=parts, max_tokens=6, temperature=0)
        assert again.usage.prompt_tokens_details.cached_tokens >= end
        assert again.choices[0].text == first.choices[0].text
    # the same tokens as a plain request: salted apart, so no reused block serves it
    plain = client.openai.completions.create(model=MODEL, prompt=flat(parts), max_tokens=6, temperature=0)
    assert (plain.usage.prompt_tokens_details.cached_tokens or 0) == 0
    assert plain.choices[0].text == first.choices[0].text
    # another agent's prompt over the same reports: their bases were produced once, for both
    with client.program() as prog:
        prog.complete(model=MODEL, template="agent4", parts=parts_for(4, outputs, [92, 93]), max_tokens=2)
    stats = httpx.get(base + "/v1/kvshare/stats").json()
    # the reports and the template text between them, each produced once for both agents
    assert stats["decisions"]["produced"] == len(outputs) + len(outputs) - 1
    # `again` found most of its prompt in the (salted) local prefix cache; the connector supplied the rest
    assert stats["decisions"]["reused"] >= 1 and stats["tokens_reused"] > 0
    assert stats["decisions"]["recorded"] == 2 and stats["templates"] == 2
    metrics = httpx.get(base + "/metrics").text
    assert 'agentserve_kvshare_decisions_total{reason="reused"}' in metrics
    client.close()


@pytest.mark.parametrize("share, param", [
    ({"template": "t", "parts": [{"text": "a", "shared": True}, {"text": "b", "token_ids": [1]}]},
     "agentserve.share.parts[1]"),
    ({"template": "t", "parts": [{"text": "a"}, {"text": "b"}]}, "agentserve.share.parts"),  # nothing shared
    ({"template": "t", "parts": [{"text": "a"}, {"text": "b", "shared": True}]}, "agentserve.share.parts"),
    ({"template": "t", "parts": [{"token_ids": [10**9], "shared": True}, {"text": "q"}]},
     "agentserve.share.parts[0].token_ids"),
    ({"template": "", "parts": [{"text": "a", "shared": True}, {"text": "q"}]}, "agentserve.share.template"),
    ({"template": "t", "parts": [{"text": "a", "shared": True}, {"text": "q"}], "bogus": 1},
     "agentserve.share.bogus"),
])
def test_bad_shared_prompts_get_a_400_naming_the_field(base, share, param):
    r = httpx.post(base + "/v1/completions", json={"model": MODEL, "max_tokens": 1, "prompt": "",
                                                   "agentserve": {"program_id": "bad", "share": share}})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_a_prompt_and_parts_together_are_refused(base):
    r = httpx.post(base + "/v1/completions", json={"model": MODEL, "max_tokens": 1, "prompt": "hello", "agentserve": {
        "program_id": "p", "share": {"template": "t", "parts": [{"text": "a", "shared": True}, {"text": "q"}]}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_a_server_without_kvshare_refuses_share(server):
    import openai

    client = AgentServe(server.base_url)
    # the refusal surfaces as the OpenAI error (the program's end on the way out does not hide it)
    with pytest.raises(openai.BadRequestError, match="--kvshare"), client.program() as prog:
        prog.complete(model=MODEL, template="t", parts=[part("a", shared=True), part("b")], max_tokens=1)
    client.close()


def test_a_claim_the_worker_cannot_build_is_recomputed_and_recorded(base):
    """The scheduler process claims tokens on its copy of the planner's knowledge; the worker's anchor
    pool may still refuse on the values (random reports are equally far from every anchor). The claimed
    blocks are then recomputed by vLLM: the answer is a plain prefill's, and the prompt is recorded."""
    client = AgentServe(base)
    claimed_and_refused = 0
    for i in range(8):
        parts = parts_for(5, reports(100 + i), [90, 91])
        before = httpx.get(base + "/v1/kvshare/stats").json()["decisions"]
        with client.program() as prog:
            shared = prog.complete(model=MODEL, template="refusals", parts=parts, max_tokens=6, temperature=0)
        after = httpx.get(base + "/v1/kvshare/stats").json()["decisions"]
        plain = client.openai.completions.create(model=MODEL, prompt=flat(parts), max_tokens=6, temperature=0)
        assert shared.choices[0].text == plain.choices[0].text
        if after.get("recomputed", 0) > before.get("recomputed", 0):
            claimed_and_refused += 1
            assert shared.usage.prompt_tokens_details.cached_tokens > 0  # it was claimed
            assert after["recorded"] == before.get("recorded", 0) + 1
    assert claimed_and_refused >= 1
    client.close()
