"""LangChain and LangGraph on agentserve: a graph run is a program, its tools are tool calls, its
sub-graphs are sub-programs.

Two lines change in an application:

    llm = ChatAgentServe(model="MODEL", base_url="http://127.0.0.1:8000/v1", api_key="none")  # was ChatOpenAI
    graph.invoke(inputs, config={"configurable": {"thread_id": "t1"},
                                 "callbacks": [AgentServeCallbackHandler("http://127.0.0.1:8000")]})

The handler sees every run of the invocation (LangChain's callbacks): it keeps the run tree, times
each tool run and ends the invocation's programs when its root run ends. The chat model asks it, per
call, for the call's program fields (`extra_body.agentserve`). Program identity:
- the root program is the LangGraph `thread_id` (from the run's metadata), else the root run's id;
- a call inside a sub-graph (LangGraph's `checkpoint_ns` path `node:task|node:task`) belongs to a
  sub-program per sub-graph invocation (`THREAD|researcher:TASK`), whose parent is the enclosing
  graph's program: the nearest one that has made a call, since the server accepts only a parent it
  has seen.
A program ends with the invocation that ran it, so a thread's next invocation is a new program with
the same id (its prefix still cached, if not evicted). Concurrent tool runs of one program (a
ToolNode running several calls) are one tool phase (phases.py). The handler posts its
events synchronously (`run_inline`, so their order holds in async graphs too): a few milliseconds
per tool run on a local server; a failed post is logged by LangChain's callback manager, as any
handler's error is, and does not stop the graph.
"""

from __future__ import annotations

import threading
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_openai import ChatOpenAI

from agentserve.integrations.phases import ToolPhases
from agentserve.sdk import AgentServe, Program

NS_SEPARATOR = "|"  # LangGraph's checkpoint namespace: one `node:task` part per graph level


def program_path(root: str, checkpoint_ns: str | None) -> list[str]:
    """The program ids from the root to a call's program: one per enclosing sub-graph invocation
    (the namespace's last part is the node that runs the call, inside the innermost graph)."""
    parts = [p for p in (checkpoint_ns or "").split(NS_SEPARATOR) if p]
    path = [root]
    for part in parts[:-1]:
        path.append(f"{path[-1]}{NS_SEPARATOR}{part}")
    return path


