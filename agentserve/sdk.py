"""agentserve's Python SDK for agent frameworks, sync (`AgentServe`) and async (`AsyncAgentServe`).

    client = AgentServe("http://127.0.0.1:8000")
    with client.program() as prog:                 # ends the program on exit, also on exception
        r = prog.chat(model="tiny", messages=msgs)   # the OpenAI call, with the program's fields added
        with prog.tool("bash"):                      # times the tool; the next call reports it
            run(...)
        sub = prog.spawn()                           # a sub-agent: a program with a parent edge
        r = prog.complete(model="m", template="critic", parts=[part("You review."), part(report, shared=True),
                          part("Verdict:")], max_tokens=8)  # KV sharing (`serve --kvshare`)

`chat` takes exactly the arguments of `openai`'s `chat.completions.create` and returns its result;
`last=True` marks the program's last LLM call (no pin after it), `end=True` also ends the program when
that call does (no `/end` request after it).
`complete` those of `completions.create`, with the prompt given as parts, some marked shared (another
agent's output, the common question): the server reuses their KV under this prompt's prefix.
Any server that speaks OpenAI works for the chat part; the program fields make agentserve keep the
program's KV across its tool calls.

No request is sent between two turns: the tool calls timed by `tool` (or `tool_start`/`tool_end`) ride
on the program's next call (`tools_done`); those after the last call go out when the program ends.
"""

from __future__ import annotations

import time
import uuid
from contextlib import asynccontextmanager, contextmanager
from typing import Any
from urllib.parse import quote

import httpx

from agentserve.programs.hints import PROGRAM_HINTS as HINTS

TIMEOUT_S = 600.0
# Idle connections are not reused after this long. Servers close idle keep-alive connections after a
# few seconds (uvicorn: 5 s); agents post tool events after tool calls of about that length, and a
# POST sent on a connection the server is closing fails (httpx.ReadError) without being retried.
KEEPALIVE_S = 2.0


def part(content: str | list[int], shared: bool = False) -> dict[str, Any]:
    """A prompt part for `complete`: text (tokenized on its own) or token ids; `shared`: other agents'
    prompts hold the same content."""
    key = "text" if isinstance(content, str) else "token_ids"
    return {key: content if key == "text" else list(content), "shared": shared}


def _new_id() -> str:
    return f"prog-{uuid.uuid4().hex[:16]}"


