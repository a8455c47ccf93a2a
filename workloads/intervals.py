"""Intervals for a replay's ratios (policy A / policy B) that include run-to-run variance.

Whole runs of a policy move together (the machine's speed drifts; batching diverges from small timing
differences), so an interval from resampling the programs of one run is far too narrow. A bootstrap
sample here draws whole rounds with replacement and, inside each drawn round, programs with
replacement, the same programs for both policies (paired). The spread of the log ratio over those
samples gives a standard error; the interval is the ratio times exp(+-t * se) with Student's t on
rounds - 1 degrees of freedom and the R/(R-1) bias correction, because a plain percentile interval
over few rounds is too narrow (`coverage` measures both on constructed results with round effects).

Speed normalization: each run may carry an engine speed probe (`workloads/probe.py`, seconds for a
fixed batch). A run's LLM time (each turn, sent to done) is scaled by reference / its probe, so a
slow spell of the machine stops counting against the policy that ran in it; tool time is not scaled.
With equal probes the factor is 1 and nothing changes.
"""

from __future__ import annotations

import math
import random
import statistics

import msgspec
import numpy as np

from workloads.driver import ProgramRecord

METRICS = ("jct_mean", "jct_p95", "ttft_p99", "ttft_later_p99", "throughput")
BOOTSTRAP_SAMPLES = 2000
# Student's t, two-sided 95 %, by degrees of freedom 1..30; beyond, its Cornish-Fisher expansion.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t975(df: int) -> float:
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, not {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


class RunSample(msgspec.Struct, frozen=True):
    """One policy's run in one round: per program (by id) its JCT and its turns' TTFTs."""

    jct: dict[str, float]
    ttft: dict[str, list[float]]
    makespan: float
    completed: int


class Interval(msgspec.Struct, frozen=True, kw_only=True):
    """`a`/`b` on `metric`: the ratio on all rounds and its 95 % interval (None with one round)."""

    a: str
    b: str
    metric: str
    ratio: float
    lo: float | None
    hi: float | None
    rounds: int
    normalized: bool = False  # by the engine speed probe

    @property
    def half_width(self) -> float | None:
        """The interval's half width relative to the ratio (0.05: +-5 %)."""
        return None if self.lo is None else (self.hi - self.lo) / (2 * self.ratio)


def run_sample(records: list[ProgramRecord], factor: float = 1.0) -> RunSample:
    """A run's sample, its LLM time scaled by `factor` (reference probe / this run's probe); the
    makespan (throughput) is left as measured: how much of it is LLM time is not known per run."""
    ok = [r for r in records if r.error is None]
    if not records:
        raise ValueError("a run with no programs")
    llm = {r.id: sum(t.done - t.sent for t in r.turns) for r in ok}
    makespan = max(r.end for r in records) - min(r.start for r in records)
    return RunSample(jct={r.id: r.end - r.start - (1 - factor) * llm[r.id] for r in ok},
                     ttft={r.id: [(t.first_token - t.sent) * factor for t in r.turns] for r in ok},
                     makespan=makespan, completed=len(ok))


def speed_factors(probes: dict[str, list[float | None]]) -> dict[str, list[float]] | None:
    """reference / probe for every run (the reference: the median probe of all runs); None unless every
    run was probed."""
    every = [p for runs in probes.values() for p in runs]
    if not every or any(p is None or p <= 0 for p in every):
        return None
    ref = statistics.median(every)
    return {name: [ref / p for p in runs] for name, runs in probes.items()}


class _Aligned:
    """One policy's rounds as arrays over the programs both policies completed, in the same order."""

    def __init__(self, runs: list[RunSample], common: list[list[str]]):
        self.jct = [np.array([r.jct[p] for p in ps]) for r, ps in zip(runs, common)]
        self.ttft = [[np.asarray(r.ttft[p]) for p in ps] for r, ps in zip(runs, common)]
        self.makespan = np.array([r.makespan for r in runs])
        self.completed = np.array([r.completed for r in runs])

    def stats(self, rounds, picks) -> dict[str, float]:
        jct = np.concatenate([self.jct[k][i] for k, i in zip(rounds, picks)])
        ttft = np.concatenate([self.ttft[k][j] for k, i in zip(rounds, picks) for j in i])
        later = np.concatenate([self.ttft[k][j][1:] for k, i in zip(rounds, picks) for j in i])  # not first turns
        return {"jct_mean": float(jct.mean()), "jct_p95": float(np.percentile(jct, 95)),
                "ttft_p99": float(np.percentile(ttft, 99)),
                "ttft_later_p99": float(np.percentile(later, 99)) if later.size else math.nan,
                "throughput": float(self.completed[rounds].sum() / self.makespan[rounds].sum())}


def paired_programs(a: list[RunSample], b: list[RunSample]) -> list[list[str]]:
    """Per round, the programs both policies completed with at least one turn (others are left out)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"want the same number (>= 1) of rounds for both policies, got {len(a)} and {len(b)}")
    common = [sorted({p for p in x.jct if x.ttft.get(p)} & {p for p in y.jct if y.ttft.get(p)})
              for x, y in zip(a, b)]
    if any(not c for c in common):
        raise ValueError("a round where the two policies completed no program in common")
    return common


def ratio_intervals(a: list[RunSample], b: list[RunSample], *, names: tuple[str, str] = ("a", "b"),
                    samples: int = BOOTSTRAP_SAMPLES, seed: int = 0, normalized: bool = False,
                    method: str = "t") -> list[Interval]:
    """a / b on every metric with its interval: round-and-program bootstrap, t on rounds - 1 (method
    "t") or the bootstrap's percentiles (method "percentile", for the coverage study)."""
    if method not in ("t", "percentile"):
        raise ValueError(f"unknown interval method {method!r}: t or percentile")
    common = paired_programs(a, b)
    rounds = len(a)
    xa, xb = _Aligned(a, common), _Aligned(b, common)
    everything = (np.arange(rounds), [np.arange(len(c)) for c in common])
    sa, sb = xa.stats(*everything), xb.stats(*everything)
    point = {m: sa[m] / sb[m] if sb[m] > 0 else math.nan for m in METRICS}
    if rounds < 2:
        return [Interval(a=names[0], b=names[1], metric=m, ratio=point[m], lo=None, hi=None, rounds=1,
                         normalized=normalized) for m in METRICS]
    rng = np.random.default_rng(seed)
    logs = np.empty((samples, len(METRICS)))
    for s in range(samples):
        ks = rng.integers(rounds, size=rounds)
        picks = [rng.integers(len(common[k]), size=len(common[k])) for k in ks]
        da, db = xa.stats(ks, picks), xb.stats(ks, picks)
        with np.errstate(divide="ignore", invalid="ignore"):
            logs[s] = [np.log(da[m] / db[m]) if db[m] > 0 else math.nan for m in METRICS]
    out = []
    for j, m in enumerate(METRICS):
        draws = logs[:, j][np.isfinite(logs[:, j])]
        lo = hi = None
        if point[m] > 0 and len(draws) >= samples // 2:
            if method == "percentile":
                lo, hi = (float(math.exp(q)) for q in np.percentile(draws, [2.5, 97.5]))
            else:
                half = t975(rounds - 1) * float(draws.std(ddof=1)) * math.sqrt(rounds / (rounds - 1))
                lo, hi = point[m] * math.exp(-half), point[m] * math.exp(half)
        out.append(Interval(a=names[0], b=names[1], metric=m, ratio=point[m], lo=lo, hi=hi, rounds=rounds,
                            normalized=normalized))
    return out


def compare(records: dict[str, list[ProgramRecord]], probes: dict[str, list[float | None]],
            pairs: list[tuple[str, str]], *, seed: int = 0) -> list[Interval]:
    """Every pair's ratios with intervals over the rounds of a replay (records carry their round), raw
    and, when every run was probed, speed-normalized."""
    rounds = 1 + max((r.round for rs in records.values() for r in rs), default=0)

    def runs(name: str, factors: list[float] | None) -> list[RunSample]:
        return [run_sample([r for r in records[name] if r.round == k], factors[k] if factors else 1.0)
                for k in range(rounds)]

    factors = speed_factors({name: probes.get(name, [None] * rounds) for name in records})
    out: list[Interval] = []
    for a, b in pairs:
        out += ratio_intervals(runs(a, None), runs(b, None), names=(a, b), seed=seed)
        if factors is not None:
            out += ratio_intervals(runs(a, factors[a]), runs(b, factors[b]), names=(a, b), seed=seed,
                                   normalized=True)
    return out


def synthetic_runs(rounds: int, *, ratio: float, programs: int = 16, run_sd: float = 0.15,
                   program_sd: float = 0.3, noise_sd: float = 0.1, turns: int = 5,
                   rng: random.Random) -> tuple[list[RunSample], list[RunSample]]:
    """Constructed results with round-level effects: every run (policy x round) is slowed or sped up as
    a whole (lognormal, `run_sd`), programs differ from each other (`program_sd`, the same for both
    policies) and each program's run by `noise_sd`. Policy a is `ratio` x policy b in expectation."""
    base = [math.exp(rng.gauss(0, program_sd)) * 60 for _ in range(programs)]

    def run(scale: float) -> RunSample:
        speed = math.exp(rng.gauss(0, run_sd) - run_sd ** 2 / 2)
        jct, ttft = {}, {}
        for i, x in enumerate(base):
            jct[f"p{i}"] = x * scale * speed * math.exp(rng.gauss(0, noise_sd) - noise_sd ** 2 / 2)
            ttft[f"p{i}"] = [jct[f"p{i}"] / 50 * math.exp(rng.gauss(0, 0.5)) for _ in range(turns)]
        return RunSample(jct=jct, ttft=ttft, makespan=sum(base) / programs * 2 * speed * scale,
                         completed=programs)

    a = [run(ratio) for _ in range(rounds)]
    b = [run(1.0) for _ in range(rounds)]
    return a, b


def coverage(rounds: int, *, trials: int = 200, ratio: float = 0.9, method: str = "t", seed: int = 0,
             samples: int = 400, **effects) -> tuple[float, float]:
    """(share of trials whose mean-JCT interval holds the true ratio, mean half width) on constructed
    results with round effects."""
    rng = random.Random(seed)
    hits, widths = 0, []
    for t in range(trials):
        a, b = synthetic_runs(rounds, ratio=ratio, rng=rng, **effects)
        iv = next(i for i in ratio_intervals(a, b, samples=samples, seed=t, method=method) if i.metric == "jct_mean")
        hits += iv.lo <= ratio <= iv.hi
        widths.append(iv.half_width)
    return hits / trials, statistics.fmean(widths)


def main() -> None:
    """The coverage study of docs/benchmarks.md: both interval methods by number of rounds."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--rounds", default="3,5,8,12,20")
    ap.add_argument("--trials", type=int, default=300)
    ap.add_argument("--run-sd", type=float, default=0.15)
    args = ap.parse_args()
    print(f"| rounds | method | coverage of the 95 % interval | mean half width | (run sd {args.run_sd}, "
          f"{args.trials} trials) |\n|---|---|---|---|---|")
    for r in (int(x) for x in args.rounds.split(",")):
        for method in ("percentile", "t"):
            cov, width = coverage(r, trials=args.trials, method=method, run_sd=args.run_sd)
            print(f"| {r} | {method} | {cov:.3f} | {width:.3f} | |")


if __name__ == "__main__":
    main()
