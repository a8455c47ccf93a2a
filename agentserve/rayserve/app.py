"""The Ray Serve application: an OpenAI ingress, LLM replicas running vLLM with agentserve's scheduler
plugin, one program control plane, and the program-affinity request router in front of the replicas.

Built on `ray.serve.llm` (`LLMConfig`, `LLMServer`, `OpenAiIngress`, `build_llm_deployment`), not
beside it: the same EngineSettings that start the embedded engine are translated to the
`engine_kwargs` of every replica (the fields of vLLM's `AsyncEngineArgs` that differ from vLLM's
defaults, so nothing is hand-copied), and the program options are the embedded server's.

    ingress (ProgramIngress) --router--> ProgramLLMServer x N   (each: vLLM + ProgramScheduler)
          \\___________________  ClusterControlPlane  ___________/   (tracker, predictor, TTL, homes)

`router="prefix"` swaps in Ray Serve LLM's own `PrefixCacheAffinityRouter` (the benchmark's baseline);
everything else stays the same.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading

import msgspec

from agentserve.engine.settings import EngineSettings, vllm_namespace
from agentserve.engine.settings import engine_settings_for
from agentserve.options import ProgramOptions
from agentserve.policies import POLICIES
from agentserve.routing.routers import DEFAULT_ROUTER, ray_router_class
from agentserve.server.tenants import TenantGate

# Ray Serve LLM sets these itself (model_loading_config, the Serve HTTP proxy).
_SET_BY_RAY = ("model", "served_model_name", "host", "port")
APP_NAME = "agentserve"
# Logical CPUs for a local Ray cluster: Serve schedules by logical CPUs, and a replica's placement
# group asks for 2; on a 2-core machine the ingress would never be placed with the real count.
LOCAL_CPUS_PER_REPLICA = 2
LOCAL_CPUS_SPARE = 4  # ingress, control plane, proxy, controller

log = logging.getLogger("agentserve.rayserve")


def engine_kwargs(settings: EngineSettings) -> tuple[str, dict]:
    """(model source directory, engine_kwargs) for `ray.serve.llm.LLMConfig`: the engine and frontend
    arguments (e.g. cached-token details in usage) the embedded server would use."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import FrontendArgs

    ns = vllm_namespace(settings)
    args = AsyncEngineArgs.from_cli_args(ns)
    kwargs = _differing(args, AsyncEngineArgs())
    kwargs.update(_differing(ns, FrontendArgs()))
    return args.model, kwargs


def _differing(values, default) -> dict:
    return {f.name: getattr(values, f.name) for f in dataclasses.fields(default)
            if f.name not in _SET_BY_RAY and hasattr(values, f.name)
            and getattr(values, f.name) != getattr(default, f.name)}


def router_config(router: str):
    from ray.serve.config import RequestRouterConfig

    cls = ray_router_class(router)
    return RequestRouterConfig() if cls is None else RequestRouterConfig(request_router_class=cls)


def check_cluster_options(options: ProgramOptions) -> None:
    """Refuse, before anything starts, what the Ray Serve app does not serve."""
    if options.kvshare.enabled:
        raise ValueError("KV sharing (kvshare) is not served on Ray Serve: each replica would hold its own segment "
                         "store, and a shared part's produce request would have to reach every replica that "
                         "serves its consumers; serve it with `agentserve serve --kvshare` (one engine)")


def llm_config(settings: EngineSettings, *, model_id: str, replicas: int = 1, accelerator: str = "cpu",
               router: str = DEFAULT_ROUTER):
    from ray.serve.llm import LLMConfig

    from agentserve.rayserve.replica import ProgramLLMServer

    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    source, kwargs = engine_kwargs(settings)
    return LLMConfig(model_loading_config={"model_id": model_id, "model_source": source},
                     accelerator_config={"kind": accelerator},
                     deployment_config={"autoscaling_config": {"min_replicas": replicas,
                                                               "max_replicas": replicas},
                                        "request_router_config": router_config(router)},
                     engine_kwargs=kwargs, server_cls=ProgramLLMServer,
                     # vLLM's own Prometheus logger in each replica (Ray's would export to Ray's
                     # metrics agent instead): the replicas send its page to the ingress's /metrics
                     log_engine_metrics=False)


