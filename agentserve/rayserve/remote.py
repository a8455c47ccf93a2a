"""`Control` across Ray: the calls of a replica's engine client and of the ingress's program routes,
answered by the app's one control-plane actor (control_plane.py).

A call is sent when it is made and its awaitable is the actor's answer. Route answers come back as
`{"ok": value}` or `{"error": [status, message]}` (an exception crossing Ray loses its type) and are
turned back into the value or a `ProgramError` here, so a client error stays a 4xx on this side too.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import msgspec

from agentserve.programs.fields import ProgramFields
from agentserve.programs.tracker import ProgramError


class RemoteControl:
    def __init__(self, actor=None, replica_id: str = ""):
        self._actor = actor  # None: looked up by the app's name at the first call (the ingress)
        self.replica_id = replica_id  # the replica whose engine client calls (begin_call)

    def _cp(self):
        if self._actor is None:
            import ray
            from ray import serve

            from agentserve.rayserve.control_plane import NAMESPACE, actor_name

            self._actor = ray.get_actor(actor_name(serve.get_replica_context().app_name), namespace=NAMESPACE)
        return self._actor

    def begin_call(self, fields: ProgramFields, prompt_tokens: int, max_tokens: int) -> Awaitable[dict]:
        return self._cp().begin_call.remote(self.replica_id, msgspec.json.encode(fields), prompt_tokens, max_tokens)

    def first_token(self, program_id: str, turn: int, ttft_s: float, prompt_tokens: int,
                    cached_tokens: int | None) -> Awaitable[None]:
        return self._cp().first_token.remote(program_id, turn, ttft_s, prompt_tokens, cached_tokens)

    def end_call(self, program_id: str, context_tokens: int, life: int | None = None) -> Awaitable[None]:
        return self._cp().end_call.remote(program_id, context_tokens, life)

    def abort_call(self, program_id: str, life: int | None = None) -> Awaitable[None]:
        return self._cp().abort_call.remote(program_id, life)

    def tool_event(self, program_id: str, name: str, event: str, duration_s: float | None
                   ) -> Awaitable[float | None]:
        return _unwrap(self._cp().tool_event.remote(program_id, name, event, duration_s))

    def end_program(self, program_id: str) -> Awaitable[None]:
        return _unwrap(self._cp().end_program.remote(program_id))

    def describe(self, program_id: str) -> Awaitable[dict]:
        return _unwrap(self._cp().describe.remote(program_id))

    def stats(self) -> Awaitable[dict]:
        return _unwrap(self._cp().stats.remote())

    def shutdown(self) -> Awaitable[dict]:
        return _unwrap(self._cp().shutdown.remote())

    def metrics_pages(self) -> Awaitable[dict[str, str]]:
        return self._cp().metrics_pages.remote()

    def admit(self, program_id: str, tenant: str, max_programs: int) -> Awaitable[bool]:
        return self._cp().admit.remote(program_id, tenant, max_programs)

    def ready(self) -> Awaitable[bool]:
        """Every configured replica has started once (the ingress's /health)."""
        return self._cp().ready.remote()


async def _unwrap(answer: Awaitable[dict]) -> Any:
    result = await answer
    if "error" in result:
        raise ProgramError(*result["error"])
    return result["ok"]
