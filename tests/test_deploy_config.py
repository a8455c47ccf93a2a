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
    assert args.engine.dtype is None  # the accelerator decides (agentserve.options.platform_defaults)
    with pytest.raises(msgspec.ValidationError, match="replica"):
        msgspec.convert({**app["args"], "replica": 3}, AppArgs)
    with pytest.raises(msgspec.ValidationError, match="pin_mode"):
        msgspec.convert({**app["args"], "program_options": {"pin_mode": "hard"}}, AppArgs)


def test_router_names():
    assert router_config("affinity").request_router_class.endswith("ProgramAffinityRouter")
    assert router_config("prefix").request_router_class.endswith("PrefixCacheAffinityRouter")
    with pytest.raises(ValueError, match="unknown router"):
        router_config("random")


def test_the_configs_program_options_are_the_options_modules_defaults():
    """The file documents the defaults a deployment starts from: a value it spells out that differs
    from agentserve.options (it once said max_wait_s 2.0 when the default was 0.5) fails here."""
    from agentserve.options import ProgramOptions

    written = yaml.safe_load(CONFIG.read_text())["applications"][0]["args"]["program_options"]
    defaults = msgspec.to_builtins(ProgramOptions())
    assert written and {k: v for k, v in written.items()} == {k: defaults[k] for k in written}
