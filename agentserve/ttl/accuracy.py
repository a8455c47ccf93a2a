"""How well the tool-duration predictor predicts, replayed online over measured calls: each call is
predicted from the calls before it, then observed, as the server learns while it serves.

Two questions, the two uses of a prediction: the mean (the program's remaining work, its next use)
and P(tool <= tau) (the TTL rule weighs a pin of tau seconds by it). For the mean, the absolute error
per tool against a baseline that ignores the tool (the mean of every call so far). For the
probability, its calibration: calls grouped by the predicted probability, the share whose tool did
end within tau, per tau; the expected calibration error (ECE) and the Brier score summarise it.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from agentserve.ttl.predictor import ToolDurationPredictor

TAUS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)  # seconds: the span of TTLs the rule chooses
BINS = 5  # probability bins of width 0.2


class ToolError(msgspec.Struct):
    tool: str
    calls: int
    predicted: int  # calls with a prediction (the predictor had enough samples)
    mean_s: float  # the calls' own mean duration
    mae_s: float | None  # of the predicted mean, over the predicted calls
    baseline_mae_s: float | None  # of the mean of every earlier call, any tool, over the same calls


class CalibrationBin(msgspec.Struct):
    tau_s: float
    low: float  # predicted P(tool <= tau) in [low, high)
    high: float
    calls: int
    predicted: float  # the mean predicted probability in the bin
    observed: float  # the share of its calls that ended within tau


class Calibration(msgspec.Struct):
    tau_s: float
    calls: int
    brier: float
    ece: float
    bins: list[CalibrationBin]


class Accuracy(msgspec.Struct):
    calls: int
    overall: ToolError
    tools: list[ToolError]
    calibration: list[Calibration]


def evaluate(calls: Iterable[tuple[str | None, float]], predictor: ToolDurationPredictor | None = None,
             taus: tuple[float, ...] = TAUS, bins: int = BINS) -> Accuracy:
    """Predict each (tool, seconds) from the calls before it, then observe it (as a client-measured
    duration)."""
    predictor = predictor or ToolDurationPredictor()
    rows: list[tuple[str, float, float | None, float | None, list[float] | None]] = []
    total, seen = 0.0, 0
    for tool, seconds in calls:
        dist = predictor.distribution(tool)
        mean = dist.mean()
        baseline = total / seen if seen else None
        probs = [dist.cdf(tau) for tau in taus] if len(dist) else None
        rows.append((tool or "*", seconds, mean, baseline, probs))
        predictor.observe(tool, seconds, client_measured=True)
        total, seen = total + seconds, seen + 1
    tools = [_error(name, [r for r in rows if r[0] == name]) for name in sorted({r[0] for r in rows})]
    return Accuracy(calls=len(rows), overall=_error("all", rows), tools=tools,
                    calibration=[_calibration(i, tau, rows, bins) for i, tau in enumerate(taus)])


def _error(name: str, rows: list) -> ToolError:
    predicted = [r for r in rows if r[2] is not None and r[3] is not None]
    mae = sum(abs(r[2] - r[1]) for r in predicted) / len(predicted) if predicted else None
    base = sum(abs(r[3] - r[1]) for r in predicted) / len(predicted) if predicted else None
    return ToolError(tool=name, calls=len(rows), predicted=len(predicted),
                     mean_s=sum(r[1] for r in rows) / len(rows) if rows else 0.0, mae_s=mae, baseline_mae_s=base)


def _calibration(i: int, tau: float, rows: list, bins: int) -> Calibration:
    pairs = [(r[4][i], 1.0 if r[1] <= tau else 0.0) for r in rows if r[4] is not None]
    out = []
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        inside = [(p, o) for p, o in pairs if low <= p < high or (b == bins - 1 and p == 1.0)]
        if inside:
            out.append(CalibrationBin(tau_s=tau, low=low, high=high, calls=len(inside),
                                      predicted=sum(p for p, _ in inside) / len(inside),
                                      observed=sum(o for _, o in inside) / len(inside)))
    n = len(pairs)
    brier = sum((p - o) ** 2 for p, o in pairs) / n if n else 0.0
    ece = sum(b.calls / n * abs(b.predicted - b.observed) for b in out) if n else 0.0
    return Calibration(tau_s=tau, calls=n, brier=brier, ece=ece, bins=out)