def build_app(settings: EngineSettings, *, model_id: str, options: ProgramOptions | None = None,
              replicas: int = 1, accelerator: str = "cpu", router: str = DEFAULT_ROUTER):
    """The Serve application; run it with `serve.run(app, name=APP_NAME)`."""
    from ray import serve
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray.llm._internal.serve.core.server.builder import build_llm_deployment

    from agentserve.rayserve.control_plane import ControlPlaneDeployment
    from agentserve.rayserve.ingress import ProgramIngress, program_ingress_cls
    from agentserve.programs.continuity import conversations_for
    from agentserve.programs.hints import rules_for

    options = options or ProgramOptions()
    check_cluster_options(options)
    if options.host.kv_tokens is None:  # on Ray Serve the host tier is opt-in (each replica's own pool)
        options = msgspec.structs.replace(options, host=msgspec.structs.replace(options.host, kv_tokens=0))
    config = llm_config(engine_settings_for(settings, options, device=accelerator), model_id=model_id, replicas=replicas,
                        accelerator=accelerator, router=router)
    control_plane = serve.deployment(ControlPlaneDeployment, name="ClusterControlPlane", num_replicas=1,
                                     ray_actor_options={"num_cpus": 0}).bind(msgspec.to_builtins(options), replicas, model_id)
    llm = build_llm_deployment(config, bind_kwargs={
        "control_plane": control_plane, "measure_reload": POLICIES[options.policy].reload_profile,
        "pins": POLICIES[options.policy].plugin})
    # one gate (so one cache-salt secret) for every ingress replica
    gate = TenantGate(options.tenants) if options.tenants is not None else None
    ingress = serve.deployment(program_ingress_cls(gate, conversations_for(options), rules_for(options)),
                               **ProgramIngress.get_deployment_options([config]))
    return ingress.bind(llm_deployments={model_id: llm}, model_cards={model_id: to_model_metadata(model_id, config)})



def run(settings: EngineSettings, *, options: ProgramOptions, replicas: int, router: str = DEFAULT_ROUTER,
        host: str = "127.0.0.1", port: int = 8000, model_id: str | None = None) -> None:
    """`agentserve serve --replicas N`: deploy the app on Ray (RAY_ADDRESS, else a local cluster) and
    serve until SIGINT/SIGTERM; on the way out every pin is released and the app deleted."""
    import ray
    from ray import serve

    if "RAY_ADDRESS" in os.environ:
        ray.init()
    else:
        ray.init(num_cpus=max(8, LOCAL_CPUS_PER_REPLICA * replicas + LOCAL_CPUS_SPARE), include_dashboard=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        name = model_id or settings.served_model_name or os.path.basename(settings.model.rstrip("/"))
        serve.run(build_app(settings, model_id=name, options=options, replicas=replicas, router=router),
                  name=APP_NAME, route_prefix="/")
        log.info("agentserve on Ray Serve: %d replica(s) of %s, router %s, policy %s, http://%s:%d",
                 replicas, name, router, options.policy, host, port)
        stop.wait()
    finally:
        release_all_pins()
        serve.shutdown()
        ray.shutdown()


def release_all_pins(timeout_s: float = 5.0) -> None:
    """Graceful shutdown: the control plane queues a release of every pin; replicas pull it."""
    import ray

    from agentserve.rayserve.control_plane import NAMESPACE, SYNC_S, actor_name

    try:
        cp = ray.get_actor(actor_name(APP_NAME), namespace=NAMESPACE)
        ray.get(cp.shutdown.remote(), timeout=timeout_s)
        ray.get(cp.stats.remote(), timeout=timeout_s)
    except Exception:  # noqa: BLE001 - never block shutdown on it; the replicas' engines end with it
        log.warning("could not release pins before shutdown", exc_info=True)
        return
    import time

    time.sleep(3 * SYNC_S)  # replicas pull the release


class AppArgs(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The `args` of a Serve config file's application (deploy/serve_config.yaml)."""

    engine: EngineSettings
    program_options: ProgramOptions = msgspec.field(default_factory=ProgramOptions)
    replicas: int = 1
    router: str = DEFAULT_ROUTER
    accelerator: str = "gpu"
    model_id: str | None = None  # default: the engine's model name


def app_builder(args: dict):
    """Serve config entry point: `import_path: agentserve.rayserve.app:app_builder` (`serve deploy`,
    `serve run`). Unknown or mistyped keys fail the deploy with the key named."""
    a = msgspec.convert(args, AppArgs)
    name = a.model_id or a.engine.served_model_name or os.path.basename(a.engine.model.rstrip("/"))
    return build_app(a.engine, model_id=name, options=a.program_options, replicas=a.replicas,
                     accelerator=a.accelerator, router=a.router)
