"""Objects named by their import path, "package.module:attribute": how the registries
(agentserve/policies.py, routing/routers.py) name implementations that live in modules they must not
import (the simulator's, Ray Serve's), loaded only when used."""

from __future__ import annotations

import importlib


def resolve(path: str):
    """The object at "package.module:attribute"; ValueError for a malformed path."""
    module, sep, attribute = path.partition(":")
    if not sep or not module or not attribute:
        raise ValueError(f"an import path is 'package.module:attribute', not {path!r}")
    return getattr(importlib.import_module(module), attribute)
