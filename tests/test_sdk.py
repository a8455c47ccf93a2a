"""The SDK against a real server: turns, tool timing, sub-agents, end on exit and on exception."""

import asyncio
import time
from urllib.parse import quote
from uuid import uuid4

import httpx
import pytest

from agentserve.sdk import AgentServe, AgentServeError, AsyncAgentServe

pytestmark = pytest.mark.slow

MSG = [{"role": "user", "content": "List the files, then run the tests."}]


def program_info(server, pid):
    return httpx.get(f"{server.base_url}/v1/programs/{pid}")


def test_sync_program_turns_tools_and_end(server):
    client = AgentServe(server.base_url)
    with client.program() as prog:
        r = prog.chat(model="tiny", messages=MSG, max_tokens=4)
        assert r.choices[0].message.content is not None
        with prog.tool("bash"):
            pass
        prog.chat(model="tiny", messages=MSG, max_tokens=4, last=True)
        info = program_info(server, prog.program_id).json()
        assert info["llm_calls"] == 2
        kinds = [n["id"].split(":")[0] for n in info["nodes"]]
        assert kinds == ["llm", "tool", "llm"]
    assert program_info(server, prog.program_id).status_code == 404  # ended on exit
    client.close()


def test_program_ends_on_exception_and_subagents_have_parent_edges(server):
    client = AgentServe(server.base_url)
    with pytest.raises(RuntimeError):
        with client.program() as prog:
            prog.chat(model="tiny", messages=MSG, max_tokens=2)
            child = prog.spawn()
            child.chat(model="tiny", messages=MSG, max_tokens=2)
            assert program_info(server, prog.program_id).json()["children"] == [child.program_id]
            assert program_info(server, child.program_id).json()["parent_program_id"] == prog.program_id
            child.end()
            raise RuntimeError("the agent crashed")
    assert program_info(server, prog.program_id).status_code == 404
    client.close()


def test_tool_reports_reach_the_server_and_errors_surface(server):
    """A tool timed after the last call reaches the server before the end; a "ran" event for a program
    the server does not know is a 404, one without its duration a 400."""
    client = AgentServe(server.base_url)
    tool = "submit-" + uuid4().hex[:6]
    with client.program() as prog:
        prog.chat(model="tiny", messages=MSG, max_tokens=2, last=True)
        with prog.tool(tool):
            time.sleep(0.05)
    stats = httpx.get(f"{server.base_url}/v1/agentserve/stats").json()
    assert stats["tools"][tool]["measured_by"] == "client" and stats["tools"][tool]["mean_s"] >= 0.05
    lost = client.program("never-started")
    with pytest.raises(AgentServeError) as e:
        lost.tool_end("bash")  # never started, no duration: refused by the SDK
    assert e.value.status == 409
    r = client.http.post(lost.tool_url(), json=lost.tool_event("bash", "ran", 1.0))
    assert r.status_code == 404
    r = client.http.post(prog.tool_url(), json={"name": "bash", "event": "ran"})
    assert r.status_code == 400 and "duration_s" in r.text
    client.close()


def test_end_with_the_last_call(server):
    client = AgentServe(server.base_url)
    with client.program() as prog:
        prog.chat(model="tiny", messages=MSG, max_tokens=2)
        prog.chat(model="tiny", messages=MSG, max_tokens=2, end=True)
        assert prog.ended
    deadline = time.monotonic() + 5  # the server ends it once the call's end reaches the control plane
    while program_info(server, prog.program_id).status_code != 404 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert program_info(server, prog.program_id).status_code == 404
    client.close()


def test_async_program(server):
    async def run():
        client = AsyncAgentServe(server.base_url)
        async with client.program() as prog:
            await prog.chat(model="tiny", messages=MSG, max_tokens=3)
            async with prog.tool("editor"):
                await asyncio.sleep(0.01)
            await prog.chat(model="tiny", messages=MSG, max_tokens=3)
            assert program_info(server, prog.program_id).json()["last_tool"] == "editor"
        await client.close()
        return prog.program_id

    pid = asyncio.run(run())
    assert program_info(server, pid).status_code == 404


@pytest.mark.parametrize("program_id", ["task#3?x=1", "user/42/end", "a/tool"])
def test_program_ids_with_url_characters_reach_their_routes(server, program_id):
    """`/` too: session ids name programs (programs/sessions.py), and clients pick them."""
    client = AgentServe(server.base_url)
    quoted = quote(program_id, safe="")
    with client.program(program_id) as prog:
        prog.chat(model="tiny", messages=MSG, max_tokens=2)
        assert client.http.post(prog.tool_url(), json=prog.tool_event("bash", "ran", 0.1)).status_code == 200
        info = httpx.get(f"{server.base_url}/v1/programs/{quoted}").json()
        assert info["program_id"] == program_id and [n["name"] for n in info["nodes"] if n["kind"] == "tool"] == ["bash"]
    info = httpx.get(f"{server.base_url}/v1/programs/{quoted}")
    assert info.status_code == 404  # ended on exit, under its own id (not a prefix of it)
    client.close()