class _ProgramState:
    """What sync and async programs share: identity, turn counting, request fields, tool timing."""

    def __init__(self, program_id: str | None, parent: str | None):
        self.program_id = program_id or _new_id()
        self.parent = parent
        self.turn = 0
        self.ended = False
        self.open_tools: dict[str, float] = {}  # tool -> when it started (perf_counter)
        self.tools_done: list[dict[str, Any]] = []  # timed tool calls the next request reports

    def chat_kwargs(self, kwargs: dict[str, Any], tool: str | None, last: bool, end: bool = False,
                    hints: dict[str, Any] | None = None) -> dict[str, Any]:
        unknown = set(hints or ()) - set(HINTS)
        if unknown:
            raise ValueError(f"unknown hints {sorted(unknown)}: give any of {', '.join(HINTS)}")
        fields: dict[str, Any] = {"program_id": self.program_id, "turn": self.turn, "is_last_turn": last or end,
                                  **(hints or {})}
        if end:
            fields["ends_program"] = True
        if tool is not None:
            fields["tool"] = tool
        if self.parent is not None and self.turn == 0:
            fields["parent_program_id"] = self.parent
        if self.tools_done:
            fields["tools_done"] = list(self.tools_done)
        extra_body = dict(kwargs.pop("extra_body", None) or {})
        extra_body["agentserve"] = fields
        self.turn += 1
        return {**kwargs, "extra_body": extra_body}

    def fields(self, tool: str | None = None, last: bool = False) -> dict[str, Any]:
        """The `agentserve` object for a call that another client sends (an agent framework's): the
        server counts the turns, and the parent edge rides on every call (a retried first call keeps it).
        It carries the tool calls timed since the previous one, which it then forgets."""
        fields: dict[str, Any] = {"program_id": self.program_id}
        if last:
            fields["is_last_turn"] = True
        if tool is not None:
            fields["tool"] = tool
        if self.parent is not None:
            fields["parent_program_id"] = self.parent
        if self.tools_done:
            fields["tools_done"], self.tools_done = self.tools_done, []
        self.turn += 1
        return fields

    def sent(self, request: dict[str, Any], end: bool) -> None:
        """A call built by `chat_kwargs` was answered: its tool reports are delivered."""
        reported = request["extra_body"]["agentserve"].get("tools_done", ())
        del self.tools_done[:len(reported)]
        self.ended = self.ended or end

    def tool_started(self, name: str) -> None:
        self.open_tools[name] = time.perf_counter()

    def tool_ended(self, name: str, duration_s: float | None) -> None:
        """Queue the tool call for the next request; `duration_s`: the caller's (else since tool_start)."""
        started = self.open_tools.pop(name, None)
        if duration_s is None:
            if started is None:
                running = ", ".join(self.open_tools) or "none"
                raise AgentServeError(409, f"tool {name!r} of program {self.program_id!r} ended but was not "
                                           f"started (running: {running})")
            duration_s = time.perf_counter() - started
        self.tools_done.append({"name": name, "duration_s": max(0.0, float(duration_s))})

    def pending_events(self) -> list[dict[str, Any]]:
        """The tool events to send before `/end`: the calls timed after the last request."""
        return [self.tool_event(run["name"], "ran", run["duration_s"]) for run in self.tools_done]

    @staticmethod
    def tool_event(name: str, event: str, duration_s: float | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "event": event}
        if duration_s is not None:
            body["duration_s"] = duration_s
        return body

    def complete_kwargs(self, kwargs: dict[str, Any], template: str, parts: list[dict[str, Any]],
                        tool: str | None, last: bool, end: bool = False) -> dict[str, Any]:
        out = self.chat_kwargs(kwargs, tool, last, end)
        out["extra_body"]["agentserve"]["share"] = {"template": template, "parts": parts}
        return {**out, "prompt": ""}

    def tool_url(self) -> str:
        return f"/v1/programs/{quote(self.program_id, safe='')}/tool"

    def end_url(self) -> str:
        return f"/v1/programs/{quote(self.program_id, safe='')}/end"


_LIMITS = httpx.Limits(keepalive_expiry=KEEPALIVE_S)


def _check_end(r: httpx.Response) -> dict | None:
    """An end the server answers 404 (it never saw the program: its first call was refused; or it was
    abandoned after its idle timeout) leaves nothing to end: not an error (None), and on the way out of
    a `with` block it must not hide the exception that ended the block."""
    return None if r.status_code == 404 else _check(r)


def _check(r: httpx.Response) -> dict:
    if r.status_code >= 400:
        raise AgentServeError(r.status_code, r.text)
    return r.json()


class AgentServeError(Exception):
    def __init__(self, status: int, body: str):
        super().__init__(f"agentserve answered {status}: {body}")
        self.status = status


