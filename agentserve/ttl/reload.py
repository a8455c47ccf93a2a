"""Reload cost: how long re-prefilling a context of n tokens takes on the running engine.

A quadratic fit t(n) = a + b n + c n^2 (attention makes prefill superlinear in n), measured at server
start-up on the engine that will serve (`measure_reload_profile`), never hard-coded: the TTL policy
weighs exactly this against the time a pin holds memory.
"""

from __future__ import annotations

import msgspec


class ReloadProfile(msgspec.Struct, frozen=True):
    a: float
    b: float
    c: float
    max_tokens: int  # largest context measured; the fit is extrapolated beyond it
    points: list[tuple[int, float]] = []

    def seconds(self, tokens: int) -> float:
        n = max(0, tokens)
        return max(0.0, self.a + self.b * n + self.c * n * n)

    @classmethod
    def fit(cls, points: list[tuple[int, float]]) -> "ReloadProfile":
        """Least-squares fit through (tokens, seconds); c and b are clamped to >= 0."""
        if len(points) < 3:
            raise ValueError(f"a reload profile needs >= 3 measured points, got {len(points)}")
        import numpy as np

        n = np.array([p[0] for p in points], dtype=float)
        t = np.array([p[1] for p in points], dtype=float)
        a, b, c = np.linalg.lstsq(np.stack([np.ones_like(n), n, n * n], 1), t, rcond=None)[0]
        if c < 0:  # noise at small sizes: fall back to a line
            c = 0.0
            a, b = np.linalg.lstsq(np.stack([np.ones_like(n), n], 1), t, rcond=None)[0]
        return cls(a=float(a), b=max(0.0, float(b)), c=float(c), max_tokens=int(n.max()),
                   points=[(int(x), float(y)) for x, y in points])
