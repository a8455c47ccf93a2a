"""The framework integrations (agentserve/integrations/) running the real framework packages against a
real `agentserve serve` (the session's server, with a tool-call parser), through the examples in
examples/ (so they run as tested).

The test model has random weights, so its answers are made well-formed with vLLM's structured outputs
(examples/framework_common.py): what a trained model would answer. Everything else is the framework's
own loop: its agent, its tool execution, its environment.

Each test checks the issue's targets: every turn after a program's first reads >= 0.8 of its prompt
from the prefix cache (`cached_tokens`), the tools' measured durations reach the server's predictor,
and every program is over after the run (its id unknown to the server, no pin left behind).
"""

import asyncio
import os
import sys
import time
from pathlib import Path
from urllib.parse import quote
from uuid import uuid4

import httpx
import pytest

pytestmark = pytest.mark.slow

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of litellm's price list
os.environ.setdefault("MSWEA_SILENT_STARTUP", "1")
os.environ.setdefault("OPENAI_AGENTS_DISABLE_TRACING", "1")  # the Agents SDK exports traces to OpenAI

CACHED_SHARE = 0.8
TOOL_S = 0.2  # every test tool sleeps at least this long


def stats(server) -> dict:
    return httpx.get(server.base_url + "/v1/agentserve/stats", timeout=30).json()


def samples(server, tool: str) -> int:
    return stats(server)["tools"].get(tool, {}).get("samples", 0)


def program(server, program_id: str) -> httpx.Response:
    return httpx.get(f"{server.base_url}/v1/programs/{quote(program_id, safe='')}", timeout=30)


def assert_reads_from_cache(usages: list[tuple[int, int]]) -> None:
    """(prompt tokens, cached tokens) of a program's calls in order: every call after the first."""
    assert len(usages) >= 2
    for turn, (prompt, cached) in enumerate(usages[1:], start=1):
        assert cached >= CACHED_SHARE * prompt, f"turn {turn}: {cached} of {prompt} prompt tokens cached"


def assert_over(server, program_ids, before: dict) -> None:
    """The programs ended: unknown to the server, no more programs or pins than before the run."""
    time.sleep(0.3)  # an end posted by a finalizer or an engine-side release settles
    assert [program(server, p).status_code for p in program_ids] == [404] * len(program_ids)
    after = stats(server)
    assert after["programs"] <= before["programs"]
    assert after["engine"]["pins"] <= before["engine"]["pins"]


def test_minisweagent_instances_are_programs_with_timed_commands(server, tmp_path):
    """mini-swe-agent's own SWE-bench config and agent loop, its local environment, our model class
    chosen by the config's `model_class`, one model per instance as its batch runner builds them."""
    from minisweagent_swebench import run_instance

    tool, steps, before = f"mswea-bash-{uuid4().hex[:6]}", 4, stats(server)
    results = [run_instance(server.base_url, "tiny", instance, str(tmp_path), steps, tool=tool,
                            commands='\\{"command": "sleep 0\\.(2|3)"\\}')
               for instance in ("demo__repo-1", "demo__repo-2")]
    assert len({r["program_id"] for r in results}) == 2  # one program per instance
    for r in results:
        assert r["exit_status"] == "LimitsExceeded"  # it ran its steps: every answer was an action
        assert r["described"]["llm_calls"] == steps and r["described"]["parent_program_id"] is None
        durations = [n["end"] - n["start"] for n in r["described"]["nodes"] if n["kind"] == "tool" and "end" in n]
        assert len(durations) == steps - 1 and all(TOOL_S <= d < 5 for d in durations)  # the last never returned
        assert_reads_from_cache(r["usages"])
    assert samples(server, tool) == 2 * (steps - 1)
    assert_over(server, [r["program_id"] for r in results], before)


def test_langgraph_thread_is_a_program_and_subgraphs_are_sub_programs(server):
    from langgraph_agent import run_thread, usage

    from agentserve.integrations.langchain import AgentServeCallbackHandler

    handler = AgentServeCallbackHandler(server.base_url)
    seen: dict[str, dict] = {}
    call_fields = handler.call_fields

    def spy(run_id):  # the fields each call carried
        fields = call_fields(run_id)
        seen[fields["program_id"]] = fields
        return fields

    handler.call_fields = spy
    thread, before, tests_before = f"thread-{uuid4().hex[:8]}", stats(server), samples(server, "run_tests")
    messages = run_thread(server.base_url, "tiny", thread, handler)

    subs = sorted(p for p in seen if p != thread)
    assert [p.split("|")[1].split(":")[0] for p in subs] == ["coder", "reviewer"]  # one per sub-graph
    assert all(seen[p]["parent_program_id"] == thread for p in subs) and "parent_program_id" not in seen[thread]
    assert len(messages) == 1 + 3 + 2  # planner; coder: 2 tool calls and an answer; reviewer: 1 and an answer
    assert_reads_from_cache([usage(m) for m in messages])  # the sub-programs read the planner's context too
    assert samples(server, "run_tests") - tests_before == 3 and stats(server)["tools"]["run_tests"]["mean_s"] >= TOOL_S
    assert_over(server, list(seen), before)
    handler.close()


def test_langchain_without_the_handler_sends_plain_requests(server):
    from agentserve.integrations.langchain import ChatAgentServe

    before = stats(server)["programs"]
    llm = ChatAgentServe(model="tiny", base_url=server.base_url + "/v1", api_key="none", max_tokens=2)
    assert llm.invoke("hello").response_metadata["token_usage"]["prompt_tokens"] > 0
    assert stats(server)["programs"] == before


def test_openai_agents_run_is_a_program_and_a_handoff_a_sub_program(server):
    from agents import RunHooks
    from openai_agents_handoff import WORKER_TOOL_CALLS, build_agents

    from agentserve.integrations.openai_agents import AgentServeProvider

    root, described, handoffs = f"run-{uuid4().hex[:8]}", {}, []

    class Seen(RunHooks):  # the caller's own hooks still run; they read the DAG while the run is live
        async def on_handoff(self, context, from_agent, to_agent):
            handoffs.append((from_agent.name, to_agent.name))

        async def on_tool_end(self, context, agent, tool, result):
            for pid in (root, f"{root}|worker"):
                described[pid] = program(server, pid).json()

    async def main():
        provider = AgentServeProvider(server.base_url)
        result = await provider.run(build_agents("tiny"), "Fix the failing test.", program_id=root, hooks=Seen())
        await provider.aclose()
        return result

    before, tests_before = stats(server), samples(server, "run_tests")
    result = asyncio.run(main())
    assert result.final_output == "done" and handoffs == [("triage", "worker")]
    worker = f"{root}|worker"
    assert described[root]["llm_calls"] == 1 and described[worker]["parent_program_id"] == root
    assert described[worker]["llm_calls"] == WORKER_TOOL_CALLS and described[worker]["workflow"] == root
    usages = [(r.usage.input_tokens, r.usage.input_tokens_details.cached_tokens) for r in result.raw_responses]
    assert len(usages) == 1 + WORKER_TOOL_CALLS
    assert_reads_from_cache(usages[1:])  # the worker's calls after its first (its own instructions come first)
    assert samples(server, "run_tests") - tests_before == WORKER_TOOL_CALLS
    assert stats(server)["tools"]["run_tests"]["mean_s"] >= TOOL_S
    assert_over(server, [root, worker], before)
