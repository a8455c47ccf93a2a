"""Programs inferred from conversation continuity (programs/continuity.py), the answer read back from a
response (server/answers.py) and both through the middleware, without an engine."""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest
from hypothesis import given, settings, strategies as st

from agentserve.programs.continuity import MAX_EXTENSIONS, USER_TURN, Conversations
from agentserve.programs.fields import XARG_CONVERSATION, XARG_PROGRAM, XARG_TOOLS_DONE, XARG_TURN
from agentserve.server.answers import ChatAnswer, MessagesAnswer
from agentserve.server.transcripts import ChatTranscript, MessagesTranscript
from agentserve.server.middleware import AgentFieldsMiddleware


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _call(name: str, args: str, call_id: str = "call_1") -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


CHAT = ChatTranscript()


def _begin(index: Conversations, scope: str, messages: list[dict], salt: str = ""):
    return index.begin(scope, CHAT.messages({"messages": messages}), ("chat", "m", salt))


def _answered(index: Conversations, pending, answer: dict) -> None:
    index.answered(pending, *CHAT.answer(answer))


def _turn(index: Conversations, messages: list[dict], answer: dict, scope: str = ""):
    turn, pending = _begin(index, scope, messages)
    _answered(index, pending, answer)
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
    turn, _ = _begin(index, "", resent)
    assert turn.kind == "continued"


def test_a_different_extension_forks_and_the_same_one_sent_again_keeps_its_program():
    index = Conversations()
    history = [{"role": "user", "content": "plan"}]
    answer = {"role": "assistant", "content": "two steps"}
    _turn(index, history, answer)
    a = _begin(index, "", history + [answer, {"role": "user", "content": "step A"}])[0]
    again = _begin(index, "", history + [answer, {"role": "user", "content": "step A"}])[0]
    b = _begin(index, "", history + [answer, {"role": "user", "content": "step B"}])[0]
    assert (a.kind, again.kind, b.kind) == ("continued", "resent", "forked")
    assert again.program_id == a.program_id != b.program_id
    assert b.tools_done is None  # a fork's wait is not a tool call of its own


def test_tenants_and_cache_salts_never_share_a_conversation():
    index = Conversations()
    history = [{"role": "user", "content": "same prompt"}]
    answer = {"role": "assistant", "content": "same answer"}
    _answered(index, _begin(index, "acme", history)[1], answer)
    follow = history + [answer, {"role": "user", "content": "next"}]
    assert _begin(index, "bolt", follow)[0].kind == "first"
    assert _begin(index, "acme", follow, salt="other")[0].kind == "first"
    assert _begin(index, "acme", follow)[0].kind == "continued"


def test_memory_is_bounded_by_states_and_by_idle_time():
    clock = Clock()
    index = Conversations(max_states=3, idle_timeout_s=60, clock=clock)
    for i in range(5):
        _turn(index, [{"role": "user", "content": f"q{i}"}], {"role": "assistant", "content": "a"})
    assert len(index) == 3
    old = [{"role": "user", "content": "q0"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "?"}]
    assert _begin(index, "", old)[0].kind == "first"  # its state was the oldest: dropped
    recent = [{"role": "user", "content": "q4"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "?"}]
    assert _begin(index, "", recent)[0].kind == "continued"
    clock.t = 61
    assert _begin(index, "", recent[:2] + [{"role": "user", "content": "!"}])[0].kind == "first"  # expired
    assert len(index) == 0


def test_a_state_remembers_a_bounded_number_of_extensions():
    index = Conversations()
    history = [{"role": "user", "content": "x"}]
    answer = {"role": "assistant", "content": "y"}
    _turn(index, history, answer)
    ids = {_begin(index, "", history + [answer, {"role": "user", "content": str(i)}])[0].program_id
           for i in range(MAX_EXTENSIONS + 5)}
    assert len(ids) == MAX_EXTENSIONS + 5  # every extension its own program, past the remembered ones too


def test_malformed_messages_are_left_to_vllm():
    assert CHAT.messages({"messages": "not a list"}) is None
    assert CHAT.messages({"messages": [{"role": "user"}, 7]}) is None
    assert MessagesTranscript().messages({"system": "s"}) is None


