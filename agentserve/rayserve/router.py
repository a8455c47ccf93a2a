"""Program-affinity request router for the LLM replicas (a Ray Serve `RequestRouter`).

Design: the decision is `ProgramAffinity`'s (agentserve/routing/affinity.py), held by the shared
control plane, not by this router: a program's calls go to the replica that served its previous
call (its pinned KV is there), a new program to the replica with the most free KV after its queue,
and a program whose replica is gone moves (its pins died with the replica). The router extracts the
program id from the request, asks the control plane for a ranking of the live replicas and returns
it one replica per rank, so under backpressure Serve falls back down the ranking (the fallback then
becomes the program's home, and its old pin is released). Compared with Ray's
`ConsistentHashRouter` (stateless hash of a session id, load-blind) this costs one small call per
LLM call, and gains load-aware placement of new programs and one program -> replica map for every
ingress process. Requests without a program are ranked by the same load score.
If the control plane does not answer within `PLACE_TIMEOUT_S` the router degrades to Serve's
default order (candidates as given) rather than stall a request.
"""

from __future__ import annotations

import asyncio
import logging

import ray
from ray.serve._private.request_router.request_router import RequestRouter

from agentserve.programs.fields import XARG_CONVERSATION, XARG_PROGRAM
from agentserve.rayserve.control_plane import NAMESPACE, actor_name

log = logging.getLogger("agentserve.rayserve")

# A placement is a dict lookup on the control plane; a slower answer means it is restarting or
# overloaded, and serving the request on any replica beats waiting for it.
PLACE_TIMEOUT_S = 2.0


def program_of_pending(pending_request) -> str | None:
    """The program id of a routed LLM call: the first argument is the OpenAI request object, whose
    `vllm_xargs` carries the program fields (the ingress moved the `agentserve` object there); a
    conversation's first turn is placed as the program its next turn will be, which then follows it."""
    if pending_request is None or not pending_request.args:
        return None
    xargs = getattr(pending_request.args[0], "vllm_xargs", None)
    program = (xargs.get(XARG_PROGRAM) or xargs.get(XARG_CONVERSATION)) if isinstance(xargs, dict) else None
    return program if isinstance(program, str) else None


class ProgramAffinityRouter(RequestRouter):
    def initialize_state(self, **kwargs) -> None:
        self._control_plane = None

    def _cp(self):
        if self._control_plane is None:
            self._control_plane = ray.get_actor(actor_name(self.app_name), namespace=NAMESPACE)
        return self._control_plane

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        if not candidate_replicas:
            return []
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        try:
            ranked = await asyncio.wait_for(self._cp().place.remote(program_of_pending(pending_request), list(by_id)),
                                            PLACE_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - degrade to Serve's order, never fail the request here
            log.exception("program placement failed; routing without affinity")
            ranked = list(by_id)
        return [[by_id[r]] for r in ranked if r in by_id]

    def on_replica_actor_died(self, replica_id) -> None:
        super().on_replica_actor_died(replica_id)
        try:
            self._cp().replica_gone.remote(replica_id.unique_id)
        except Exception:  # noqa: BLE001 - the control plane also moves programs off absent replicas
            log.exception("could not report replica %s gone", replica_id)
