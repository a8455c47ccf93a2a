"""Drop-in integrations for agent frameworks, one module per framework, each an optional extra:

- `minisweagent`: mini-swe-agent's model class (`pip install agentserve[minisweagent]`);
- `langchain`: a LangChain chat model and callback handler for LangGraph (`agentserve[langchain]`);
- `openai_agents`: the OpenAI Agents SDK's model provider and run hooks (`agentserve[openai-agents]`).

Each maps the framework's unit of work to an agentserve program (an instance, a thread, a run), its
tool calls to tool events, and its sub-agents to sub-programs, through the SDK (`agentserve.sdk`).
"""
