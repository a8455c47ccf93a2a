"""The OpenAI ingress of the Ray Serve app: Ray Serve LLM's `OpenAiIngress` plus agentserve's
program layer, so the Ray path speaks the embedded server's wire contract.

- the `agentserve` body object is moved into `vllm_xargs` (400 naming a bad field) by the embedded
  server's `AgentFieldsMiddleware`; the program routes are the embedded server's, answered by the
  shared control plane;
- every LLM response names the replica that served it in `x-agentserve-replica` (the replica's
  `ReplicaTag`, stripped from the stream);
- with tenants, the embedded server's tenant gate: API keys, program ids scoped by tenant, the
  tenant's cache salt (one secret for every ingress replica: the app builder makes it) and its
  program limit, which the control plane answers;
- `/metrics` merges the Prometheus pages of the ingress, the control plane and every replica
  (observability/exposition.py);
- a call whose replica dies before it produced anything is sent again, and the router places it on
  a live replica (`REPLICA_RETRIES`). A stream cut after its first chunk cannot be resumed
  transparently (another replica would generate different tokens): it ends with an OpenAI error
  event (the openai client raises `APIError`), and the client retries the call (the replay driver does).
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS, OpenAiIngress, init, make_fastapi_ingress

from agentserve.observability.exposition import merge, this_process
from agentserve.programs.continuity import Conversations
from agentserve.programs.hints import HintRules
from agentserve.rayserve.replica import ReplicaTag
from agentserve.rayserve.remote import RemoteControl
from agentserve.server.middleware import AgentFieldsMiddleware, error_response
from agentserve.server.program_routes import add_program_routes
from agentserve.server.tenants import TenantGate

log = logging.getLogger("agentserve.rayserve")

REPLICA_HEADER = "x-agentserve-replica"
# A call is resent this many times when its replica dies first; one retry suffices for one failed
# replica, the second covers a replica dying while the first retry is routed.
REPLICA_RETRIES = 2
_REPLICA_GONE = (RayActorError, ActorUnavailableError)
REPLICA_DIED_MID_STREAM = {"message": "the replica serving this stream died; send the request again", "type": "ServiceUnavailable",
                           "param": None, "code": 503}


class ProgramIngress(OpenAiIngress):
    async def _get_response(self, *, body, call_method: str, raw_request=None):
        for attempt in range(REPLICA_RETRIES + 1):
            started = False
            try:
                async for item in super()._get_response(body=body, call_method=call_method,
                                                        raw_request=raw_request):
                    if isinstance(item, ReplicaTag):
                        if raw_request is not None:
                            raw_request.state.agentserve_replica = item.replica_id
                        continue
                    started = True
                    yield item
                return
            except _REPLICA_GONE as e:
                if started:  # mid-stream: tell the client in the stream (an OpenAI error event), not by silence
                    log.warning("replica died mid-stream (%s)", type(e).__name__)
                    yield f"data: {json.dumps({'error': REPLICA_DIED_MID_STREAM})}\n\n"
                    return
                if attempt == REPLICA_RETRIES:
                    raise
                log.warning("replica died before answering (%s); resending the call", type(e).__name__)

    async def _process_llm_request(self, body, call_method: str, raw_request=None):
        response = await super()._process_llm_request(body, call_method, raw_request)
        replica = getattr(raw_request.state, "agentserve_replica", None) if raw_request is not None else None
        if replica is not None:
            response.headers[REPLICA_HEADER] = replica
        return response


def remote_admit(control: RemoteControl):
    """`admit(tenant, program_id)` for the middleware, answered by the control plane (awaited)."""

    def admit(tenant, program_id: str):
        return control.admit(program_id, tenant.name, tenant.max_programs)

    return admit


def program_ingress_cls(gate: TenantGate | None = None, conversations: Conversations | None = None,
                        hint_rules: HintRules | None = None):
    """`ProgramIngress` as a Serve ingress class: vLLM-compatible OpenAI routes + program routes,
    behind the tenant gate if there is one; `conversations`: the index that names the programs of
    conversations that name none (each ingress replica holds its own); `hint_rules`: what the servers do
    with request hints (programs/hints.py)."""
    app: FastAPI = init()
    programs = RemoteControl()
    app.add_middleware(AgentFieldsMiddleware, gate=gate, admit=remote_admit(programs) if gate is not None else None,
                       conversations=conversations, hint_rules=hint_rules)
    add_program_routes(app, programs, record_metrics=False)

    @app.get("/metrics")
    async def metrics():
        """Every process's metrics on one page, each series labelled with its process (`replica`)."""
        pages = await programs.metrics_pages()
        return PlainTextResponse(merge({"ingress": this_process(), **pages}), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health():
        """200 once every configured replica has started (Serve routes to the ingress earlier)."""
        if await programs.ready():
            return {}
        return error_response(503, "replicas are starting")

    return make_fastapi_ingress(ProgramIngress, endpoint_map=DEFAULT_ENDPOINTS, app=app)
