"""The OpenAI-compatible HTTP server: vLLM's own serving app around an agentserve engine.

We reuse vLLM's FastAPI app (`build_app` + `init_app_state`) instead of writing OpenAI routes by hand:
it already implements `/v1/chat/completions` (streaming too), `/v1/completions`, `/v1/models`,
`/health`, `/metrics` (Prometheus), request validation with 400s, 404 for unknown models and the
context-length check, and it stays byte-compatible with `vllm serve` as vLLM evolves. agentserve adds
its program layer on top (`middleware.py`, `engine_client.py`, `program_routes.py`), so a
request without agentserve fields is served exactly as stock vLLM serves it. `ray.serve.llm` wraps
the same vLLM code for the Ray path, so both front ends behave alike.
"""

from __future__ import annotations

import asyncio
import logging

import msgspec

from agentserve.engine.settings import engine_settings_for, resolve_host_tier, vllm_namespace
from agentserve.observability.events import program_events
from agentserve.options import EngineSettings, ProgramOptions
from agentserve.server.tenants import TenantGate, admit_under_limits, ttl_caps

log = logging.getLogger("agentserve.server")

async def build_control_plane(engine, options: ProgramOptions, max_model_len: int, model: str,
                        gate: TenantGate | None = None):
    from agentserve.engine.profiling import measure_reload_profile, measure_transfer_profile
    from agentserve.programs.control import ControlPlane
    from agentserve.programs.tracker import ProgramTracker
    from agentserve.policies import POLICIES, make_ttl
    from agentserve.ttl.policy import OnlineBenefit
    from agentserve.ttl.predictor import ToolDurationPredictor

    predictor = ToolDurationPredictor()
    benefit = OnlineBenefit()
    policy, link = None, None
    if POLICIES[options.policy].plugin:
        reload = host = None
        if POLICIES[options.policy].reload_profile:
            reload = await measure_reload_profile(engine, max_tokens=min(max_model_len - 1, 8192))
            log.info("reload profile: %s", reload)
            if options.host.kv_tokens:
                host = await measure_transfer_profile(engine, max_tokens=min(max_model_len - 1, 8192,
                                                                             options.host.kv_tokens))
                log.info("host tier load-back profile: %s", host)
        policy = make_ttl(options.policy, predictor=predictor, reload=reload, benefit=benefit,
                          fixed_ttl_s=options.fixed_ttl_s, max_ttl_s=options.max_ttl_s, host=host,
                          host_tokens=options.host.kv_tokens or 0)

        async def link(command: str, payload: dict) -> dict:
            return await engine.engine_core.call_utility_async("agentserve_scheduler_command", command, payload)

    on_event, tracer = program_events(options, model)
    return ControlPlane(ProgramTracker(options.idle_timeout_s), predictor, policy, link, benefit,
                        on_event=on_event, tracer=tracer, ttl_cap=ttl_caps(gate) if gate is not None else None)


async def shared_prompts(engine, model_dir: str):
    from transformers import AutoTokenizer

    from agentserve.server.shared_prompts import SharedPrompts

    return SharedPrompts(engine, AutoTokenizer.from_pretrained(model_dir), engine.model_config.get_vocab_size())


async def cross_model_front(options: ProgramOptions, sender_dir: str, sender_name: str, shares):
    """The cross-model variant's front (HF path), hooked to the sender's sharing requests; None if off."""
    o = options.kvshare
    if o.cross_model is None:
        return None
    from agentserve.server.cross_model_front import build_cross_model

    front = await asyncio.to_thread(build_cross_model, sender_dir, sender_name, o.cross_model,
                                    group=o.cross_model_group, max_kl=o.cross_model_max_kl,
                                    profile_path=o.cross_model_profile, max_bytes=o.cross_model_store_bytes)
    shares.on_translate = front.sender_prompt
    log.info("cross-model variant %s served next to %s, recomputing layers %s", front.name, sender_name,
             front.reuse.group)
    return front


