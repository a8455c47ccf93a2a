"""What the TTL rule decided, in the simulator or on a real server, for the same plan.

    python bench/ttl_decisions.py sim --trace bfcl:base --seed 1 ...       # the `agentserve sim` flags
    python bench/ttl_decisions.py replay --trace bfcl:base --seed 1 ...    # the `agentserve replay` flags

`sim` wraps the rule (`CostBenefitTTL.choose`) and prints its decisions: how many, how many pinned,
where each tool's distribution came from, the gain per turn. `replay` keeps each server's
`/v1/agentserve/stats` and `/metrics` at the end of its run (OUT/server-N.json, OUT/metrics-N.txt) and
prints the TTLs chosen, the tier decisions and the shortest tools as the client measured them.
"""

from __future__ import annotations

import collections
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def simulated(argv: list[str]) -> None:
    from agentserve.cli import main
    from agentserve.ttl import policy

    decisions = []
    choose = policy.CostBenefitTTL.choose

    def logged(self, tool, context_tokens, expected_s=None):
        ttl = choose(self, tool, context_tokens, expected_s)
        decisions.append((self.gain(context_tokens), self.predictor.distribution(tool).source, ttl))
        return ttl

    policy.CostBenefitTTL.choose = logged
    sys.argv = ["agentserve", "sim", *argv]
    main()
    gains = [g for g, _, _ in decisions]
    print(f"TTL decisions: {len(decisions)}, pinned (ttl > 0): {sum(t > 0 for _, _, t in decisions)}; "
          f"distribution from {dict(collections.Counter(s for _, s, _ in decisions))}; "
          f"gain per turn {min(gains):.4f}-{max(gains):.4f} s" if decisions else "no TTL decisions")


def replayed(argv: list[str]) -> None:
    import workloads.replay as replay
    from agentserve.cli import main

    out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else Path("replay-out")
    counters, runs = replay.server_counters, itertools.count()

    def kept(base_url: str) -> dict:
        calls = next(runs)  # the replay reads the counters before and after each run: keep the after
        if calls % 2 == 0:
            return counters(base_url)
        n = calls // 2
        out.mkdir(parents=True, exist_ok=True)
        for route, name in (("/v1/agentserve/stats", f"server-{n}.json"), ("/metrics", f"metrics-{n}.txt")):
            text = replay.http_get(base_url + route)
            if text is not None:
                (out / name).write_text(text)
        return counters(base_url)

    replay.server_counters = kept
    sys.argv = ["agentserve", "replay", *argv]
    main()
    for stats_file in sorted(out.glob("server-*.json")):
        metrics = (out / stats_file.name.replace("server-", "metrics-").replace(".json", ".txt")).read_text()
        lines = [l for l in metrics.splitlines() if l.startswith(("agentserve_ttl_seconds_count",
                 "agentserve_ttl_seconds_sum", "agentserve_tier_decisions_total", 'agentserve_ttl_seconds_bucket{le="0.01"'))]
        tools = json.loads(stats_file.read_text()).get("tools", {})
        shortest = sorted((v["mean_s"], k, v["samples"]) for k, v in tools.items() if v.get("mean_s") is not None)[:3]
        print(stats_file.name, *lines, "shortest tools (mean s, name, samples):", shortest, sep="\n  ")


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("sim", "replay"):
        sys.exit(__doc__)
    {"sim": simulated, "replay": replayed}[sys.argv[1]](sys.argv[2:])
