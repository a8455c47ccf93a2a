"""The front end of KV sharing (agentserve/server/shared_prompts.py) without an engine: parts become a
token prompt with exact part boundaries, the segment map and a salt of their own; bad parts are refused
naming the field; a part is produced once per scope."""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest

from agentserve.kvshare.planner import PARAMS_KEY, decode_spec
from agentserve.programs.fields import XARG_PROGRAM, SharedPrompt
from agentserve.server.middleware import rewrite
from agentserve.server.shared_prompts import SALT, ShareError, SharedPrompts


class WordTokenizer:
    """One token per word: its length (so tests can predict ids)."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        assert not add_special_tokens
        return [len(w) for w in text.split()]


class FakeEngine:
    def __init__(self):
        self.prompts = []

    async def generate(self, prompt, params, request_id):
        self.prompts.append((prompt["prompt_token_ids"], params.extra_args["kv_transfer_params"][PARAMS_KEY]))
        yield None


def share(*parts) -> SharedPrompt:
    return msgspec.convert({"template": "critic", "parts": list(parts)}, SharedPrompt)


def test_parts_become_a_token_prompt_with_its_segment_map_and_salt():
    shares = SharedPrompts(FakeEngine(), WordTokenizer(), vocab_size=100)
    data = {"model": "m", "prompt": ""}
    produced = shares.translate(data, share({"text": "a bb"}, {"text": "ccc dddd", "shared": True},
                                            {"token_ids": [7, 8]}, {"token_ids": [9], "shared": True},
                                            {"text": "q"}), scope="acme")
    assert data["prompt"] == [1, 2, 3, 4, 7, 8, 9, 1]
    spec = decode_spec(data["kv_transfer_params"])
    assert spec.segments == [(2, 2), (6, 1)] and spec.template == "critic" and spec.scope == "acme"
    assert produced == [[3, 4], [7, 8], [9]]  # the shared parts and the text between them
    assert data["cache_salt"] == SALT
    salted = {"prompt": None, "cache_salt": "mine"}
    shares.translate(salted, share({"text": "a"}, {"text": "b", "shared": True}, {"text": "c"}), scope="")
    assert salted["cache_salt"] == f"mine:{SALT}"


@pytest.mark.parametrize("parts, param", [
    ([{"text": "a", "token_ids": [1]}, {"text": "b", "shared": True}, {"text": "c"}], "agentserve.share.parts[0]"),
    ([{"text": "a"}, {"text": "b"}], "agentserve.share.parts"),
    ([{"text": "a"}, {"text": "b", "shared": True}], "agentserve.share.parts"),
    ([{"token_ids": [100], "shared": True}, {"text": "c"}], "agentserve.share.parts[0].token_ids"),
    ([{"text": "", "shared": True}, {"text": "c"}], "agentserve.share.parts[0]"),
])
def test_bad_parts_are_refused_naming_the_field(parts, param):
    shares = SharedPrompts(FakeEngine(), WordTokenizer(), vocab_size=100)
    with pytest.raises(ShareError) as e:
        shares.translate({"prompt": ""}, share(*parts), scope="")
    assert e.value.param == param


def test_the_middleware_rewrite_and_a_prompt_given_twice():
    shares = SharedPrompts(FakeEngine(), WordTokenizer(), vocab_size=100)
    body = json.dumps({"model": "m", "prompt": "", "agentserve": {"program_id": "p", "share": {
        "template": "t", "parts": [{"text": "x", "shared": True}, {"text": "yy"}]}}}).encode()
    out, produce, error = rewrite(body, path="/v1/completions", shares=shares)
    assert error is None and produce == [[1]]
    data = json.loads(out)  # the program fields go on as usual, without the parts
    assert data["prompt"] == [1, 2] and data["vllm_xargs"][XARG_PROGRAM] == "p" and "agentserve" not in data
    twice = json.dumps({"model": "m", "prompt": "hi", "agentserve": {"program_id": "p", "share": {
        "template": "t", "parts": [{"text": "x", "shared": True}, {"text": "yy"}]}}}).encode()
    _, _, error = rewrite(twice, path="/v1/completions", shares=shares)
    assert error.status_code == 400 and json.loads(error.body)["error"]["param"] == "prompt"
    # a share the server did not take (no --kvshare): refused, not silently ignored
    _, _, error = rewrite(body, path="/v1/completions")
    assert error.status_code == 400 and json.loads(error.body)["error"]["param"] == "agentserve.share"


def test_a_part_is_produced_once_per_scope():
    engine = FakeEngine()
    shares = SharedPrompts(engine, WordTokenizer(), vocab_size=100)
    asyncio.run(shares.produce([[1, 2], [3]], "a"))
    asyncio.run(shares.produce([[1, 2]], "a"))
    asyncio.run(shares.produce([[1, 2]], "b"))
    assert [p for p, _ in engine.prompts] == [[1, 2], [3], [1, 2]]
    assert all(spec["produce"] for _, spec in engine.prompts) and engine.prompts[2][1]["scope"] == "b"