class Program(_ProgramState):
    def __init__(self, client: "AgentServe", program_id: str | None = None, parent: str | None = None):
        super().__init__(program_id, parent)
        self.client = client

    def chat(self, *, tool: str | None = None, last: bool = False, end: bool = False,
             hints: dict[str, Any] | None = None, **kwargs):
        """`chat.completions.create(**kwargs)` as a turn of this program. `tool`: the tool this turn's
        answer will run, if known; `last`: this is the program's last LLM call (no pin after it);
        `end`: the program ends when this call does (nothing of it follows: no `/end` needed);
        `hints`: any of HINTS (README, request hints); the response's x-agentserve-hints says what
        became of each."""
        request = self.chat_kwargs(kwargs, tool, last, end, hints)
        out = self.client.openai.chat.completions.create(**request)
        self.sent(request, end)
        return out

    def complete(self, *, template: str, parts: list[dict[str, Any]], tool: str | None = None, last: bool = False,
                 end: bool = False, **kwargs):
        """`completions.create(**kwargs)` as a turn, its prompt given as `parts` (see `part`) under
        `template` (the agent's role; its prompts share a layout)."""
        request = self.complete_kwargs(kwargs, template, parts, tool, last, end)
        out = self.client.openai.completions.create(**request)
        self.sent(request, end)
        return out

    @contextmanager
    def tool(self, name: str):
        """Times a tool call; the program's next call reports it (no request of its own)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.tool_ended(name, time.perf_counter() - t0)

    def tool_start(self, name: str) -> None:
        """A tool call started (for agent loops where start and end are in different places)."""
        self.tool_started(name)

    def tool_end(self, name: str, duration_s: float | None = None) -> None:
        """The tool call ended; `duration_s`: measured by the caller (else since `tool_start`)."""
        self.tool_ended(name, duration_s)

    def spawn(self, program_id: str | None = None) -> "Program":
        return Program(self.client, program_id, parent=self.program_id)

    def end(self) -> None:
        if not self.ended and self.turn > 0:  # a program the server never saw has nothing to end
            for event in self.pending_events():
                if _check_end(self.client.http.post(self.tool_url(), json=event)) is None:
                    break
            _check_end(self.client.http.post(self.end_url()))
        self.tools_done.clear()
        self.ended = True

    def __enter__(self) -> "Program":
        return self

    def __exit__(self, *exc) -> None:
        self.end()


class AsyncProgram(_ProgramState):
    def __init__(self, client: "AsyncAgentServe", program_id: str | None = None, parent: str | None = None):
        super().__init__(program_id, parent)
        self.client = client

    async def chat(self, *, tool: str | None = None, last: bool = False, end: bool = False,
                   hints: dict[str, Any] | None = None, **kwargs):
        request = self.chat_kwargs(kwargs, tool, last, end, hints)
        out = await self.client.openai.chat.completions.create(**request)
        self.sent(request, end)
        return out

    async def complete(self, *, template: str, parts: list[dict[str, Any]], tool: str | None = None,
                       last: bool = False, end: bool = False, **kwargs):
        request = self.complete_kwargs(kwargs, template, parts, tool, last, end)
        out = await self.client.openai.completions.create(**request)
        self.sent(request, end)
        return out

    @asynccontextmanager
    async def tool(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.tool_ended(name, time.perf_counter() - t0)

    async def tool_start(self, name: str) -> None:
        self.tool_started(name)

    async def tool_end(self, name: str, duration_s: float | None = None) -> None:
        self.tool_ended(name, duration_s)

    def spawn(self, program_id: str | None = None) -> "AsyncProgram":
        return AsyncProgram(self.client, program_id, parent=self.program_id)

    async def end(self) -> None:
        if not self.ended and self.turn > 0:
            for event in self.pending_events():
                if _check_end(await self.client.http.post(self.tool_url(), json=event)) is None:
                    break
            _check_end(await self.client.http.post(self.end_url()))
        self.tools_done.clear()
        self.ended = True

    async def __aenter__(self) -> "AsyncProgram":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.end()


class AgentServe:
    def __init__(self, base_url: str, api_key: str = "none", timeout_s: float = TIMEOUT_S):
        from openai import OpenAI

        self.base_url = base_url.rstrip("/")
        self.openai = OpenAI(base_url=self.base_url + "/v1", api_key=api_key, timeout=timeout_s)
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout_s, limits=_LIMITS,
                                 headers={"Authorization": f"Bearer {api_key}"})

    def program(self, program_id: str | None = None) -> Program:
        return Program(self, program_id)

    def close(self) -> None:
        self.http.close()
        self.openai.close()


class AsyncAgentServe:
    def __init__(self, base_url: str, api_key: str = "none", timeout_s: float = TIMEOUT_S):
        from openai import AsyncOpenAI

        self.base_url = base_url.rstrip("/")
        self.openai = AsyncOpenAI(base_url=self.base_url + "/v1", api_key=api_key, timeout=timeout_s)
        self.http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout_s, limits=_LIMITS,
                                      headers={"Authorization": f"Bearer {api_key}"})

    def program(self, program_id: str | None = None) -> AsyncProgram:
        return AsyncProgram(self, program_id)

    async def close(self) -> None:
        await self.http.aclose()
        await self.openai.close()
