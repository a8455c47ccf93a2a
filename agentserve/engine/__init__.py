"""Starting vLLM engines (embedded `AsyncLLM`) from agentserve's `EngineSettings`."""

from agentserve.engine.embedded import start_engine
from agentserve.engine.settings import EngineSettings

__all__ = ["EngineSettings", "start_engine"]
