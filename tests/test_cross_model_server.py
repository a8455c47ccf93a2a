"""Cross-model reuse on a real server (`agentserve serve --model kvret --kvshare --cross-model kvret-ft`):
the layer group is profiled at start-up; a kvret-ft completion whose prompt starts with the prefix a
kvret request shared reuses it (exactly what the library computes with that group); without such a
prefix kvret-ft prefills in full; fields the path cannot honour get a 400 naming them; counted on
/metrics and /v1/kvshare/stats."""

from __future__ import annotations

import os
import random

import httpx
import pytest

from agentserve.models import kvret_task as kvret
from agentserve.kvshare.parts import Shared, flatten
from agentserve.sdk import AgentServe, part

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base():
    from agentserve.server.process import ServerProcess

    args = ["--model", "kvret", "--kv-tokens", "8192", "--max-model-len", "2048", "--kvshare",
            "--kvshare-correction", "none", "--cross-model", "kvret-ft"]
    with ServerProcess(args, env={"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}) as srv:
        yield srv.base_url


@pytest.fixture(scope="module")
def library(base):
    """The library's answer for the group the server chose (same weights, same group)."""
    from transformers import AutoModelForCausalLM

    from agentserve.kvshare.cross_reuse import CrossModelReuse
    from agentserve.models.catalog import trained_model_dir

    from transformers import AutoTokenizer

    group = tuple(httpx.get(f"{base}/v1/kvshare/stats").json()["cross_model"]["group"])
    load = lambda n: AutoModelForCausalLM.from_pretrained(str(trained_model_dir(n))).float().eval()  # noqa: E731
    reuse = CrossModelReuse(load("kvret"), load("kvret-ft"), group, max_bytes=1 << 26)
    reuse.tokenizer = AutoTokenizer.from_pretrained(str(trained_model_dir("kvret")))
    return reuse


def episode_parts(seed: int):
    rng = random.Random(seed)
    ep = kvret.episode(rng)
    context = kvret.consumer_parts(ep, 0)
    q_sender, q_receiver = kvret.questions(rng, ep, 0, 2, reverse=0.0)
    as_sdk = [part(p.ids, shared=isinstance(p, Shared)) for p in context]
    ends, at = [], 0
    for p in context:
        at += len(p.ids)
        if isinstance(p, Shared):
            ends.append(at)
    return as_sdk, flatten(context), ends, q_sender.prompt, q_receiver.prompt


def test_the_profiled_group_is_on_the_front_within_the_bound(base):
    stats = httpx.get(f"{base}/v1/kvshare/stats").json()["cross_model"]
    front = {tuple(g["group"]): g["kl"] for g in stats["front"]}
    assert tuple(stats["group"]) in front and front[tuple(stats["group"])] <= 0.05
    assert [g["layers"] for g in stats["front"]] == sorted(g["layers"] for g in stats["front"])


def test_a_variant_reuses_the_prefix_the_served_model_shared(base, library):
    client = AgentServe(base)
    parts, context, ends, q_sender, q_receiver = episode_parts(1)
    with client.program() as prog:
        sender = prog.complete(model="kvret", template="agent0", parts=parts + [part(q_sender)], max_tokens=1,
                               temperature=0)
        assert sender.choices[0].text
        got = prog.complete(model="kvret-ft", template="agent0", parts=parts + [part(q_receiver)], max_tokens=3,
                            temperature=0)
    details = got.model_extra["agentserve"]["cross_model"]
    assert details["reason"] == "reused" and details["reused_tokens"] == ends[-1]
    assert got.usage.prompt_tokens_details.cached_tokens == ends[-1]
    library.prepare(context[: ends[-1]])
    want = library.complete(context + q_receiver, ends, 3)
    assert got.choices[0].text == library.tokenizer.decode(want.tokens)


def test_a_sharing_request_needs_no_program(base):
    parts, _, _, q, _ = episode_parts(3)
    r = httpx.post(f"{base}/v1/completions", json={"model": "kvret", "prompt": "", "max_tokens": 1, "agentserve": {
        "share": {"template": "agent0", "parts": parts + [part(q)]}}}, timeout=60)
    assert r.status_code == 200, r.text


def test_without_a_shared_prefix_the_variant_prefills_in_full(base, library):
    _, context, _, _, q = episode_parts(2)
    plain = httpx.post(f"{base}/v1/completions", json={"model": "kvret-ft", "prompt": context + q,
                                                       "max_tokens": 3, "temperature": 0}, timeout=60).json()
    assert plain["agentserve"]["cross_model"]["reason"] == "no_sender_prefix"
    assert plain["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert plain["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("extra,field", [({"temperature": 0.7}, "temperature"), ({"stream": True}, "stream"),
                                         ({"stop": ["x"]}, "stop"), ({"n": 2}, "n"), ({"prompt": []}, "prompt"),
                                         ({"prompt": [10 ** 9]}, "prompt"), ({"max_tokens": 0}, "max_tokens")])
def test_fields_the_path_cannot_honour_are_refused_by_name(base, extra, field):
    body = {"model": "kvret-ft", "prompt": [5, 6, 7], "max_tokens": 2, **extra}
    r = httpx.post(f"{base}/v1/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


def test_cross_model_requests_are_counted(base):
    text = httpx.get(f"{base}/metrics").text
    assert 'agentserve_kvshare_cross_model_requests_total{reason="reused"}' in text
    assert 'agentserve_kvshare_cross_model_requests_total{reason="no_sender_prefix"}' in text
