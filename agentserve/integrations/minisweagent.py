"""mini-swe-agent on agentserve: each instance one program, its commands timed as tool calls.

In a mini-swe-agent config (a `mini-extra swebench` batch run included), two lines of the `model`
section:

    model:
      model_class: agentserve.integrations.minisweagent.AgentServeModel
      model_name: hosted_vllm/MODEL            # the name agentserve serves
      model_kwargs: {api_base: http://127.0.0.1:8000/v1}

mini-swe-agent builds one model per instance (`get_model` in its batch runner), so one model is one
program. The model sees the agent loop from inside: a query whose answer carries actions is followed
by the environment running them, and the next query comes when they are done, so the gap is the
command's time (reported as a tool call named `tool`, `bash` by default). The program ends when the
model is closed (`close()`, or leaving `with model:`), or when it is garbage-collected: the batch
runner drops each instance's model when the instance ends. A program the client never ends is
reaped by the server after `--idle-timeout`.

The trade-off: timing from the model's side needs no change to the agent or environment classes
(the batch runner fixes its agent class), and it counts the agent's own work between the answer and
the running command (rendering the observation; microseconds) as tool time.
"""

from __future__ import annotations

import time
import weakref
from typing import Any

import httpx
from minisweagent.models.litellm_model import LitellmModel, LitellmModelConfig

from agentserve.sdk import AgentServe, AgentServeError, Program


class AgentServeModelConfig(LitellmModelConfig):
    agentserve_url: str | None = None
    """agentserve's base URL (default: `model_kwargs.api_base` without its `/v1`)."""
    program_id: str | None = None
    """The program's id (default: a new one per model, i.e. per instance)."""
    tool: str = "bash"
    """The tool name the environment's commands are reported under (one predictor per name)."""
    cost_tracking: str = "ignore_errors"
    """A model served by agentserve has no price in litellm's registry."""


class AgentServeModel(LitellmModel):
    def __init__(self, **kwargs: Any):
        super().__init__(config_class=kwargs.pop("config_class", AgentServeModelConfig), **kwargs)
        self.client = AgentServe(self.config.agentserve_url or server_url(self.config.model_kwargs))
        self.program: Program = self.client.program(self.config.program_id)
        self._tool_t0: float | None = None
        # ends the program when the instance's model is dropped; close() runs it at once
        self._finalizer = weakref.finalize(self, _end, self.program, self.client)

    def _query(self, messages: list[dict[str, str]], **kwargs: Any):
        self._tool_done()
        extra = {**(self.config.model_kwargs.get("extra_body") or {}), **(kwargs.pop("extra_body", None) or {})}
        extra["agentserve"] = self.program.fields(tool=self.config.tool)
        return super()._query(messages, extra_body=extra, **kwargs)

    def query(self, messages: list[dict[str, str]], **kwargs: Any) -> dict:
        message = super().query(messages, **kwargs)
        if message.get("extra", {}).get("actions"):  # the environment runs them next
            self.program.tool_start(self.config.tool)
            self._tool_t0 = time.perf_counter()
        return message

    def _tool_done(self) -> None:
        if self._tool_t0 is not None:
            self.program.tool_end(self.config.tool, time.perf_counter() - self._tool_t0)
            self._tool_t0 = None

    def close(self) -> None:
        """End the program (idempotent)."""
        self._finalizer()

    def __enter__(self) -> "AgentServeModel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def server_url(model_kwargs: dict[str, Any]) -> str:
    """agentserve's base URL from litellm's `api_base` (`http://host:8000/v1` -> `http://host:8000`)."""
    base = model_kwargs.get("api_base") or model_kwargs.get("base_url")
    if not base:
        raise ValueError("AgentServeModel needs agentserve_url, or model_kwargs.api_base (http://HOST:PORT/v1)")
    base = base.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


def _end(program: Program, client: AgentServe) -> None:
    try:
        program.end()
    except (AgentServeError, httpx.HTTPError):  # a server gone first has nothing left to end
        pass
    finally:
        client.close()
