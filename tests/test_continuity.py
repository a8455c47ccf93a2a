"""Programs inferred from conversation continuity (programs/continuity.py), the answer read back from a
response (server/answers.py) and both through the middleware, without an engine."""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest
from hypothesis import given, settings, strategies as st

from agentserve.programs.continuity import MAX_EXTENSIONS, USER_TURN, Conversations
from agentserve.programs.fields import XARG_MAY_RETURN, XARG_PROGRAM, XARG_TOOLS_DONE, XARG_TURN
from agentserve.server.answers import AnswerReader
from agentserve.server.middleware import AgentFieldsMiddleware


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _call(name: str, args: str, call_id: str = "call_1") -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


def _turn(index: Conversations, messages: list[dict], answer: dict, scope: str = ""):
    turn, pending = index.begin(scope, messages)
    index.answered(pending, answer)
    return turn


def test_a_plain_loop_becomes_one_program_at_its_second_turn_with_its_tool_times():
    clock = Clock()
    index = Conversations(clock=clock)
    history = [{"role": "system", "content": "You are an agent."}, {"role": "user", "content": "fix the bug"}]
    answer = {"role": "assistant", "content": None, "tool_calls": [_call("bash", '{"cmd": "ls"}')]}
    first = _turn(index, history, answer)
    assert (first.kind, first.program_id) == ("first", None)  # a first turn stays a one-off
    clock.t = 3.0
    history += [answer, {"role": "tool", "tool_call_id": "call_1", "content": "a.py"}]
    answer = {"role": "assistant", "content": "done"}
    second = _turn(index, history, answer)
    assert second.kind == "continued" and second.program_id is not None and second.turn == 1
    assert [(r.name, r.duration_s) for r in second.tools_done] == [("bash", 3.0)]
    clock.t = 10.0
    history += [answer, {"role": "user", "content": "thanks, now the tests"}]
    third = _turn(index, history, {"role": "assistant", "content": "ok"})
    assert (third.kind, third.program_id, third.turn) == ("continued", second.program_id, 2)
    assert [(r.name, r.duration_s) for r in third.tools_done] == [(USER_TURN, 7.0)]


def test_clients_re_serializations_do_not_break_the_conversation():
    index = Conversations()
    history = [{"role": "system", "content": "sys"}, {"role": "user", "content": "task"}]
    answer = {"role": "assistant", "content": None, "reasoning_content": "let me think",
              "tool_calls": [_call("edit", '{"path": "a.py", "line": 3}', "chatcmpl-tool-1")]}
    _turn(index, history, answer)
    resent = [{"content": "sys", "role": "developer"},  # key order, developer for system
              {"role": "user", "content": [{"type": "text", "text": "ta"}, {"type": "text", "text": "sk "}]},
              {"role": "assistant", "content": "",  # null -> "", reasoning stripped, new id, args re-spaced/ordered
               "tool_calls": [_call("edit", '{"line":3,\n "path":"a.py"}', "toolu_99")]},
              {"role": "tool", "tool_call_id": "toolu_99", "content": "ok"}]
    turn, _ = index.begin("", resent)
    assert turn.kind == "continued"


def test_a_different_extension_forks_and_the_same_one_sent_again_keeps_its_program():
    index = Conversations()
    history = [{"role": "user", "content": "plan"}]
    answer = {"role": "assistant", "content": "two steps"}
    _turn(index, history, answer)
    a = index.begin("", history + [answer, {"role": "user", "content": "step A"}])[0]
    again = index.begin("", history + [answer, {"role": "user", "content": "step A"}])[0]
    b = index.begin("", history + [answer, {"role": "user", "content": "step B"}])[0]
    assert (a.kind, again.kind, b.kind) == ("continued", "resent", "forked")
    assert again.program_id == a.program_id != b.program_id
    assert b.tools_done is None  # a fork's wait is not a tool call of its own


def test_tenants_and_cache_salts_never_share_a_conversation():
    index = Conversations()
    history = [{"role": "user", "content": "same prompt"}]
    answer = {"role": "assistant", "content": "same answer"}
    index.answered(index.begin("acme", history)[1], answer)
    follow = history + [answer, {"role": "user", "content": "next"}]
    assert index.begin("bolt", follow)[0].kind == "first"
    assert index.begin("acme", follow, salt="other")[0].kind == "first"
    assert index.begin("acme", follow)[0].kind == "continued"


