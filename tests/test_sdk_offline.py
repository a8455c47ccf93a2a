"""The SDK's requests, against a recording transport (no server): tool calls cost no request between
turns, they ride on the next call, and nothing timed is lost when a call fails or the program ends."""

import asyncio
import json
import time

import httpx
import pytest
from openai import AsyncOpenAI, OpenAI

from agentserve.sdk import AgentServe, AgentServeError, AsyncAgentServe

MSG = [{"role": "user", "content": "hi"}]
CHAT = {"id": "c", "object": "chat.completion", "created": 0, "model": "tiny",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}]}


class Recorder:
    """Answers every request, records (path, body); `fail_next` answers the next chat with a 400."""

    def __init__(self):
        self.requests: list[tuple[str, dict]] = []
        self.fail_next = False

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else {}
        self.requests.append((request.url.path, body))
        if request.url.path.endswith("/chat/completions"):
            if self.fail_next:
                self.fail_next = False
                return httpx.Response(400, json={"error": {"message": "bad"}})
            return httpx.Response(200, json=CHAT)
        return httpx.Response(200, json={})

    def paths(self) -> list[str]:
        return [p for p, _ in self.requests]

    def fields(self, k: int = -1) -> dict:
        return [b for p, b in self.requests if p.endswith("/chat/completions")][k]["agentserve"]


def sync_client(rec: Recorder) -> AgentServe:
    client = AgentServe("http://sdk.test")
    client.http = httpx.Client(base_url="http://sdk.test", transport=httpx.MockTransport(rec))
    client.openai = OpenAI(base_url="http://sdk.test/v1", api_key="k", max_retries=0,
                           http_client=httpx.Client(transport=httpx.MockTransport(rec)))
    return client


def test_a_tool_call_sends_nothing_and_rides_on_the_next_call():
    rec = Recorder()
    prog = sync_client(rec).program("p")
    prog.chat(model="tiny", messages=MSG)
    with prog.tool("bash"):
        time.sleep(0.05)
    assert rec.paths() == ["/v1/chat/completions"]  # no request between the turns
    prog.chat(model="tiny", messages=MSG)
    (run,) = rec.fields()["tools_done"]
    assert run["name"] == "bash" and 0.05 <= run["duration_s"] < 1
    prog.chat(model="tiny", messages=MSG)
    assert "tools_done" not in rec.fields()  # reported once


def test_a_failed_call_keeps_its_tool_reports_for_the_next():
    rec = Recorder()
    prog = sync_client(rec).program("p")
    prog.chat(model="tiny", messages=MSG)
    prog.tool_start("search")
    prog.tool_end("search")
    rec.fail_next = True
    with pytest.raises(Exception):
        prog.chat(model="tiny", messages=MSG)
    prog.chat(model="tiny", messages=MSG)
    assert [r["name"] for r in rec.fields()["tools_done"]] == ["search"]
    assert [r["name"] for r in rec.fields(-2)["tools_done"]] == ["search"]  # the failed call carried it too


def test_tools_after_the_last_call_go_out_before_end():
    rec = Recorder()
    with sync_client(rec).program("p") as prog:
        prog.chat(model="tiny", messages=MSG, last=True)
        with prog.tool("submit"):
            pass
    assert rec.paths() == ["/v1/chat/completions", "/v1/programs/p/tool", "/v1/programs/p/end"]
    event = rec.requests[1][1]
    assert event["name"] == "submit" and event["event"] == "ran" and event["duration_s"] >= 0


def test_end_on_the_last_call_needs_no_end_request():
    rec = Recorder()
    with sync_client(rec).program("p") as prog:
        prog.chat(model="tiny", messages=MSG, end=True)
    assert rec.paths() == ["/v1/chat/completions"]
    assert rec.fields()["ends_program"] is True and rec.fields()["is_last_turn"] is True


def test_a_tool_ended_but_never_started_is_refused():
    prog = sync_client(Recorder()).program("p")
    with pytest.raises(AgentServeError) as e:
        prog.tool_end("bash")
    assert e.value.status == 409
    prog.tool_end("bash", 1.5)  # with its duration: a report, no start needed
    assert prog.tools_done == [{"name": "bash", "duration_s": 1.5}]


def test_fields_for_another_client_carry_and_forget_the_reports():
    prog = sync_client(Recorder()).program("p")
    with prog.tool("bash"):
        pass
    assert [r["name"] for r in prog.fields()["tools_done"]] == ["bash"]
    assert "tools_done" not in prog.fields()


def test_async_program_reports_tools_with_the_next_call():
    rec = Recorder()

    async def run():
        client = AsyncAgentServe("http://sdk.test")
        client.http = httpx.AsyncClient(base_url="http://sdk.test", transport=httpx.MockTransport(rec))
        client.openai = AsyncOpenAI(base_url="http://sdk.test/v1", api_key="k", max_retries=0,
                                    http_client=httpx.AsyncClient(transport=httpx.MockTransport(rec)))
        async with client.program("a") as prog:
            await prog.chat(model="tiny", messages=MSG)
            async with prog.tool("editor"):
                await asyncio.sleep(0.02)
            await prog.chat(model="tiny", messages=MSG, last=True)
            async with prog.tool("submit"):
                pass

    asyncio.run(run())
    assert rec.paths() == ["/v1/chat/completions", "/v1/chat/completions", "/v1/programs/a/tool",
                           "/v1/programs/a/end"]
    assert [r["name"] for r in rec.fields()["tools_done"]] == ["editor"]
