"""The turn ledger (engine/turn_ledger.py) fed from vLLM's scheduler: each request's time in the engine
split into queue, load-back, prefill, recompute, decode and between steps, from the scheduler's own
states, read (and reset) through the `agentserve_turn_times` utility call (`serve --turn-times`:
`GET /v1/agentserve/turn_times`).

`TurnTimedScheduler` is stock vLLM's scheduler with the ledger, `TurnTimedProgramScheduler` agentserve's
plugin with it: the same instrument on both sides of a comparison. Each is built as its async variant
when vLLM turns async scheduling on; there one step is scheduled before the previous one's output is
applied, so a request keeps its part while a step that scheduled it is in flight, and the parts'
boundaries lie one step ahead of the model (their sum still holds).
"""

from __future__ import annotations

import time
from collections import deque

import msgspec
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from agentserve.engine import utilities
from agentserve.engine.scheduler import AsyncVariant, ProgramScheduler, program_of_request
from agentserve.engine.turn_ledger import TurnLedger


def waiting_part(request: Request) -> str:
    return "load_back" if request.status == RequestStatus.WAITING_FOR_REMOTE_KVS else "queue"


class TurnTimed:
    """Mixin for a vLLM `Scheduler`: every request's parts in a `TurnLedger`."""

    turn_clock = staticmethod(time.monotonic)  # tests set a fake clock on the instance

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.turns = TurnLedger(lambda: self.turn_clock())
        self._in_flight: deque[tuple[object, frozenset[str]]] = deque()  # (scheduled output, its requests)

    def add_request(self, request: Request) -> None:
        super().add_request(request)
        self.turns.arrive(request.request_id, program_of_request(request), request.num_prompt_tokens)

    def schedule(self, *args, **kwargs):
        start = self.turn_clock()
        output = super().schedule(*args, **kwargs)
        scheduled = output.num_scheduled_tokens
        busy = self._busy()
        for request_id in list(self.turns.open):
            request = self.requests.get(request_id)
            if request is None:
                continue
            n = scheduled.get(request_id)
            if n is not None:  # vLLM has already counted this step's tokens as computed
                after = request.num_computed_tokens
                self.turns.scheduled(request_id, after - n, after,
                                     request.num_output_tokens + request.num_output_placeholders > 0, start)
            elif request_id not in busy:
                self.turns.enter(request_id, waiting_part(request), start)
        self._in_flight.append((output, frozenset(scheduled)))
        return output

    def update_from_output(self, scheduler_output, *args, **kwargs):
        outputs = super().update_from_output(scheduler_output, *args, **kwargs)
        self._in_flight = deque(entry for entry in self._in_flight if entry[0] is not scheduler_output)
        now, busy = self.turn_clock(), self._busy()
        for request_id in list(self.turns.open):
            request = self.requests.get(request_id)
            if request is not None and request_id not in busy:
                self.turns.enter(request_id, "between_steps" if request.status == RequestStatus.RUNNING
                                 else waiting_part(request), now)
        return outputs

    def _busy(self) -> frozenset[str]:
        """Requests in a step that is scheduled and not yet applied (async scheduling only)."""
        return frozenset().union(*(ids for _, ids in self._in_flight))

    def _free_request(self, request: Request, delay_free_blocks: bool = False):
        out = super()._free_request(request, delay_free_blocks)
        self.turns.finish(request.request_id, request.num_output_tokens, request.num_preemptions,
                          aborted=request.status == RequestStatus.FINISHED_ABORTED)
        return out

    def take_turn_times(self) -> list[dict]:
        return msgspec.to_builtins(self.turns.take())


class TurnTimedScheduler(TurnTimed, AsyncVariant, Scheduler):
    """Stock vLLM scheduling, its turns timed."""


class AsyncTurnTimedScheduler(TurnTimedScheduler, AsyncScheduler):
    pass


class TurnTimedProgramScheduler(TurnTimed, ProgramScheduler):
    """agentserve's scheduler plugin, its turns timed."""


class AsyncTurnTimedProgramScheduler(TurnTimedProgramScheduler, AsyncScheduler):
    pass


TurnTimedScheduler.async_variant = AsyncTurnTimedScheduler
TurnTimedProgramScheduler.async_variant = AsyncTurnTimedProgramScheduler


@utilities.register
def agentserve_turn_times(core) -> list[dict]:
    if not isinstance(core.scheduler, TurnTimed):
        raise RuntimeError("the engine's scheduler does not time turns (serve with --turn-times)")
    return core.scheduler.take_turn_times()
