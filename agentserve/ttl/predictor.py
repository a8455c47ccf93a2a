"""Tool-call duration prediction: a per-tool empirical distribution over a sliding window.

Sources, best first: durations the client measured and reported (`program.tool(...)` in the SDK, or
`POST /v1/programs/{id}/tool`), then server-side gaps (previous turn's finish to next turn's arrival,
which also count the harness's own time, as Continuum's demo does). A tool with client samples uses
only those. A tool with fewer than `min_samples` of its own falls back to the global distribution
(all tools), and with too few of those too, to "unknown" (the policy's default applies).
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

# Window per tool: long enough for a stable CDF, short enough to follow a workload that changes.
WINDOW = 512
# Continuum uses K=100 before trusting a distribution; with short traces here 100 would never be
# reached per tool, so 20 per tool and 20 overall (the CDF's step is then at most 5 %).
MIN_SAMPLES = 20
GLOBAL_KEY = "*"


@dataclass
class _Samples:
    window: int
    values: deque = field(default_factory=deque)
    sorted_values: list = field(default_factory=list)

    def add(self, v: float) -> None:
        if len(self.values) == self.window:
            old = self.values.popleft()
            del self.sorted_values[bisect.bisect_left(self.sorted_values, old)]
        self.values.append(v)
        bisect.insort(self.sorted_values, v)

    def __len__(self) -> int:
        return len(self.values)


class Distribution:
    """An empirical distribution: CDF and support, from a sorted sample list (read-only view)."""

    def __init__(self, sorted_values: list[float], source: str):
        self.values = sorted_values
        self.source = source  # "client", "gap", "global" or "none"

    def __len__(self) -> int:
        return len(self.values)

    @property
    def own(self) -> bool:
        """Learned from this tool's own calls (not the global fallback, not empty)."""
        return self.source in ("client", "gap")

    def cdf(self, t: float) -> float:
        return bisect.bisect_right(self.values, t) / len(self.values) if self.values else 0.0

    def mean(self) -> float | None:
        return sum(self.values) / len(self.values) if self.values else None

    def quantile(self, q: float) -> float | None:
        return self.values[min(len(self.values) - 1, int(q * len(self.values)))] if self.values else None


class ToolDurationPredictor:
    def __init__(self, window: int = WINDOW, min_samples: int = MIN_SAMPLES):
        if window < 1 or min_samples < 1:
            raise ValueError("window and min_samples must be >= 1")
        self.window = window
        self.min_samples = min_samples
        self._client: dict[str, _Samples] = {}
        self._gap: dict[str, _Samples] = {}
        self._global = _Samples(window * 4)

    def observe(self, tool: str | None, duration_s: float, *, client_measured: bool) -> None:
        if not duration_s >= 0:  # also refuses NaN
            raise ValueError(f"tool duration must be >= 0 s, got {duration_s}")
        name = tool or GLOBAL_KEY
        table = self._client if client_measured else self._gap
        if not client_measured and name in self._client:
            return  # the client's own measurements of this tool are better; ignore gaps
        table.setdefault(name, _Samples(self.window)).add(duration_s)
        if client_measured:
            self._gap.pop(name, None)
        self._global.add(duration_s)

    def distribution(self, tool: str | None) -> Distribution:
        name = tool or GLOBAL_KEY
        for table, source in ((self._client, "client"), (self._gap, "gap")):
            s = table.get(name)
            if s is not None and len(s) >= self.min_samples:
                return Distribution(s.sorted_values, source)
        if len(self._global) >= self.min_samples:
            return Distribution(self._global.sorted_values, "global")
        return Distribution([], "none")

    def predict_mean(self, tool: str | None) -> float | None:
        return self.distribution(tool).mean()

    def trusts(self, tool: str | None, expected_s: float | None, *, told: bool) -> bool:
        """Whether a caller's estimate of this call's tool beats the tool's history: the client's word
        (`told`: a hint for this very call) always; a guess (a join's sub-agents' expected length) only
        where the tool has no history of its own."""
        return expected_s is not None and (told or (bool(expected_s) and not self.distribution(tool).own))

    def tools(self) -> list[str]:
        return sorted(set(self._client) | set(self._gap))

    def summary(self) -> dict[str, dict]:
        """Per tool: samples held (client-measured or gaps), their mean, and what predictions use."""
        out = {}
        for name in self.tools():
            s = self._client.get(name) or self._gap[name]
            d = self.distribution(name)
            out[name] = {"samples": len(s), "measured_by": "client" if name in self._client else "gap",
                         "mean_s": sum(s.values) / len(s), "predicts_from": d.source}
        return out
