"""Program identity from the session conventions (programs/sessions.py), through the middleware's
rewrite, without an engine."""

from __future__ import annotations

import json

import pytest

from agentserve.programs.fields import XARG_ENDS, XARG_IS_LAST, XARG_PROGRAM, ProgramFields, from_xargs
from agentserve.programs.sessions import END_HEADER, SESSION_HEADER, SessionError, program_fields
from agentserve.server.middleware import rewrite


def _xargs(body: dict, headers: dict | None = None) -> dict | None:
    out, _, err = rewrite(json.dumps({"model": "m", "messages": [], **body}).encode(), headers=headers)
    assert err is None, err and err.body
    return json.loads(out).get("vllm_xargs")


@pytest.mark.parametrize("body, headers, expected", [
    ({"agentserve": {"program_id": "obj"}, "session_id": "body"}, {SESSION_HEADER: "hdr"}, "obj"),
    ({"session_id": "body"}, {SESSION_HEADER: "hdr"}, "body"),
    ({"vllm_xargs": {"session_id": "xarg"}}, {SESSION_HEADER: "hdr"}, "hdr"),
    ({"vllm_xargs": {"session_id": "xarg"}}, {}, "xarg"),
])
def test_the_program_is_the_first_convention_found(body, headers, expected):
    assert _xargs(body, headers)[XARG_PROGRAM] == expected


@pytest.mark.parametrize("metadata, expected", [
    ({"session_id": "s-1"}, "s-1"),
    ({"user_id": "user_ab12_account_5f0e_session_3c9a-77d1"}, "3c9a-77d1"),  # Claude Code's
    ({"user_id": "alice"}, None),  # a person, not a program
])
def test_the_messages_metadata_names_a_session(metadata, expected):
    xargs = _xargs({"metadata": metadata})
    assert (xargs or {}).get(XARG_PROGRAM) == expected


def test_the_session_id_stays_for_vllm():
    out, _, _ = rewrite(json.dumps({"model": "m", "session_id": "s"}).encode())
    data = json.loads(out)
    assert data["session_id"] == "s" and data["vllm_xargs"][XARG_PROGRAM] == "s"


def test_without_a_convention_the_body_is_untouched():
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    assert rewrite(body) == (body, [], None)
    assert rewrite(body, headers={}) == (body, [], None)


@pytest.mark.parametrize("value", ["true", "1", "YES", " True "])
def test_the_end_header_ends_the_program_with_its_call(value):
    xargs = _xargs({"session_id": "s"}, {END_HEADER: value})
    assert xargs[XARG_ENDS] is True and xargs[XARG_IS_LAST] is True
    fields = from_xargs(xargs)
    assert fields.ends_program and fields.is_last_turn


def test_the_end_header_applies_to_the_object_too_and_false_is_no_end():
    assert _xargs({"agentserve": {"program_id": "p"}}, {END_HEADER: "true"})[XARG_ENDS] is True
    assert XARG_ENDS not in _xargs({"agentserve": {"program_id": "p"}}, {END_HEADER: "false"})
    # the object's own flag implies a last turn
    assert _xargs({"agentserve": {"program_id": "p", "ends_program": True}})[XARG_IS_LAST] is True


@pytest.mark.parametrize("body, headers, param", [
    ({"session_id": 7}, {}, "session_id"),
    ({"session_id": "x" * 300}, {}, "session_id"),
    ({"session_id": ""}, {}, "session_id"),
    ({}, {SESSION_HEADER: "x" * 300}, SESSION_HEADER),
    ({"vllm_xargs": {"session_id": 3}}, {}, "vllm_xargs.session_id"),
    ({"session_id": "s"}, {END_HEADER: "soon"}, END_HEADER),
    ({}, {END_HEADER: "true"}, END_HEADER),  # an end with no program to end
])
def test_a_bad_convention_gets_a_400_naming_it(body, headers, param):
    _, _, err = rewrite(json.dumps({"model": "m", **body}).encode(), headers=headers)
    assert err is not None and err.status_code == 400
    assert json.loads(err.body)["error"]["param"] == param


def test_program_fields_is_pure_and_says_what_named_the_program():
    assert program_fields(None, {}, {}) == (None, None)
    f = ProgramFields(program_id="p", turn=3, tool="bash")
    assert program_fields(f, {"session_id": "other"}, {}) == (f, "agentserve")  # the object wins, unchanged
    assert program_fields(None, {}, {SESSION_HEADER: "h"}) == (ProgramFields(program_id="h"), SESSION_HEADER)
    with pytest.raises(SessionError):
        program_fields(None, {"session_id": None}, {END_HEADER: "1"})


# -- on a real server: a plain OpenAI client, no agentserve object --------------------------------------

def _described(server, program_id: str):
    import httpx

    return httpx.get(f"{server.base_url}/v1/programs/{program_id}", timeout=30)


@pytest.mark.slow
def test_a_plain_openai_client_names_its_program_by_session(server, openai_client):
    msgs = [{"role": "user", "content": "You are a coding agent. " * 30}]
    openai_client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, extra_body={"session_id": "sess-a"})
    r = openai_client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2,
                                              extra_headers={"X-Session-ID": "sess-a"})
    assert r.usage.prompt_tokens_details.cached_tokens > 0
    assert _described(server, "sess-a").json()["llm_calls"] == 2  # the body's and the header's: one program
    import httpx

    metrics = httpx.get(server.base_url + "/metrics", timeout=30).text
    assert 'agentserve_program_requests_total{named_by="session_id"}' in metrics
    assert 'agentserve_program_requests_total{named_by="x-session-id"}' in metrics
    openai_client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2,
                                          extra_headers={"x-session-id": "sess-a", END_HEADER: "true"})
    import time

    for _ in range(50):  # the end follows the call's end
        if _described(server, "sess-a").status_code == 404:
            break
        time.sleep(0.1)
    assert _described(server, "sess-a").status_code == 404


@pytest.mark.slow
def test_a_bad_session_gets_a_400_and_no_session_is_no_program(server, openai_client):
    import httpx
    import openai

    with pytest.raises(openai.BadRequestError, match="session_id"):
        openai_client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=2, extra_body={"session_id": "x" * 300})
    before = httpx.get(server.base_url + "/v1/agentserve/stats", timeout=30).json()["programs"]
    openai_client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert httpx.get(server.base_url + "/v1/agentserve/stats", timeout=30).json()["programs"] == before


def test_a_client_cannot_mark_its_program_inferred():
    _, _, err = rewrite(json.dumps({"model": "m", "agentserve": {"program_id": "p", "inferred": True}}).encode())
    assert err is not None and err.status_code == 400 and b"agentserve.inferred" in err.body
