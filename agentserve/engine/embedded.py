"""The embedded engine: a vLLM v1 `AsyncLLM` started in this process from `EngineSettings`.

vLLM spawns its engine-core process, so any script that calls `start_engine` needs an
`if __name__ == "__main__":` guard.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from agentserve.engine.settings import EngineSettings, engine_args


@asynccontextmanager
async def start_engine(settings: EngineSettings) -> AsyncIterator:
    """Start an `AsyncLLM` for `settings`; shut it down on exit."""
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client_from_engine_args

    async with build_async_engine_client_from_engine_args(engine_args(settings)) as engine:
        yield engine
