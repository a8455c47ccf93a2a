"""The routers: which replica serves a request. One table for the Ray Serve app (`serve --router`)
and the fleet simulator (`sim --router`): each router names its Ray Serve `RequestRouter` and its
simulated counterpart by import path, so this table imports neither Ray nor the simulator. Adding a
router is an entry here and its classes in their own modules.
"""

from __future__ import annotations

import msgspec

from agentserve.qualname import resolve


class Router(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    help: str
    sim: str  # "module:Class" of the simulator's router (built with the run's seed)
    ray: str | None  # "module:Class" of the Ray Serve RequestRouter (None: Serve's default)


TABLE = (
    Router(name="affinity", help="agentserve's program affinity: a program's turns go where its KV is",
           sim="agentserve.sim.routers:AffinityRouter", ray="agentserve.rayserve.router:ProgramAffinityRouter"),
    Router(name="prefix", help="Ray Serve LLM's prefix-aware router: the longest cached prefix",
           sim="agentserve.sim.routers:PrefixRouter", ray="ray.serve.llm.request_router:PrefixCacheAffinityRouter"),
    Router(name="pow2", help="Ray Serve's default: the shorter queue of two replicas drawn at random",
           sim="agentserve.sim.routers:Pow2Router", ray=None),
)
ROUTERS = {r.name: r for r in TABLE}
DEFAULT_ROUTER = "affinity"


def get(name: str) -> Router:
    router = ROUTERS.get(name)
    if router is None:
        raise ValueError(f"unknown router {name!r}; choose one of {', '.join(ROUTERS)}")
    return router


def sim_router(name: str, seed: int = 0):
    """The simulator's router `name`."""
    return resolve(get(name).sim)(seed)


def ray_router_class(name: str):
    """The Ray Serve RequestRouter class of router `name` (None: Serve's default)."""
    router = get(name)
    return resolve(router.ray) if router.ray is not None else None
