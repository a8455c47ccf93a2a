"""Scheduler step timing: how much CPU the scheduler itself spends per engine step.

`StepTimed` wraps the three scheduler entry points the engine core calls (`add_request`, `schedule`,
`update_from_output`) with `perf_counter`, plus the whole step (schedule start to
update_from_output end, model execution included), and keeps the samples in the engine-core process; they are
read (and reset) through the `agentserve_step_times` vLLM utility call (engine/utilities.py). `TimedScheduler` is stock vLLM's
scheduler with the timer, `TimedProgramScheduler` agentserve's: the same timer on both sides, so the
overhead of the plugin is measured on one engine build (bench/step_time.py).
"""

from __future__ import annotations

import time

from vllm.v1.core.sched.scheduler import Scheduler

from agentserve.engine import utilities
from agentserve.engine.scheduler import ProgramScheduler
from agentserve.step_shape import StepShape, step_shape

MAX_SAMPLES = 1_000_000  # per series; a benchmark reads them long before this


class StepTimed:
    """Mixin for a vLLM `Scheduler`: record the wall time of each scheduler call (seconds)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.step_times: dict[str, list[float]] = {"add_request": [], "schedule": [], "update_from_output": [],
                                                  "step": []}
        self.step_tokens: list[int] = []  # tokens scheduled by each schedule() call
        self.step_requests: list[int] = []  # requests scheduled by each schedule() call
        # what each step computes, the cost model's terms (agentserve/step_shape.py)
        self.step_shapes: list[StepShape] = []
        self._step_start = 0.0

    def _record(self, name: str, t0: float) -> None:
        samples = self.step_times[name]
        if len(samples) < MAX_SAMPLES:
            samples.append(time.perf_counter() - t0)

    def add_request(self, request) -> None:
        t0 = time.perf_counter()
        super().add_request(request)
        self._record("add_request", t0)

    def schedule(self, *args, **kwargs):
        t0 = self._step_start = time.perf_counter()
        output = super().schedule(*args, **kwargs)
        self._record("schedule", t0)
        if len(self.step_tokens) < MAX_SAMPLES:
            self.step_tokens.append(output.total_num_scheduled_tokens)
            self.step_requests.append(len(output.num_scheduled_tokens))
            self.step_shapes.append(self._shape(output))
        return output

    def _shape(self, output) -> StepShape:
        # after schedule() a request's num_computed_tokens already counts this step's tokens
        return step_shape(self._work(output))

    def _work(self, output):
        for request_id, n in output.num_scheduled_tokens.items():
            request = self.requests.get(request_id)
            if request is None:
                yield 0, n, False
            else:
                yield request.num_computed_tokens - n, n, request.num_output_tokens > 0

    def update_from_output(self, *args, **kwargs):
        t0 = time.perf_counter()
        outputs = super().update_from_output(*args, **kwargs)
        self._record("update_from_output", t0)
        self._record("step", self._step_start)
        return outputs

    def take_step_times(self) -> dict:
        taken = {**self.step_times, "step_tokens": self.step_tokens, "step_requests": self.step_requests,
                 "step_shapes": self.step_shapes}
        self.step_times = {name: [] for name in self.step_times}
        self.step_tokens, self.step_requests, self.step_shapes = [], [], []
        return taken


class TimedScheduler(StepTimed, Scheduler):
    """Stock vLLM scheduling, timed."""


class TimedProgramScheduler(StepTimed, ProgramScheduler):
    """agentserve's scheduler plugin, timed."""


@utilities.register
def agentserve_step_times(core) -> dict:
    if not isinstance(core.scheduler, StepTimed):
        raise RuntimeError("the engine's scheduler is not step-timed (use agentserve.engine.step_timer)")
    return core.scheduler.take_step_times()
