"""How the framework integrations map a framework's runs to programs, without a server: the pure
parts (ids, URLs) and the callback/hook bookkeeping before anything is posted."""

import asyncio
from types import SimpleNamespace
from uuid import uuid4

import pytest

from agentserve.integrations.langchain import AgentServeCallbackHandler, program_path
from agentserve.integrations.minisweagent import server_url
from agentserve.integrations.openai_agents import AgentServeProvider

NOWHERE = "http://127.0.0.1:9"  # nothing listens: a post would raise


@pytest.mark.parametrize("ns, path", [
    (None, ["t"]),
    ("", ["t"]),
    ("planner:1", ["t"]),  # a node of the root graph runs in the root program
    ("coder:1|agent:2", ["t", "t|coder:1"]),
    ("coder:1|tests:3|run:4", ["t", "t|coder:1", "t|coder:1|tests:3"]),
])
def test_program_path_has_one_program_per_sub_graph_invocation(ns, path):
    assert program_path("t", ns) == path


@pytest.mark.parametrize("kwargs, url", [
    ({"api_base": "http://h:8000/v1"}, "http://h:8000"),
    ({"api_base": "http://h:8000/v1/"}, "http://h:8000"),
    ({"base_url": "http://h:8000"}, "http://h:8000"),
])
def test_minisweagent_server_url_from_litellm_api_base(kwargs, url):
    assert server_url(kwargs) == url


def test_minisweagent_server_url_needs_a_base():
    with pytest.raises(ValueError, match="api_base"):
        server_url({})


def _start(handler, kind: str, run, parent=None, **metadata):
    method = {"chain": handler.on_chain_start, "chat": handler.on_chat_model_start}[kind]
    method({}, {} if kind == "chain" else [[]], run_id=run, parent_run_id=parent, metadata=metadata)


def test_langgraph_runs_map_to_a_thread_program_and_sub_graph_programs():
    h = AgentServeCallbackHandler(NOWHERE)
    root, planner, sub, coder = uuid4(), uuid4(), uuid4(), uuid4()
    _start(h, "chain", root, thread_id="t")
    _start(h, "chat", planner, root, thread_id="t", langgraph_checkpoint_ns="planner:1")
    assert h.call_fields(planner) == {"program_id": "t"}
    _start(h, "chain", sub, root, thread_id="t", langgraph_checkpoint_ns="coder:2")
    _start(h, "chat", coder, sub, thread_id="t", langgraph_checkpoint_ns="coder:2|agent:3")
    assert h.call_fields(coder) == {"program_id": "t|coder:2", "parent_program_id": "t"}
    # a tool run before its program's first call posts nothing (NOWHERE would raise)
    h.on_tool_start({"name": "search"}, "", run_id=uuid4(), parent_run_id=root,
                    metadata={"thread_id": "t", "langgraph_checkpoint_ns": "reviewer:4|tools:5"})


def test_a_sub_graph_whose_parent_never_called_is_a_root_and_plain_chains_use_the_run():
    h = AgentServeCallbackHandler(NOWHERE)
    root, chat = uuid4(), uuid4()
    _start(h, "chain", root, thread_id="t")
    _start(h, "chat", chat, root, thread_id="t", langgraph_checkpoint_ns="coder:2|agent:3")
    assert h.call_fields(chat) == {"program_id": "t|coder:2"}  # the server only accepts a parent it has seen
    plain_root, plain_chat = uuid4(), uuid4()
    _start(h, "chain", plain_root)
    _start(h, "chat", plain_chat, plain_root)
    assert h.call_fields(plain_chat) == {"program_id": f"run-{plain_root}"}


def test_openai_agents_a_handoff_target_is_a_sub_program_and_a_hand_back_continues():
    async def main():
        run = AgentServeProvider(NOWHERE).program_run("r")
        triage, worker = SimpleNamespace(name="triage"), SimpleNamespace(name="worker")
        await run.on_agent_start(None, triage)
        assert run.current.fields() == {"program_id": "r"}
        await run.on_handoff(None, triage, worker)
        await run.on_agent_start(None, worker)
        assert run.current.fields() == {"program_id": "r|worker", "parent_program_id": "r"}
        await run.on_handoff(None, worker, triage)
        await run.on_agent_start(None, triage)
        assert run.current is run.root
        assert run.get_model("tiny").run is run
        with pytest.raises(ValueError, match="name the agent's model"):
            run.get_model(None)

    asyncio.run(main())


def test_concurrent_tool_calls_of_a_program_are_one_phase():
    from agentserve.integrations.phases import ToolPhases

    t = [0.0]
    phases = ToolPhases(clock=lambda: t[0])
    assert phases.start("p", "search") == "search"
    t[0] = 1.0
    assert phases.start("p", "fetch") is None  # joins the open phase
    assert phases.start("q", "fetch") == "fetch"  # another program's phase is its own
    t[0] = 2.0
    assert phases.end("p") is None
    t[0] = 3.5
    assert phases.end("p") == ("search", 3.5)  # first start to last end, under the first name
    assert phases.end("p") is None  # an end without a start closes nothing
    assert phases.start("p", "fetch") == "fetch"  # the next phase