def test_an_anthropic_clients_loop_survives_its_re_serializations():
    """Claude Code's way: system blocks, cache_control marks moved to the newest blocks every turn,
    thinking dropped from the history, tool_use answered by a tool_result block."""
    clock = Clock()
    index, messages = Conversations(clock=clock), MessagesTranscript()
    system = [{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}]
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBOR"}}
    first = {"system": system, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "fix the bug"}, {**image, "cache_control": {"type": "ephemeral"}}]}]}
    turn, pending = index.begin("", messages.messages(first), ("messages", "m", ""))
    answer = {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "hmm", "signature": "x"}, {"type": "text", "text": "Looking."},
        {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "ls", "timeout": 5}}]}
    index.answered(pending, *messages.answer(answer))
    clock.t = 2.5
    second = {"system": [{"type": "text", "text": "You are Claude Code."}], "messages": [
        {"role": "user", "content": [{"type": "text", "text": "fix the bug"}, image]},
        {"role": "assistant", "content": [{"type": "text", "text": "Looking."}, {
            "type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"timeout": 5, "command": "ls"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [
            {"type": "text", "text": "a.py"}], "cache_control": {"type": "ephemeral"}}]}]}
    turn, _ = index.begin("", messages.messages(second), ("messages", "m", ""))
    assert turn.kind == "continued" and [(r.name, r.duration_s) for r in turn.tools_done] == [("Bash", 2.5)]
    errored = dict(second, messages=second["messages"][:2] + [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "a.py", "is_error": True}]}])
    assert index.begin("", messages.messages(errored), ("messages", "m", ""))[0].kind == "forked"  # not the same turn


def test_a_streamed_anthropic_answer_is_read_with_its_tool_input():
    events = [("message_start", {"type": "message_start", "message": {"role": "assistant", "content": []}}),
              ("content_block_start", {"type": "content_block_start", "index": 0,
                                       "content_block": {"type": "text", "text": ""}}),
              ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "text_delta", "text": "Run it."}}),
              ("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {
                  "type": "tool_use", "id": "toolu_2", "name": "Bash", "input": {}}}),
              ("content_block_delta", {"type": "content_block_delta", "index": 1,
                                       "delta": {"type": "input_json_delta", "partial_json": '{"command": '}}),
              ("content_block_delta", {"type": "content_block_delta", "index": 1,
                                       "delta": {"type": "input_json_delta", "partial_json": '"make"}'}}),
              ("content_block_stop", {"type": "content_block_stop", "index": 1}),
              ("message_stop", {"type": "message_stop"})]
    stream = b"".join(f"event: {name}\ndata: {json.dumps(e)}\n\n".encode() for name, e in events)
    reader = MessagesAnswer()
    reader.start(200, [(b"content-type", b"text/event-stream")])
    for i in range(0, len(stream), 11):
        reader.feed(stream[i:i + 11])
    answer = reader.answer()
    assert answer["content"] == [{"type": "text", "text": "Run it."},
                                 {"type": "tool_use", "id": "toolu_2", "name": "Bash", "input": {"command": "make"}}]
    assert MessagesTranscript().answer(answer)[1] == "Bash"
    failed = MessagesAnswer()
    failed.start(200, [(b"content-type", b"text/event-stream")])
    failed.feed(b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error"}}\n\n')
    assert failed.answer() is None


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
        turn, pending = _begin(index, "", histories[i])
        reply = {"role": "assistant", "content": answer}
        _answered(index, pending, reply)
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
    reader = ChatAnswer()
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
    reader = ChatAnswer()
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
        if scope["path"] == "/v1/messages":  # one tool_use, streamed as Anthropic's events
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            for name, event in [("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {
                    "type": "tool_use", "id": f"toolu_{len(self.bodies)}", "name": "Bash", "input": {}}}),
                    ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
                        "type": "input_json_delta", "partial_json": '{"command": "ls"}'}}),
                    ("message_stop", {"type": "message_stop"})]:
                await send({"type": "http.response.body", "more_body": True,
                            "body": f"event: {name}\ndata: {json.dumps(event)}\n\n".encode()})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        elif body.get("stream"):
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            for chunk in _sse({"choices": [{"index": 0, "delta": {"content": self.answer}}]}):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": json.dumps(
                {"choices": [{"index": 0, "message": {"role": "assistant", "content": self.answer}}]}).encode()})