class AgentServeCallbackHandler(BaseCallbackHandler):
    """Maps an invocation's runs to agentserve programs; `ChatAgentServe` reads it per call."""

    run_inline = True  # events in the order they happen, also in async graphs

    def __init__(self, base_url: str, api_key: str = "none"):
        self.client = AgentServe(base_url, api_key=api_key)
        self._lock = threading.Lock()
        self._parent: dict[UUID, UUID | None] = {}
        self._meta: dict[UUID, dict[str, Any]] = {}
        self._programs: dict[UUID, dict[str, Program]] = {}  # root run -> program id -> program
        self._tools: dict[UUID, Program] = {}  # tool run -> its program
        self._phases = ToolPhases()

    # -- the run tree -------------------------------------------------------------------------------
    def _register(self, run_id: UUID, parent_run_id: UUID | None, metadata: dict | None) -> None:
        with self._lock:
            self._parent[run_id] = parent_run_id
            self._meta[run_id] = metadata or {}

    def _root(self, run_id: UUID) -> UUID:
        while (up := self._parent.get(run_id)) is not None:
            run_id = up
        return run_id

    def on_chain_start(self, serialized, inputs, *, run_id, parent_run_id=None, metadata=None, **kw) -> None:
        self._register(run_id, parent_run_id, metadata)

    def on_chat_model_start(self, serialized, messages, *, run_id, parent_run_id=None, metadata=None, **kw) -> None:
        self._register(run_id, parent_run_id, metadata)

    def on_llm_start(self, serialized, prompts, *, run_id, parent_run_id=None, metadata=None, **kw) -> None:
        self._register(run_id, parent_run_id, metadata)

    def program(self, run_id: UUID, create: bool) -> Program | None:
        """The program of a run (created on its first LLM call when `create`; None before that)."""
        with self._lock:
            root = self._root(run_id)
            meta = self._meta.get(run_id, {})
            thread = (meta.get("configurable") or {}).get("thread_id") or meta.get("thread_id")
            path = program_path(str(thread) if thread is not None else f"run-{root}",
                                meta.get("langgraph_checkpoint_ns") or meta.get("checkpoint_ns"))
            programs = self._programs.setdefault(root, {})
            program = programs.get(path[-1])
            if program is None and create:
                parent = next((programs[p] for p in reversed(path[:-1]) if p in programs), None)
                program = programs[path[-1]] = (parent.spawn(path[-1]) if parent is not None
                                                else self.client.program(path[-1]))
            return program

    def call_fields(self, run_id: UUID) -> dict[str, Any]:
        """The `agentserve` object of an LLM call (its run registered by on_chat_model_start)."""
        return self.program(run_id, create=True).fields()

    # -- tools --------------------------------------------------------------------------------------
    def on_tool_start(self, serialized, input_str, *, run_id, parent_run_id=None, metadata=None, **kw) -> None:
        self._register(run_id, parent_run_id, metadata)
        program = self.program(run_id, create=False)
        if program is None:  # no LLM call yet: nothing of this program is cached
            return
        name = (serialized or {}).get("name") or kw.get("name") or "tool"
        with self._lock:
            self._tools[run_id] = program
            opened = self._phases.start(program.program_id, name)
        if opened is not None:
            program.tool_start(opened)

    def on_tool_end(self, output, *, run_id, **kw) -> None:
        self._tool_done(run_id)

    def on_tool_error(self, error, *, run_id, **kw) -> None:
        self._tool_done(run_id)

    def _tool_done(self, run_id: UUID) -> None:
        with self._lock:
            program = self._tools.pop(run_id, None)
            closed = self._phases.end(program.program_id) if program is not None else None
        if closed is not None:
            program.tool_end(*closed)

    # -- the end of an invocation -------------------------------------------------------------------
    def on_chain_end(self, outputs, *, run_id, parent_run_id=None, **kw) -> None:
        self._run_done(run_id, parent_run_id)

    def on_chain_error(self, error, *, run_id, parent_run_id=None, **kw) -> None:
        self._run_done(run_id, parent_run_id)

    def on_llm_end(self, response, *, run_id, parent_run_id=None, **kw) -> None:
        self._run_done(run_id, parent_run_id)

    def on_llm_error(self, error, *, run_id, parent_run_id=None, **kw) -> None:
        self._run_done(run_id, parent_run_id)

    def _run_done(self, run_id: UUID, parent_run_id: UUID | None) -> None:
        if parent_run_id is not None:
            return
        with self._lock:  # a root run ended: its programs end, sub-programs first
            programs = self._programs.pop(run_id, {})
            self._forget(run_id)
        for program_id in sorted(programs, key=lambda p: -p.count(NS_SEPARATOR)):
            programs[program_id].end()

    def _forget(self, root: UUID) -> None:
        for run in [r for r in self._parent if self._root(r) == root]:
            self._parent.pop(run, None)
            self._meta.pop(run, None)

    def close(self) -> None:
        self.client.close()


class ChatAgentServe(ChatOpenAI):
    """`ChatOpenAI` whose calls carry their program's fields, from the `AgentServeCallbackHandler`
    in the run's callbacks (without one, calls are plain OpenAI requests)."""

    def _with_program(self, run_manager, kwargs: dict[str, Any]) -> dict[str, Any]:
        handler = next((h for h in getattr(run_manager, "handlers", ())
                        if isinstance(h, AgentServeCallbackHandler)), None)
        if handler is None:
            return kwargs
        extra = {**(self.extra_body or {}), **(kwargs.get("extra_body") or {}),
                 "agentserve": handler.call_fields(run_manager.run_id)}
        return {**kwargs, "extra_body": extra}

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        return super()._generate(messages, stop, run_manager, **self._with_program(run_manager, kwargs))

    async def _agenerate(self, messages, stop=None, run_manager=None, **kwargs):
        return await super()._agenerate(messages, stop, run_manager, **self._with_program(run_manager, kwargs))

    def _stream(self, messages, stop=None, run_manager=None, **kwargs):
        return super()._stream(messages, stop, run_manager, **self._with_program(run_manager, kwargs))

    async def _astream(self, messages, stop=None, run_manager=None, **kwargs):
        async for chunk in super()._astream(messages, stop, run_manager, **self._with_program(run_manager, kwargs)):
            yield chunk
