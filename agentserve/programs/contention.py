"""Contention: whether the engine is thrashing, the signal that switches working-set admission on.

Admission costs a held program its wait, so it should act only where sharing the device among every
live program loses KV. Two signals the engine has at run time, both needed to switch on:

- **demand beyond capacity**: the KV the live programs need (admitted, paused and held ones, as the
  gate counts it: running programs on the device, those in a tool call on the host tier first)
  exceeds the gate's limit: more live programs than the device holds;
- **re-needed KV lost**: of the context a returning turn had before (its program's context when its
  last turn ended), the share not found cached anywhere (device or host tier) when it was scheduled,
  over the last `window` returning turns: blocks evicted and then needed again, which is what hits
  collapsing looks like from inside one program.

The first alone is a forecast (footprints are estimates); the second alone can be a program whose
context outgrew the device by itself, which no admission fixes. Once on, it stays on until the demand
fits again (`off_share` of the limit): with programs held, KV stops being lost, so the loss signal
would switch it off and the thrashing back on.
"""

from __future__ import annotations

from collections import deque

DEFAULT_WINDOW = 32  # returning turns the loss share is taken over
DEFAULT_LOSS_ON = 0.2  # share of re-needed context lost that says the engine thrashes
DEFAULT_OFF_SHARE = 0.9  # demand below this share of the limit switches it off
MIN_TURNS = 8  # returning turns seen before the loss share says anything (fewer if the window is smaller)


class Contention:
    def __init__(self, *, window: int = DEFAULT_WINDOW, loss_on: float = DEFAULT_LOSS_ON,
                 off_share: float = DEFAULT_OFF_SHARE):
        if window < 1 or not 0 < loss_on <= 1 or not 0 < off_share <= 1:
            raise ValueError("contention needs a window >= 1, a loss share in (0, 1] and an off share in (0, 1]")
        self._turns: deque[tuple[int, int]] = deque(maxlen=window)  # (re-needed tokens, lost tokens)
        self.loss_on = loss_on
        self.off_share = off_share
        self.on = False
        self.switches = 0

    def returned(self, needed_tokens: int, cached_tokens: int) -> None:
        """A returning turn was scheduled: `needed_tokens` of its program's earlier context, of which
        `cached_tokens` were found cached (device or host)."""
        if needed_tokens > 0:
            self._turns.append((needed_tokens, max(0, needed_tokens - cached_tokens)))

    @property
    def loss(self) -> float:
        """Share of re-needed context lost over the window (0 before any returning turn)."""
        needed = sum(n for n, _ in self._turns)
        return sum(lost for _, lost in self._turns) / needed if needed else 0.0

    def update(self, demand: int, limit: int) -> bool:
        """Whether the engine is contended now, given the live programs' `demand` and the gate's `limit`."""
        if not self.on and demand > limit and len(self._turns) >= min(MIN_TURNS, self._turns.maxlen) \
                and self.loss >= self.loss_on:
            self.on, self.switches = True, self.switches + 1
        elif self.on and demand <= limit * self.off_share:
            self.on, self.switches = False, self.switches + 1
            self._turns.clear()  # what was lost while contended says nothing about the load after
        return self.on