async def _post(app, body: dict, headers: list | None = None, path: str = "/v1/chat/completions") -> None:
    raw = json.dumps(body).encode()

    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    async def send(message):
        pass

    scope = {"type": "http", "method": "POST", "path": path, "headers": headers or [], "raw_path": b""}
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
    conversation = engine.bodies[-1].pop("vllm_xargs")[XARG_CONVERSATION]
    assert engine.bodies[-1] == first  # no program's, but it names the program its next turn will be
    await _post(app, {"model": "m", "messages": history + [{"role": "assistant", "content": "ok"},
                                                           {"role": "user", "content": "more"}], "stream": stream})
    xargs = engine.bodies[-1]["vllm_xargs"]
    assert xargs[XARG_PROGRAM] == conversation and conversation.startswith("conv-") and xargs[XARG_TURN] == 1
    assert msgspec.json.decode(xargs[XARG_TOOLS_DONE])[0]["name"] == USER_TURN


def test_a_conversations_first_turn_is_routed_as_the_program_it_will_be_under_its_tenant():
    """The Ray router places a first turn by its conversation key and records it there, so the next turn,
    the program of that id, lands where the first turn's KV is; under tenants both ids are scoped alike."""
    from types import SimpleNamespace

    from agentserve.options import TenantsConfig
    from agentserve.rayserve.router import program_of_pending
    from agentserve.routing.affinity import ProgramAffinity, ReplicaLoad
    from agentserve.server.tenants import TenantGate

    gate = TenantGate(msgspec.convert({"tenants": [{"name": "acme", "api_keys": ["k" * 16]}]}, TenantsConfig))
    engine = FakeEngine()
    app = AgentFieldsMiddleware(engine, gate=gate, conversations=Conversations())
    history = [{"role": "user", "content": "task"}]
    key = [(b"authorization", b"Bearer " + b"k" * 16)]
    asyncio.run(_post(app, {"model": "m", "messages": history}, key))
    asyncio.run(_post(app, {"model": "m", "messages": history + [{"role": "assistant", "content": "ok"},
                                                                 {"role": "user", "content": "more"}]}, key))
    first, second = (SimpleNamespace(args=[SimpleNamespace(vllm_xargs=b["vllm_xargs"])]) for b in engine.bodies)
    assert program_of_pending(first) == program_of_pending(second) == second.args[0].vllm_xargs[XARG_PROGRAM]
    assert program_of_pending(first).startswith("acme:")
    affinity = ProgramAffinity()
    placed = affinity.place(program_of_pending(first), ["r1", "r2"]).ranked[0]
    for other in ("r1", "r2"):  # whatever the load says since
        affinity.report([ReplicaLoad(other, 90 if other != placed else 1, 100, 0)])
    assert affinity.place(program_of_pending(second), ["r1", "r2"]).ranked[0] == placed


def test_an_anthropic_tool_use_answered_by_its_tool_result_continues_the_program_with_the_tools_time():
    engine = FakeEngine()
    app = AgentFieldsMiddleware(engine, conversations=Conversations())
    history = [{"role": "user", "content": "list the files"}]
    asyncio.run(_post(app, {"model": "m", "max_tokens": 8, "stream": True, "messages": history}, path="/v1/messages"))
    assert XARG_PROGRAM not in engine.bodies[-1]["vllm_xargs"]
    history += [{"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "Bash",
                                                   "input": {"command": "ls"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "a.py"}]}]
    asyncio.run(_post(app, {"model": "m", "max_tokens": 8, "messages": history}, path="/v1/messages"))
    xargs = engine.bodies[-1]["vllm_xargs"]
    assert xargs[XARG_PROGRAM] == engine.bodies[0]["vllm_xargs"][XARG_CONVERSATION]
    assert msgspec.json.decode(xargs[XARG_TOOLS_DONE])[0]["name"] == "Bash"