def test_memory_is_bounded_by_states_and_by_idle_time():
    clock = Clock()
    index = Conversations(max_states=3, idle_timeout_s=60, clock=clock)
    for i in range(5):
        _turn(index, [{"role": "user", "content": f"q{i}"}], {"role": "assistant", "content": "a"})
    assert len(index) == 3
    old = [{"role": "user", "content": "q0"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "?"}]
    assert index.begin("", old)[0].kind == "first"  # its state was the oldest: dropped
    recent = [{"role": "user", "content": "q4"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "?"}]
    assert index.begin("", recent)[0].kind == "continued"
    clock.t = 61
    assert index.begin("", recent[:2] + [{"role": "user", "content": "!"}])[0].kind == "first"  # expired
    assert len(index) == 0


def test_a_state_remembers_a_bounded_number_of_extensions():
    index = Conversations()
    history = [{"role": "user", "content": "x"}]
    answer = {"role": "assistant", "content": "y"}
    _turn(index, history, answer)
    ids = {index.begin("", history + [answer, {"role": "user", "content": str(i)}])[0].program_id
           for i in range(MAX_EXTENSIONS + 5)}
    assert len(ids) == MAX_EXTENSIONS + 5  # every extension its own program, past the remembered ones too


def test_malformed_messages_are_left_to_vllm():
    assert Conversations().begin("", "not a list") is None
    assert Conversations().begin("", [{"role": "user"}, 7]) is None


# A conversation is a list of (user text, answer text) turns; conversations may share prefixes.
_texts = st.sampled_from(["a", "b", "c", "tool output", ""])
_conversations = st.lists(st.lists(st.tuples(_texts, _texts), min_size=1, max_size=4), min_size=2, max_size=6)


@settings(max_examples=200, deadline=None)
@given(_conversations, st.randoms(use_true_random=False))
def test_no_false_merges_among_conversations_sharing_prefixes(conversations, rnd):
    """Conversations played interleaved: each keeps one program from its second turn on, and two
    conversations share a program only while their histories are identical."""
    index = Conversations()
    histories = [[{"role": "system", "content": "shared system prompt"}] for _ in conversations]
    programs: list[list[str | None]] = [[] for _ in conversations]
    kinds: list[list[str]] = [[] for _ in conversations]
    sent: list[list[str]] = [[] for _ in conversations]  # each turn's full history, as text
    cursors = [0] * len(conversations)
    while any(c < len(conv) for c, conv in zip(cursors, conversations)):
        i = rnd.choice([i for i, conv in enumerate(conversations) if cursors[i] < len(conv)])
        user, answer = conversations[i][cursors[i]]
        histories[i].append({"role": "user", "content": user})
        turn, pending = index.begin("", histories[i])
        reply = {"role": "assistant", "content": answer}
        index.answered(pending, reply)
        programs[i].append(turn.program_id)
        kinds[i].append(turn.kind)
        sent[i].append(json.dumps(histories[i]))
        histories[i].append(reply)
        cursors[i] += 1
    uses: dict[str, list[list]] = {}
    for i, ids in enumerate(programs):
        for k, program in enumerate(ids):
            if program is not None:
                uses.setdefault(program, []).append(json.loads(sent[i][k]))
    for program, histories in uses.items():  # a program is one line of turns: each history extends the last
        histories.sort(key=len)
        for shorter, longer in zip(histories, histories[1:]):
            assert longer[:len(shorter)] == shorter, f"{program} merged two different conversations"
    # a conversation changes programs only where it forks, or where it follows a merged twin that forked
    for ids, turn_kinds in zip(programs, kinds):
        assert "first" not in turn_kinds[1:]
        assert all(a == b or kind in ("forked", "resent") or before == "resent"
                   for a, b, before, kind in zip(ids[1:], ids[2:], turn_kinds[1:], turn_kinds[2:]))


# -- the answer read back from a response --------------------------------------------------------------

def _sse(*events) -> list[bytes]:
    return [f"data: {json.dumps(e)}\n\n".encode() for e in events] + [b"data: [DONE]\n\n"]


