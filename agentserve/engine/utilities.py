"""agentserve's vLLM utility calls: the one place agentserve adds methods to vLLM's `EngineCore`.

The front end reaches the engine-core process only through vLLM's utility calls
(`engine_core.call_utility_async(NAME, ...)`), which call a method of that name on `EngineCore`.
vLLM has no registry for them, so `install()` sets these methods on the class. It is called when a
plugin module is imported (the scheduler plugin, the KV-sharing connector), which happens in the
engine-core process before any call arrives, and is idempotent. Each method answers only if the engine
runs the plugin it needs, else raises (the caller gets vLLM's utility error).

- `agentserve_scheduler_command(command, payload)`: pin and program commands (engine/scheduler.py)
- `agentserve_step_times()`: the scheduler's step timings (engine/step_timer.py)
- `agentserve_turn_times()`: each finished request's time in the engine, by part (engine/turn_timer.py)
- `agentserve_kvshare_stats()`: the KV-sharing planner's stats (kvshare/connector.py)
"""

from __future__ import annotations


def agentserve_scheduler_command(core, command: str, payload: dict) -> dict:
    from agentserve.engine.scheduler import ProgramScheduler

    if not isinstance(core.scheduler, ProgramScheduler):
        raise RuntimeError("the engine does not run agentserve's ProgramScheduler")
    return core.scheduler.command(command, payload)


def agentserve_step_times(core) -> dict:
    from agentserve.engine.step_timer import StepTimed

    if not isinstance(core.scheduler, StepTimed):
        raise RuntimeError("the engine's scheduler is not step-timed (use agentserve.engine.step_timer)")
    return core.scheduler.take_step_times()


def agentserve_turn_times(core) -> list[dict]:
    from agentserve.engine.turn_timer import TurnTimed

    if not isinstance(core.scheduler, TurnTimed):
        raise RuntimeError("the engine's scheduler does not time turns (serve with --turn-times)")
    return core.scheduler.take_turn_times()


def agentserve_kvshare_stats(core) -> dict:
    from agentserve.kvshare.connector import KVShareConnector

    connector = getattr(core.scheduler, "connector", None)
    # alone, or next to the host tier's connector inside vLLM's MultiConnector
    for c in getattr(connector, "_connectors", None) or [connector]:
        if isinstance(c, KVShareConnector):
            return c.stats()
    raise RuntimeError("the engine does not run agentserve's KVShareConnector")


UTILITIES = (agentserve_scheduler_command, agentserve_step_times, agentserve_turn_times, agentserve_kvshare_stats)


def install() -> None:
    from vllm.v1.engine.core import EngineCore

    for utility in UTILITIES:
        setattr(EngineCore, utility.__name__, utility)
