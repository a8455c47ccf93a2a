"""Which simulated replica serves a request: the routers a fleet operator chooses between (named in
agentserve/routing/routers.py, each built with the run's seed).

- `affinity`: agentserve's `ProgramAffinity` itself (routing/affinity.py), fed each replica's load
  before every decision (on Ray Serve it is fed every 0.2 s: fresher here);
- `prefix`: like Ray Serve LLM's prefix-aware router, the replica holding the longest cached prefix
  of the prompt, ties (and no match) to the shorter queue;
- `pow2`: Ray Serve's default, the shorter queue of two replicas drawn at random (seeded).
"""

from __future__ import annotations

import random

from agentserve.routing.affinity import ProgramAffinity, ReplicaLoad
from agentserve.sim.engine import SimEngine, SimRequest

class AffinityRouter:
    def __init__(self, seed: int = 0):
        self.affinity = ProgramAffinity()

    def pick(self, request: SimRequest, engines: list[SimEngine]) -> SimEngine:
        self.affinity.report(ReplicaLoad(e.name, e.pool.num_free(), e.pool.num_blocks, e.queued()) for e in engines)
        ranked = self.affinity.place(request.program, [e.name for e in engines]).ranked
        chosen = next(e for e in engines if e.name == ranked[0])
        if request.program is not None:
            self.affinity.served(request.program, chosen.name)
        return chosen

    def end(self, program: str) -> None:
        self.affinity.end(program)


class PrefixRouter:
    def __init__(self, seed: int = 0):
        return

    def pick(self, request: SimRequest, engines: list[SimEngine]) -> SimEngine:
        n = request.total // request.stream.block_size
        return max(engines, key=lambda e: (e.pool.cached_prefix(request.stream.iter_keys(n)), -e.queued(), e.name))

    def end(self, program: str) -> None:
        return


class Pow2Router:
    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    def pick(self, request: SimRequest, engines: list[SimEngine]) -> SimEngine:
        two = self.rng.sample(engines, min(2, len(engines)))
        return min(two, key=lambda e: (e.queued(), e.name))

    def end(self, program: str) -> None:
        return