def test_a_streamed_answer_with_tool_calls_is_read_across_cut_chunks():
    chunks = _sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Let me "}}]},
                  {"choices": [{"index": 0, "delta": {"content": "look."}}]},
                  {"choices": [{"index": 0, "delta": {"tool_calls": [
                      {"index": 0, "id": "c1", "type": "function", "function": {"name": "bash", "arguments": ""}}]}}]},
                  {"choices": [{"index": 0, "delta": {"tool_calls": [
                      {"index": 0, "function": {"arguments": '{"cmd": '}}]}}]},
                  {"choices": [{"index": 0, "delta": {"tool_calls": [
                      {"index": 0, "function": {"arguments": '"ls"}'}}]}}]},
                  {"choices": [], "usage": {"prompt_tokens": 3}})
    stream = b"".join(chunks)
    reader = AnswerReader()
    reader.start(200, [(b"content-type", b"text/event-stream; charset=utf-8")])
    for i in range(0, len(stream), 7):  # cut anywhere, mid-line included
        reader.feed(stream[i:i + 7])
    assert reader.answer() == {"role": "assistant", "content": "Let me look.", "tool_calls": [
        {"type": "function", "id": "c1", "function": {"name": "bash", "arguments": '{"cmd": "ls"}'}}]}


@pytest.mark.parametrize("status, headers, body, expected", [
    (200, [(b"content-type", b"application/json")],
     json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}]}).encode(),
     {"role": "assistant", "content": "hi"}),
    (400, [(b"content-type", b"application/json")], b'{"error": {"message": "bad"}}', None),
    (200, [(b"content-type", b"text/event-stream")], b'data: {"error": {"message": "replica died"}}\n\n', None),
    (200, [(b"content-type", b"application/json")], b"not json", None),
])
def test_errors_are_no_answer(status, headers, body, expected):
    reader = AnswerReader()
    reader.start(status, headers)
    reader.feed(body)
    assert reader.answer() == expected


# -- through the middleware -----------------------------------------------------------------------------

class FakeEngine:
    """An ASGI app answering chat completions with a fixed answer, streamed or not; keeps the bodies."""

    def __init__(self):
        self.bodies: list[dict] = []
        self.answer = "ok"

    async def __call__(self, scope, receive, send):
        body = json.loads((await receive())["body"])
        self.bodies.append(body)
        if body.get("stream"):
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            for chunk in _sse({"choices": [{"index": 0, "delta": {"content": self.answer}}]}):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": json.dumps(
                {"choices": [{"index": 0, "message": {"role": "assistant", "content": self.answer}}]}).encode()})


async def _post(app, body: dict) -> None:
    raw = json.dumps(body).encode()

    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    async def send(message):
        pass

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [], "raw_path": b""}
    await app(scope, receive, send)


@pytest.mark.parametrize("stream", [False, True])
def test_the_middleware_names_the_second_turn_and_passes_a_first_turn_untouched(stream):
    asyncio.run(_names_the_second_turn(stream))


async def _names_the_second_turn(stream):
    engine = FakeEngine()
    app = AgentFieldsMiddleware(engine, conversations=Conversations())
    history = [{"role": "user", "content": "task"}]
    first = {"model": "m", "messages": history, "stream": stream, "temperature": 0.5}
    await _post(app, first)
    assert engine.bodies[-1] == {**first, "vllm_xargs": {XARG_MAY_RETURN: True}}  # no program's, but may return
    await _post(app, {"model": "m", "messages": history + [{"role": "assistant", "content": "ok"},
                                                           {"role": "user", "content": "more"}], "stream": stream})
    xargs = engine.bodies[-1]["vllm_xargs"]
    assert xargs[XARG_PROGRAM].startswith("conv-") and xargs[XARG_TURN] == 1
    assert msgspec.json.decode(xargs[XARG_TOOLS_DONE])[0]["name"] == USER_TURN


def test_without_the_index_a_plain_loop_is_no_program():
    asyncio.run(_no_index())


async def _no_index():
    engine = FakeEngine()
    app = AgentFieldsMiddleware(engine)
    history = [{"role": "user", "content": "task"}]
    await _post(app, {"model": "m", "messages": history})
    await _post(app, {"model": "m", "messages": history + [{"role": "assistant", "content": "ok"},
                                                           {"role": "user", "content": "more"}]})
    assert "vllm_xargs" not in engine.bodies[-1]


def test_a_named_program_is_not_inferred():
    asyncio.run(_named())


