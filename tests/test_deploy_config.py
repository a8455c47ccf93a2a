"""The Serve config file of deploy/ parses into the app's arguments; a wrong key fails, named."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import yaml

from agentserve.rayserve.app import AppArgs, router_config

CONFIG = Path(__file__).parent.parent / "deploy" / "serve_config.yaml"


def test_serve_config_parses_into_app_args():
    app = yaml.safe_load(CONFIG.read_text())["applications"][0]
    assert app["import_path"] == "agentserve.rayserve.app:app_builder" and app["name"] == "agentserve"
    args = msgspec.convert(app["args"], AppArgs)
    assert args.accelerator == "gpu" and args.replicas >= 2 and args.program_options.policy == "agentserve"
    assert args.engine.dtype == "bfloat16"
    with pytest.raises(msgspec.ValidationError, match="replica"):
        msgspec.convert({**app["args"], "replica": 3}, AppArgs)
    with pytest.raises(msgspec.ValidationError, match="pin_mode"):
        msgspec.convert({**app["args"], "program_options": {"pin_mode": "hard"}}, AppArgs)


def test_router_names():
    assert router_config("affinity").request_router_class.endswith("ProgramAffinityRouter")
    assert router_config("prefix").request_router_class.endswith("PrefixCacheAffinityRouter")
    with pytest.raises(ValueError, match="unknown router"):
        router_config("random")
