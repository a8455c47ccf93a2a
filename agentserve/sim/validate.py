"""A simulated run against a real replay of the same plan: the error per metric and policy, and
whether the simulator ranks the policies as the real engine did.

Both sides are `results.json` files (workloads/report.py), so any replay can be checked: `agentserve
sim ... --compare REAL/results.json`. Error is (sim - real) / real; hit rates, already ratios, are
compared as differences. The ranking is by mean JCT; policies whose real mean JCTs are within
`TIE` of each other count as tied (two real runs of one load at overload differ by up to that), so
only orders the real run resolves are required of the simulator.
"""

from __future__ import annotations

import msgspec

from workloads.report import Results

METRICS = ("jct_mean", "jct_p95", "ttft_p99", "prefix_hit_rate")
TIE = 0.10  # real mean JCTs closer than this (relative) are not ordered: single real runs differ by that


class PolicyError(msgspec.Struct, kw_only=True):
    policy: str
    real: dict[str, float | None]
    sim: dict[str, float | None]
    error: dict[str, float | None]  # relative for times, absolute difference for the hit rate


class Validation(msgspec.Struct, kw_only=True):
    policies: list[PolicyError]
    ranking_real: list[str]
    ranking_sim: list[str]
    discordant: list[tuple[str, str]]  # pairs the real run orders and the simulator orders the other way

    @property
    def same_ranking(self) -> bool:
        return not self.discordant


def _error(metric: str, sim: float | None, real: float | None) -> float | None:
    if sim is None or real is None:
        return None
    if metric == "prefix_hit_rate":
        return sim - real
    return (sim - real) / real if real else None


def compare(sim: Results, real: Results) -> Validation:
    shared = [name for name in real.policies if name in sim.policies]
    if not shared:
        raise ValueError(f"no policy in common: real has {', '.join(real.policies)}, sim {', '.join(sim.policies)}")
    rows = []
    for name in shared:
        s, r = sim.policies[name], real.policies[name]
        values = lambda result: {m: getattr(result, m) for m in METRICS}  # noqa: E731
        rows.append(PolicyError(policy=name, real=values(r), sim=values(s),
                                error={m: _error(m, getattr(s, m), getattr(r, m)) for m in METRICS}))
    jct = lambda result: result.jct_mean if result.jct_mean is not None else float("inf")  # noqa: E731
    discordant = []
    for i, a in enumerate(shared):
        for b in shared[i + 1:]:
            ra, rb = jct(real.policies[a]), jct(real.policies[b])
            if abs(ra - rb) <= TIE * min(ra, rb):
                continue
            if (ra < rb) != (jct(sim.policies[a]) < jct(sim.policies[b])):
                discordant.append((a, b))
    return Validation(policies=rows, ranking_real=sorted(shared, key=lambda n: jct(real.policies[n])),
                      ranking_sim=sorted(shared, key=lambda n: jct(sim.policies[n])), discordant=discordant)


def load(path: str) -> Results:
    with open(path, "rb") as f:
        return msgspec.json.decode(f.read(), type=Results)


def report(v: Validation) -> str:
    """The side-by-side table: real, simulated and error per metric and policy."""
    def fmt(x: float | None, pattern: str) -> str:
        return "-" if x is None else pattern.format(x)

    head = "| policy | " + " | ".join(f"{m} real | sim | error" for m in METRICS) + " |"
    lines = [head, "|---" * (1 + 3 * len(METRICS)) + "|"]
    for p in v.policies:
        cells = []
        for m in METRICS:
            pattern = "{:.2f}" if m != "ttft_p99" else "{:.3f}"
            err = fmt(p.error[m], "{:+.2f}" if m == "prefix_hit_rate" else "{:+.1%}")
            cells.append(f"{fmt(p.real[m], pattern)} | {fmt(p.sim[m], pattern)} | {err}")
        lines.append(f"| {p.policy} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"ranking by mean JCT: real {' < '.join(v.ranking_real)}; sim {' < '.join(v.ranking_sim)}; "
                 + ("the same order" if v.same_ranking else
                    "discordant: " + ", ".join(f"{a}/{b}" for a, b in v.discordant))
                 + f" (real mean JCTs within {TIE:.0%} count as tied)")
    return "\n".join(lines)