def add_kvshare_routes(app, engine, cross=None) -> None:
    from agentserve.server import metrics

    @app.get("/v1/kvshare/stats")
    async def kvshare_stats():
        """The KV-sharing planner: decisions by reason, segments and bytes held, templates, anchors;
        with --cross-model, the variant's store, counters and profiled layer groups."""
        stats = await engine.engine_core.call_utility_async("agentserve_kvshare_stats")
        metrics.record_kvshare_stats(stats)
        return {**stats, "cross_model": cross.stats()} if cross is not None else stats


def add_turn_time_route(app, engine) -> None:
    @app.get("/v1/agentserve/turn_times")
    async def turn_times():
        """Each request finished since the last read: its time in the engine by part (seconds), its
        tokens and preemptions (engine/turn_ledger.py); reading resets. Not a tenant's route: it names
        every tenant's programs."""
        return await engine.engine_core.call_utility_async("agentserve_turn_times")


async def kvshare_tick_loop(engine, period_s: float = 1.0) -> None:
    """Keep the KV-sharing metrics on /metrics current."""
    from agentserve.server import metrics
    from agentserve.server.periodic import every

    async def poll() -> None:
        metrics.record_kvshare_stats(await engine.engine_core.call_utility_async("agentserve_kvshare_stats"))

    await every(period_s, poll, "kvshare stats poll")


async def serve(settings: EngineSettings, *, host: str = "127.0.0.1", port: int = 8000,
                options: ProgramOptions | None = None) -> None:
    """Start the engine, then serve the OpenAI API and the program routes until SIGINT/SIGTERM."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client_from_engine_args
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.launcher import serve_http, setup_server

    from agentserve.programs.continuity import conversations_for
    from agentserve.programs.hints import rules_for
    from agentserve.server.middleware import AgentFieldsMiddleware
    from agentserve.programs.control import LocalControl
    from agentserve.server.engine_client import ProgramEngineClient
    from agentserve.server.program_routes import add_program_routes, tick_loop

    options = resolve_host_tier(settings, options or ProgramOptions())
    ns = vllm_namespace(engine_settings_for(settings, options), host=host, port=port)
    # Bind before the engine starts, as `vllm serve` does, so a busy port fails fast.
    listen_address, sock = setup_server(ns, reuse_port=False)
    async with build_async_engine_client_from_engine_args(AsyncEngineArgs.from_cli_args(ns)) as engine:
        gate = TenantGate(options.tenants) if options.tenants is not None else None
        control = await build_control_plane(engine, options, engine.model_config.max_model_len,
                                      ns.served_model_name[0] if ns.served_model_name else settings.model, gate)
        client = ProgramEngineClient(engine, LocalControl(control))
        tasks = await engine.get_supported_tasks()
        app = build_app(ns, tasks, engine.model_config)
        app.middleware_stack = None  # vLLM's bootstrap built it already; rebuilt at start-up with ours
        shares = await shared_prompts(engine, ns.model) if options.kvshare.enabled else None
        cross = await cross_model_front(options, ns.model, ns.served_model_name[0] if ns.served_model_name
                                        else settings.model, shares)
        app.add_middleware(AgentFieldsMiddleware, gate=gate,
                           admit=admit_under_limits(control) if gate is not None else None, shares=shares,
                           cross=cross, lineage_error=control.lineage_error,
                           conversations=conversations_for(options), hint_rules=rules_for(options))
        add_program_routes(app, LocalControl(control))
        if shares is not None:
            add_kvshare_routes(app, engine, cross)
        if settings.turn_times:
            add_turn_time_route(app, engine)
        await init_app_state(client, app.state, ns, tasks)
        ticker = asyncio.create_task(tick_loop(control))
        kvshare_ticker = asyncio.create_task(kvshare_tick_loop(engine)) if shares is not None else None
        log.info("agentserve serving %s on %s, policy %s", ns.served_model_name, listen_address, options.policy)
        try:
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
        finally:
            ticker.cancel()
            if kvshare_ticker is not None:
                kvshare_ticker.cancel()
    try:
        await shutdown
    finally:
        sock.close()
