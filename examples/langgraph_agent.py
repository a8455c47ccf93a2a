"""A LangGraph agent on agentserve: each thread's run is a program, each sub-graph a sub-program.

A planner node answers first; then a coder and a reviewer, each a sub-graph with the usual
agent/ToolNode loop, call a `run_tests` tool. The two changed lines against a stock LangGraph app:

    llm = ChatAgentServe(model="tiny", base_url="http://127.0.0.1:8000/v1", api_key="none")  # was ChatOpenAI
    graph.invoke(inputs, config={"configurable": {"thread_id": t},
                                 "callbacks": [AgentServeCallbackHandler("http://127.0.0.1:8000")]})

Prints each call's prompt and cached tokens per program, then the tool times the server learned.

    python examples/langgraph_agent.py                 # starts its own server on the tiny model
    python examples/langgraph_agent.py --base-url http://127.0.0.1:8000 --threads 8
"""

import argparse
import sys
import time
from typing import Annotated, TypedDict

from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.tools import tool
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import ToolNode

from agentserve.integrations.langchain import AgentServeCallbackHandler, ChatAgentServe
from framework_common import agentserve, arguments, print_tool_report, print_turns, tool_call

TOOL_S = 0.2
SYSTEM = "You are a careful software engineer. Run the tests before and after every change. " * 20


@tool
def run_tests(target: str) -> str:
    """Run the test suite (`unit` or `all`)."""
    time.sleep(TOOL_S)
    return f"{target}: 2 passed"


class State(TypedDict):
    messages: Annotated[list, add_messages]


def build_graph(base_url: str, model: str, coder_calls: int = 2, reviewer_calls: int = 1):
    """planner -> coder (sub-graph, `coder_calls` tool calls) -> reviewer (sub-graph)."""

    def llm(extra_body: dict, max_tokens: int) -> ChatAgentServe:
        return ChatAgentServe(model=model, base_url=base_url + "/v1", api_key="none", max_tokens=max_tokens,
                              extra_body=extra_body)

    acting = llm(tool_call("run_tests", '\\{"target": "(unit|all)"\\}'), 100).bind_tools([run_tests])
    answering = llm({"structured_outputs": {"regex": "Done\\."}}, 8)

    def agent_loop(tool_calls: int):
        made = {"n": 0}

        def agent(state):
            made["n"] += 1
            llm_now = acting if made["n"] <= tool_calls else answering
            return {"messages": [llm_now.invoke(state["messages"])]}

        g = StateGraph(State)
        g.add_node("agent", agent)
        g.add_node("tools", ToolNode([run_tests]))
        g.add_edge(START, "agent")
        g.add_conditional_edges("agent", lambda s: "tools" if s["messages"][-1].tool_calls else END)
        g.add_edge("tools", "agent")
        return g.compile()

    root = StateGraph(State)
    root.add_node("planner", lambda state: {"messages": [answering.invoke(state["messages"])]})
    root.add_node("coder", agent_loop(coder_calls))
    root.add_node("reviewer", agent_loop(reviewer_calls))
    root.add_edge(START, "planner")
    root.add_edge("planner", "coder")
    root.add_edge("coder", "reviewer")
    root.add_edge("reviewer", END)
    return root.compile()


def run_thread(base_url: str, model: str, thread: str, handler: AgentServeCallbackHandler) -> list[AIMessage]:
    graph = build_graph(base_url, model)  # built per thread: its agent loops count their own calls
    inputs = {"messages": [SystemMessage(SYSTEM), HumanMessage(f"Fix the failing test ({thread}).")]}
    out = graph.invoke(inputs, config={"configurable": {"thread_id": thread}, "callbacks": [handler]})
    return [m for m in out["messages"] if isinstance(m, AIMessage)]


def usage(message: AIMessage) -> tuple[int, int]:
    u = message.response_metadata["token_usage"]
    return u["prompt_tokens"], u["prompt_tokens_details"]["cached_tokens"]


def main() -> int:
    ap = arguments(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    ap.add_argument("--threads", type=int, default=8, help="threads to run (default: 8)")
    args = ap.parse_args()
    with agentserve(args) as base_url:
        handler = AgentServeCallbackHandler(base_url)
        rows = []
        for i in range(args.threads):
            rows += [(f"thread-{i}", *usage(m)) for m in run_thread(base_url, args.model, f"thread-{i}", handler)]
        handler.close()
        print_turns(rows)
        print_tool_report(base_url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
