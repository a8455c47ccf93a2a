"""The OpenAI-compatible HTTP server: vLLM's own serving app around an agentserve engine.

We reuse vLLM's FastAPI app (`build_app` + `init_app_state`) instead of writing OpenAI routes by hand:
it already implements `/v1/chat/completions` (streaming too), `/v1/completions`, `/v1/models`,
`/health`, `/metrics` (Prometheus), request validation with 400s, 404 for unknown models and the
context-length check, and it stays byte-compatible with `vllm serve` as vLLM evolves. We add only
what agentserve needs on top, as extra routers and middleware (`extensions`), so a request without
agentserve fields is served exactly as stock vLLM serves it. `ray.serve.llm` wraps the same vLLM code
for the Ray path, so both front ends behave alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from agentserve.engine.settings import EngineSettings, engine_args, vllm_namespace

log = logging.getLogger("agentserve.server")

# An extension gets the app and the engine client before the server starts accepting requests.
Extension = Callable[["object", "object"], None]


async def serve(
    settings: EngineSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    extensions: Sequence[Extension] = (),
) -> None:
    """Start the engine, then serve the OpenAI API on host:port until SIGINT/SIGTERM."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client_from_engine_args
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.launcher import serve_http, setup_server

    ns = vllm_namespace(settings, host=host, port=port)
    # Bind before the engine starts, as `vllm serve` does, so a busy port fails fast.
    listen_address, sock = setup_server(ns, reuse_port=False)
    async with build_async_engine_client_from_engine_args(AsyncEngineArgs.from_cli_args(ns)) as engine:
        tasks = await engine.get_supported_tasks()
        app = build_app(ns, tasks, engine.model_config)
        for extend in extensions:
            extend(app, engine)
        await init_app_state(engine, app.state, ns, tasks)
        log.info("agentserve serving %s on %s", ns.served_model_name, listen_address)
        shutdown = await serve_http(
            app,
            sock=sock,
            host=host,
            port=port,
            log_level=ns.uvicorn_log_level,
            access_log=not ns.disable_uvicorn_access_log,
            h11_max_incomplete_event_size=ns.h11_max_incomplete_event_size,
            h11_max_header_count=ns.h11_max_header_count,
        )
    try:
        await shutdown
    finally:
        sock.close()


__all__ = ["serve", "engine_args"]
