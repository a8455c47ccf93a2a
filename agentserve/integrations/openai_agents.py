"""The OpenAI Agents SDK on agentserve: a `Runner.run` is a program, its function tools are tool
calls, and each agent handed off to is a sub-program.

Two lines change in an application:

    agentserve = AgentServeProvider("http://127.0.0.1:8000")
    result = await agentserve.run(agent, "Fix the failing test")      # was Runner.run(agent, ...)

`run` calls `Runner.run` with this provider as the run's model provider and a
`ProgramRun` as its hooks (the caller's own `hooks` still receive every event), and end the run's
programs when it returns or raises. For `Runner.run_streamed` or a hand-built call, use the run
directly: `async with agentserve.program_run() as run: Runner.run_streamed(agent, x,
run_config=run.run_config(), hooks=run)` (end it after the stream is consumed).

Mapping:
- the first agent of the run is the root program (`program_id`, or a new id);
- an agent handed off to is a sub-program of the agent that handed off (`ROOT|AGENT`), one per
  agent name: its first call forks from the conversation so far, the parent's context; an agent
  handed back to continues its own program;
- a function tool runs as a tool call of its agent's program; concurrent tool calls of one turn
  are one tool phase (phases.py).
Models: agents name their model (a string, resolved by this provider into the SDK's chat
completions model on agentserve's OpenAI route); a `Model` instance set on an agent bypasses every
provider, so its calls carry no program.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from agents import Agent, RunConfig, RunHooks, Runner
from agents.models.interface import Model, ModelProvider
from agents.models.openai_chatcompletions import OpenAIChatCompletionsModel

from agentserve.integrations.phases import ToolPhases
from agentserve.sdk import AgentServeError, AsyncAgentServe, AsyncProgram

SUB_AGENT_SEPARATOR = "|"


class ProgramModel(OpenAIChatCompletionsModel):
    """The SDK's chat completions model, each call carrying the run's current program."""

    def __init__(self, model: str, run: "ProgramRun"):
        super().__init__(model=model, openai_client=run.client.openai)
        self.run = run

    def _settings(self, settings):
        extra = {**(settings.extra_body or {}), "agentserve": self.run.current.fields()}
        return dataclasses.replace(settings, extra_body=extra)

    async def get_response(self, system_instructions, input, model_settings, *args, **kwargs):
        return await super().get_response(system_instructions, input, self._settings(model_settings), *args, **kwargs)

    async def stream_response(self, system_instructions, input, model_settings, *args, **kwargs):
        async for event in super().stream_response(system_instructions, input, self._settings(model_settings),
                                                   *args, **kwargs):
            yield event


class ProgramRun(RunHooks, ModelProvider):
    """One run's programs: the model provider the run resolves models with and the hooks that move
    the current program on handoffs and time tools. `hooks`: the caller's own, called after ours."""

    def __init__(self, client: AsyncAgentServe, program_id: str | None = None, hooks: RunHooks | None = None):
        self.client = client
        self.user = hooks
        self.root: AsyncProgram = client.program(program_id)
        self.programs: dict[str, AsyncProgram] = {}  # agent name -> its program
        self.current: AsyncProgram = self.root
        self._phases = ToolPhases()

    def get_model(self, model_name: str | None) -> Model:
        if not model_name:
            raise ValueError("name the agent's model: agentserve serves it under the name its clients send")
        return ProgramModel(model_name, self)

    def run_config(self, base: RunConfig | None = None) -> RunConfig:
        return dataclasses.replace(base or RunConfig(), model_provider=self)

    def program_of(self, agent: Agent) -> AsyncProgram:
        return self.programs.get(agent.name, self.root if not self.programs else self.current)

    async def on_agent_start(self, context, agent) -> None:
        if not self.programs:
            self.programs[agent.name] = self.root
        self.current = self.programs[agent.name]
        await self._user("on_agent_start", context, agent)

    async def on_handoff(self, context, from_agent, to_agent) -> None:
        if to_agent.name not in self.programs:
            parent = self.programs.get(from_agent.name, self.root)
            self.programs[to_agent.name] = parent.spawn(f"{self.root.program_id}{SUB_AGENT_SEPARATOR}{to_agent.name}")
        await self._user("on_handoff", context, from_agent, to_agent)

    async def on_tool_start(self, context, agent, tool) -> None:
        program = self.program_of(agent)
        if program.turn > 0 and (opened := self._phases.start(program.program_id, tool.name)) is not None:
            await program.tool_start(opened)
        await self._user("on_tool_start", context, agent, tool)

    async def on_tool_end(self, context, agent, tool, result) -> None:
        program = self.program_of(agent)
        if (closed := self._phases.end(program.program_id)) is not None:
            await program.tool_end(*closed)
        await self._user("on_tool_end", context, agent, tool, result)

    async def on_llm_start(self, context, agent, system_prompt, input_items) -> None:
        await self._user("on_llm_start", context, agent, system_prompt, input_items)

    async def on_llm_end(self, context, agent, response) -> None:
        await self._user("on_llm_end", context, agent, response)

    async def on_agent_end(self, context, agent, output) -> None:
        await self._user("on_agent_end", context, agent, output)

    async def _user(self, hook: str, *args: Any) -> None:
        if self.user is not None:
            await getattr(self.user, hook)(*args)

    async def end(self) -> None:
        """End the run's programs, the latest sub-agent first, the root last."""
        for program in [*reversed([p for p in self.programs.values() if p is not self.root]), self.root]:
            try:
                await program.end()
            except AgentServeError:
                if program is self.root:
                    raise

    async def __aenter__(self) -> "ProgramRun":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.end()


class AgentServeProvider(ModelProvider):
    """Models on an agentserve server, and runs whose calls are programs."""

    def __init__(self, base_url: str, api_key: str = "none"):
        self.client = AsyncAgentServe(base_url, api_key=api_key)

    def get_model(self, model_name: str | None) -> Model:
        """A model outside a program run: plain requests (no program fields)."""
        return OpenAIChatCompletionsModel(model=model_name, openai_client=self.client.openai)

    def program_run(self, program_id: str | None = None, hooks: RunHooks | None = None) -> ProgramRun:
        return ProgramRun(self.client, program_id, hooks)

    async def run(self, agent: Agent, input: Any, *, program_id: str | None = None,
                  run_config: RunConfig | None = None, hooks: RunHooks | None = None, **kwargs: Any):
        """`Runner.run(agent, input, **kwargs)` as one program (sub-programs for handoffs)."""
        async with self.program_run(program_id, hooks) as run:
            return await Runner.run(agent, input, run_config=run.run_config(run_config), hooks=run, **kwargs)

    async def aclose(self) -> None:
        await self.client.close()
