"""agentserve's vLLM utility calls: the one way agentserve adds methods to vLLM's `EngineCore`.

The front end reaches the engine-core process only through vLLM's utility calls
(`engine_core.call_utility_async(NAME, ...)`), which call a method of that name on `EngineCore`.
vLLM has no registry for them, so each plugin module registers its own (`@register`) when it is
imported, which happens in the engine-core process before any call arrives (vLLM imports the
scheduler class and the connectors it is configured with). This module knows none of them. A
utility answers only if the engine runs the plugin it needs, else raises (the caller gets vLLM's
utility error); one whose plugin the engine never imported does not exist there.

- `agentserve_scheduler_command(command, payload)`: pin and program commands (engine/scheduler.py)
- `agentserve_step_times()`: the scheduler's step timings (engine/step_timer.py)
- `agentserve_turn_times()`: each finished request's time in the engine, by part (engine/turn_timer.py)
- `agentserve_kvshare_stats()`: the KV-sharing planner's stats (kvshare/connector.py)
"""

from __future__ import annotations

from collections.abc import Callable

PREFIX = "agentserve_"  # every utility's name starts so: no clash with vLLM's own methods


def register(utility: Callable) -> Callable:
    """Make `utility(core, ...)` the engine core's method of the same name (idempotent)."""
    from vllm.v1.engine.core import EngineCore

    if not utility.__name__.startswith(PREFIX):
        raise ValueError(f"an agentserve utility's name starts with {PREFIX!r}: {utility.__name__!r}")
    setattr(EngineCore, utility.__name__, utility)
    return utility
