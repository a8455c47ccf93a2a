"""OpenAI Agents SDK on agentserve: each run is a program, the agent handed off to a sub-program.

A triage agent hands off to a worker, which calls a `run_tests` function tool until three calls are
done. The two changed lines against a stock Agents SDK app:

    agentserve = AgentServeProvider("http://127.0.0.1:8000")
    result = await agentserve.run(triage, "Fix the failing test")       # was Runner.run(triage, ...)

Prints each call's prompt and cached tokens, then the tool times the server learned.

    python examples/openai_agents_handoff.py                 # starts its own server on the tiny model
    python examples/openai_agents_handoff.py --base-url http://127.0.0.1:8000 --runs 8
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import time

os.environ.setdefault("OPENAI_AGENTS_DISABLE_TRACING", "1")  # the SDK would export its traces to OpenAI

from agents import Agent, ModelSettings, function_tool, handoff  # noqa: E402
from agents.agent import ToolsToFinalOutputResult  # noqa: E402

from agentserve.integrations.openai_agents import AgentServeProvider  # noqa: E402
from framework_common import agentserve, arguments, print_tool_report, print_turns, tool_call  # noqa: E402

TOOL_S = 0.2
WORKER_TOOL_CALLS = 3


# Not strict (the tool, the handoff): vLLM constrains a strict tool's arguments itself, and the
# random-weight model's answers are shaped by the regex instead.
@function_tool(strict_mode=False)
def run_tests(target: str) -> str:
    """Run the test suite (`unit` or `all`)."""
    time.sleep(TOOL_S)
    return f"{target}: 2 passed"


def build_agents(model: str) -> Agent:
    """triage -> (handoff) -> worker, which ends the run after its third tool call."""
    calls = {"n": 0}

    def after_three_tool_calls(context, results) -> ToolsToFinalOutputResult:
        calls["n"] += len(results)
        return ToolsToFinalOutputResult(is_final_output=calls["n"] >= WORKER_TOOL_CALLS, final_output="done")

    worker = Agent(name="worker", instructions="You fix failing tests; run them after each change. " * 20,
                   model=model, tools=[run_tests], tool_use_behavior=after_three_tool_calls,
                   model_settings=ModelSettings(max_tokens=100, extra_body=tool_call(
                       "run_tests", '\\{"target": "(unit|all)"\\}')))
    return Agent(name="triage", instructions="You route each task to the agent that can do it. " * 20,
                 model=model, handoffs=[dataclasses.replace(handoff(worker), strict_json_schema=False)],
                 model_settings=ModelSettings(max_tokens=100, extra_body=tool_call("transfer_to_worker", "\\{\\}")))


async def run_all(base_url: str, model: str, runs: int) -> list[tuple[str, int, int]]:
    provider = AgentServeProvider(base_url)
    rows = []
    for i in range(runs):
        result = await provider.run(build_agents(model), "Fix the failing test.", program_id=f"run-{i}")
        rows += [(f"run-{i}", r.usage.input_tokens, r.usage.input_tokens_details.cached_tokens)
                 for r in result.raw_responses]
    await provider.aclose()
    return rows


def main() -> int:
    ap = arguments(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    ap.add_argument("--runs", type=int, default=8, help="runs (default: 8)")
    args = ap.parse_args()
    with agentserve(args) as base_url:
        print_turns(asyncio.run(run_all(base_url, args.model, args.runs)))
        print_tool_report(base_url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