async def _named():
    engine = FakeEngine()
    index = Conversations()
    app = AgentFieldsMiddleware(engine, conversations=index)
    history = [{"role": "user", "content": "task"}]
    await _post(app, {"model": "m", "messages": history, "session_id": "mine"})
    await _post(app, {"model": "m", "messages": history + [{"role": "assistant", "content": "ok"},
                                                           {"role": "user", "content": "more"}], "session_id": "mine"})
    assert engine.bodies[-1]["vllm_xargs"][XARG_PROGRAM] == "mine" and len(index) == 0


# -- on the real engine: a plain OpenAI client's loop, no ids -------------------------------------------

KV_TOKENS = 2048


@pytest.fixture(scope="module")
def pinning_server():
    import os

    from agentserve.server.process import ServerProcess

    args = ["--model", "tiny", "--kv-tokens", str(KV_TOKENS), "--max-model-len", str(KV_TOKENS),
            "--policy", "fixed", "--fixed-ttl", "60", "--host-kv-tokens", "0"]
    with ServerProcess(args, env={"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}) as srv:
        yield srv


def _words(seed: int, tokens: int) -> str:
    """Text of about `tokens` tokens (the tiny tokenizer splits each such word into ~4.4 tokens)."""
    return " ".join(f"w{(seed * 7919 + i * 104729) % 100003}" for i in range(tokens * 10 // 44))


def _flood(client) -> None:
    """Other traffic during a tool call: together far more than the KV budget."""
    for i in range(5):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": _words(5000 + i, 850)}],
                                       max_tokens=4, temperature=0)


def _ask(client, messages, stream: bool = False):
    """(answer text, prompt tokens, cached tokens, the program the server inferred or None)."""
    extra = dict(model="tiny", messages=messages, max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    if not stream:
        raw = client.chat.completions.with_raw_response.create(**extra)
        r = raw.parse()
        return (r.choices[0].message.content, r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens,
                raw.headers.get("x-agentserve-program"))
    with client.chat.completions.with_streaming_response.create(
            **extra, stream=True, stream_options={"include_usage": True}) as raw:
        text, usage = [], None
        for chunk in raw.parse():
            text += [c.delta.content or "" for c in chunk.choices]
            usage = chunk.usage or usage
        return "".join(text), usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens, \
            raw.headers.get("x-agentserve-program")


@pytest.mark.slow
def test_a_plain_clients_loop_keeps_its_context_across_tool_calls_from_its_second_turn(pinning_server):
    import httpx
    from openai import OpenAI

    base = pinning_server.base_url
    client = OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
    history = [{"role": "system", "content": "You are a coding agent."}, {"role": "user", "content": _words(1, 500)}]
    answer, _, _, program = _ask(client, history)
    assert program is None  # a first turn is a one-off
    history += [{"role": "assistant", "content": answer}, {"role": "user", "content": "<returncode>0</returncode>"}]
    answer, prompt, _, program = _ask(client, history, stream=True)  # its answer is read from the stream
    assert program is not None and program.startswith("conv-")
    _flood(client)  # the tool call
    history += [{"role": "assistant", "content": answer}, {"role": "user", "content": "<returncode>1</returncode>"}]
    _, _, cached, again = _ask(client, history)
    assert again == program
    assert cached >= prompt // 16 * 16  # the pinned context survived the flood
    described = httpx.get(f"{base}/v1/programs/{program}", timeout=30).json()
    assert described["llm_calls"] == 2
    tools = httpx.get(f"{base}/v1/agentserve/stats", timeout=30).json()["tools"]
    assert USER_TURN in str(tools)  # the waits between turns reached the predictor
    assert 'agentserve_program_requests_total{named_by="inferred"} 2.0' in httpx.get(f"{base}/metrics").text

    # the same loop's first tool call, which no program covered: the flood took the context
    history = [{"role": "system", "content": "You are a coding agent."}, {"role": "user", "content": _words(2, 500)}]
    answer, prompt, _, _ = _ask(client, history)
    _flood(client)
    history += [{"role": "assistant", "content": answer}, {"role": "user", "content": "<returncode>0</returncode>"}]
    _, _, cached, program = _ask(client, history)
    assert program is not None and cached < prompt // 2
    httpx.post(f"{base}/v1/programs/{program}/end", timeout=30)
    httpx.post(f"{base}/v1/programs/{again}/end", timeout=30)
