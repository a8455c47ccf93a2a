"""A Ray Serve LLM application whose vLLM replicas run agentserve's scheduler plugin.

Built on `ray.serve.llm` (`LLMConfig` + `build_openai_app`), not beside it: the same EngineSettings
that start the embedded engine are translated to the `engine_kwargs` of every replica (the fields of
vLLM's `AsyncEngineArgs` that differ from vLLM's defaults, so nothing is hand-copied), and the
replicas are `ProgramLLMServer`s (replica.py), which add the pin control call to Ray's `LLMServer`.
Still to come (issue 5): the program-affinity request router, the shared control plane, the program
routes on the ingress, `agentserve serve --replicas N`.
"""

from __future__ import annotations

import dataclasses

from agentserve.engine.settings import EngineSettings, engine_args

# Ray Serve LLM sets these itself from LLMConfig (model_loading_config).
_SET_BY_RAY = ("model", "served_model_name")


def engine_kwargs(settings: EngineSettings) -> tuple[str, dict]:
    """(model source directory, engine_kwargs) for `ray.serve.llm.LLMConfig`."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    args = engine_args(settings)
    default = AsyncEngineArgs()
    kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(AsyncEngineArgs)
              if f.name not in _SET_BY_RAY and getattr(args, f.name) != getattr(default, f.name)}
    return args.model, kwargs


def llm_config(settings: EngineSettings, *, model_id: str, replicas: int = 1, accelerator: str = "cpu"):
    from ray.serve.llm import LLMConfig

    from agentserve.rayserve.replica import ProgramLLMServer

    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    source, kwargs = engine_kwargs(settings)
    return LLMConfig(model_loading_config={"model_id": model_id, "model_source": source},
                     accelerator_config={"kind": accelerator},
                     deployment_config={"autoscaling_config": {"min_replicas": replicas,
                                                               "max_replicas": replicas}},
                     engine_kwargs=kwargs, server_cls=ProgramLLMServer)


def build_app(settings: EngineSettings, *, model_id: str, replicas: int = 1, accelerator: str = "cpu"):
    """The Serve application (OpenAI ingress + LLM replicas); run it with `serve.run(app)`."""
    from ray.serve.llm import build_openai_app

    return build_openai_app({"llm_configs": [llm_config(settings, model_id=model_id, replicas=replicas,
                                                        accelerator=accelerator)]})
