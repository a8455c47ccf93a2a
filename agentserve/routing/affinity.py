"""Program-affinity routing policy: which replica serves a request. Plain Python, no Ray; the Ray
Serve `RequestRouter` adapter feeds it replica stats and asks it for a ranking.

Design: KV pins are replica-local, so every turn of a program goes to the replica that served its
previous turn (its KV is there); a new program, or one whose replica is gone, goes to the replica
with the most free KV after its queue is accounted for. The trade-off against Ray's
`ConsistentHashRouter` (deterministic, stateless, load-blind) is state: the program -> replica map
lives in the router, so routers in different processes must share it or agree by construction; in
exchange new programs follow load instead of a hash. Requests without a program are spread by the
same load score. Stats arrive late (replicas report every few seconds), so programs placed since
the last report count against their replica until the next one.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import msgspec

# One request in a replica's queue is worth this share of its KV budget when comparing replicas:
# a queued turn will claim KV soon (an agent turn holds a few % of a small replica's KV).
QUEUE_WEIGHT = 0.05
# Programs remembered at most (least recently routed forgotten first): the map must not grow with
# every program a long-running router has seen; a forgotten program is placed again by load.
MAX_PROGRAMS = 100_000


class ReplicaLoad(msgspec.Struct, frozen=True):
    """What a replica reports (its routing stats)."""

    replica_id: str
    free_kv_blocks: int
    total_kv_blocks: int
    queue_len: int  # requests waiting + running

    @property
    def free_share(self) -> float:
        return self.free_kv_blocks / self.total_kv_blocks if self.total_kv_blocks > 0 else 0.0


class Placement(msgspec.Struct, frozen=True):
    ranked: list[str]  # replica ids, best first; later ones are fallbacks under backpressure
    moved_from: str | None = None  # the program's previous replica, gone: its pins died with it
    # why the first replica: home (the program's KV is there), new (a new program, by load), moved (its
    # replica is gone: by load), unnamed (a request of no program, by load), none (no replica can take it)
    decision: str = "none"


class ProgramAffinity:
    def __init__(self, queue_weight: float = QUEUE_WEIGHT, max_programs: int = MAX_PROGRAMS):
        if queue_weight < 0 or max_programs < 1:
            raise ValueError("queue_weight must be >= 0 and max_programs >= 1")
        self.queue_weight = queue_weight
        self.max_programs = max_programs
        self.home: OrderedDict[str, str] = OrderedDict()  # program -> replica, least recent first
        self.loads: dict[str, ReplicaLoad] = {}
        self.placed_since_report: dict[str, int] = {}

    # ---- inputs ----------------------------------------------------------------------------
    def report(self, loads: Iterable[ReplicaLoad]) -> None:
        """Fresh stats for some replicas: their own queue now includes what was placed on them."""
        for load in loads:
            self.loads[load.replica_id] = load
            self.placed_since_report.pop(load.replica_id, None)

    def replica_gone(self, replica_id: str) -> list[str]:
        """A replica died or was removed: forget it; returns the programs that lived there (they move
        on their next request, and their pins are gone with the replica)."""
        self.loads.pop(replica_id, None)
        self.placed_since_report.pop(replica_id, None)
        return [p for p, r in self.home.items() if r == replica_id]

    def served(self, program_id: str, replica_id: str) -> str | None:
        """A request of the program is running on `replica_id` (whatever ranked it there: a fallback
        under backpressure, another router): that replica is its home now. Returns the previous home
        if it was another replica (the pin there is of no use any more)."""
        previous = self.home.get(program_id)
        self.home[program_id] = replica_id
        self.home.move_to_end(program_id)
        while len(self.home) > self.max_programs:
            self.home.popitem(last=False)
        return previous if previous not in (None, replica_id) else None

    def end(self, program_id: str) -> None:
        self.home.pop(program_id, None)

    # ---- decision --------------------------------------------------------------------------
    def place(self, program_id: str | None, candidates: Iterable[str]) -> Placement:
        """Rank `candidates` (the replicas that can take requests now) for a request of `program_id`."""
        alive = list(dict.fromkeys(candidates))
        if not alive:
            return Placement([])
        by_load = sorted(alive, key=self._score, reverse=True)
        if program_id is None:
            self._count(by_load[0])
            return Placement(by_load, decision="unnamed")
        home = self.home.get(program_id)
        if home in alive:
            self.home.move_to_end(program_id)
            return Placement([home] + [r for r in by_load if r != home], decision="home")
        self.served(program_id, by_load[0])
        self._count(by_load[0])
        return Placement(by_load, moved_from=home, decision="new" if home is None else "moved")

    def _count(self, replica_id: str) -> None:
        self.placed_since_report[replica_id] = self.placed_since_report.get(replica_id, 0) + 1

    def _score(self, replica_id: str) -> tuple[float, str]:
        load = self.loads.get(replica_id)
        queued = self.placed_since_report.get(replica_id, 0) + (load.queue_len if load else 0)
        free = load.free_share if load else 1.0  # no report yet: a fresh replica, assume empty
        return free - self.queue_weight * queued, replica_id  # the id breaks ties deterministically