def test_an_inferred_program_its_tenant_has_no_room_for_is_served_as_a_one_off():
    from agentserve.options import TenantsConfig
    from agentserve.server.tenants import TenantGate

    gate = TenantGate(msgspec.convert({"tenants": [{"name": "acme", "api_keys": ["k" * 16]}]}, TenantsConfig))
    engine = FakeEngine()
    app = AgentFieldsMiddleware(engine, gate=gate, admit=lambda tenant, program: False, conversations=Conversations())
    key = [(b"authorization", b"Bearer " + b"k" * 16)]
    history = [{"role": "user", "content": "task"}]
    asyncio.run(_post(app, {"model": "m", "messages": history}, key))
    asyncio.run(_post(app, {"model": "m", "messages": history + [{"role": "assistant", "content": "ok"},
                                                                 {"role": "user", "content": "more"}]}, key))
    assert len(engine.bodies) == 2  # served, not refused
    xargs = engine.bodies[-1]["vllm_xargs"]
    assert XARG_PROGRAM not in xargs and xargs[XARG_CONVERSATION].startswith("acme:conv-")


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


def test_the_cost_benchmark_times_the_middleware_with_the_index_on_and_off(capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("continuity_cost", Path(__file__).parents[1] / "bench" /
                                                  "continuity_cost.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    asyncio.run(bench.main(3))
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| one-off") or
            line.startswith("| human")]
    assert len(rows) == 6


# -- on the real engine: a plain OpenAI client's loop, no ids -------------------------------------------

KV_TOKENS = 2048


@pytest.fixture(scope="module")
def pinning_server():
    import os

    from agentserve.server.process import ServerProcess

    args = ["--model", "tiny", "--kv-tokens", str(KV_TOKENS), "--max-model-len", str(KV_TOKENS),
            "--policy", "fixed", "--fixed-ttl", "60", "--host-kv-tokens", "0", "--infer-programs"]
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


TENANT_KEY = "acme-key-0123456789abcdef"


def _anthropic_loop(base_url: str, seed: int, turns: int = 4) -> list[float]:
    """A Messages-API agent loop through the anthropic SDK, the history as the SDK returns it (content
    blocks), a tool's output sent back as the next user message; other traffic floods the KV during
    each tool call. Returns each later turn's share of its prompt read from cache. (The random-weight
    model cannot be made to answer with tool_use blocks on this route: tool_use matching is checked
    above, through the middleware.)"""
    import anthropic

    client = anthropic.Anthropic(base_url=base_url, api_key=TENANT_KEY, max_retries=0, timeout=120)
    system = [{"type": "text", "text": "You are a coding agent.", "cache_control": {"type": "ephemeral"}}]
    history: list[dict] = [{"role": "user", "content": _words(seed, 400)}]
    shares = []
    for turn in range(turns):
        r = client.messages.create(model="tiny", max_tokens=16, system=system, messages=history)
        if turn:
            prompt = r.usage.input_tokens + (r.usage.cache_read_input_tokens or 0)
            shares.append((r.usage.cache_read_input_tokens or 0) / prompt)
        history += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in r.content]},
                    {"role": "user", "content": [{"type": "text", "text": f"<returncode>{turn}</returncode>",
                                                  "cache_control": {"type": "ephemeral"}}]}]
        for i in range(4):  # the tool call: other traffic, together far more than the KV budget
            client.messages.create(model="tiny", max_tokens=4, messages=[
                {"role": "user", "content": _words(seed * 100 + turn * 10 + i, 850)}])
    return shares


@pytest.mark.slow
def test_an_anthropic_sdk_agent_loop_under_tenants_keeps_its_context_where_stock_vllm_loses_it(tmp_path):
    import os

    import httpx

    from agentserve.server.process import ServerProcess

    tenants = tmp_path / "tenants.json"
    tenants.write_text(json.dumps({"tenants": [{"name": "acme", "api_keys": [TENANT_KEY]}]}))
    args = ["--model", "tiny", "--kv-tokens", str(KV_TOKENS), "--max-model-len", str(KV_TOKENS),
            "--tenants", str(tenants), "--infer-programs"]
    env = {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    with ServerProcess(args, env=env) as srv:
        ours = _anthropic_loop(srv.base_url, 1)
        stats = httpx.get(srv.base_url + "/v1/agentserve/stats", headers={"x-api-key": TENANT_KEY}, timeout=30).json()
    with ServerProcess(args + ["--policy", "vllm"], env=env) as srv:
        stock = _anthropic_loop(srv.base_url, 1)
    assert min(ours) >= 0.8 and max(stock) < 0.2, (ours, stock)
    assert USER_TURN in str(stats["tools"])  # the waits between turns reached the predictor
