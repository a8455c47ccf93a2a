"""Cross-model reuse in the served path (DroidSpeak): `agentserve serve --model kvret --kvshare
--cross-model kvret-ft`, driven over HTTP like any client (docs/benchmarks.md, "KV sharing").

    python bench/cross_model_served.py --episodes 40 --out bench-out/cross_model_served.json

Per episode an agent's context (its prefix and the four other agents' reports, marked shared) is sent
once to the served model `kvret` (the sender, on the vLLM engine) with a question of its own; then the
variant `kvret-ft` answers two questions over the same context (forward `Q k` or reverse `R v`, half
each), twice: with the context as shared parts (the server reuses the sender's KV, recomputing the
layer group it profiled at start-up) and as a plain token prompt (no sender prefix: the variant's full
prefill on the same path). Reported: accuracy of both, answer agreement, the time to the first token
the server measured (prefill incl. the recompute) and the request's wall time, reused over full.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import httpx


def answer(body: dict) -> int:
    """The answer token of a completion (-1 when it is no word of the task)."""
    from agentserve.models import kvret_task as kvret

    words = body["choices"][0]["text"].split()
    try:
        return kvret.ids(words[:1])[0] if words else -1
    except ValueError:
        return -1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--group", default=None, metavar="S:E", help="pass --cross-model-group (default: profiled)")
    ap.add_argument("--max-kl", type=float, default=0.05)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from agentserve.models import kvret_task as kvret
    from agentserve.kvshare.parts import Shared, flatten
    from agentserve.server.process import ServerProcess

    serve = ["--model", "kvret", "--kv-tokens", "8192", "--max-model-len", "2048", "--kvshare",
             "--kvshare-correction", "none", "--cross-model", "kvret-ft", "--cross-model-max-kl", str(args.max_kl)]
    if args.group:
        serve += ["--cross-model-group", args.group]
    rows = []
    with ServerProcess(serve) as srv, httpx.Client(base_url=srv.base_url, timeout=120) as http:
        rng = random.Random(args.seed)

        def complete(body: dict) -> tuple[dict, float]:
            t0 = time.perf_counter()
            r = http.post("/v1/completions", json={"max_tokens": 1, "temperature": 0, **body})
            if r.status_code != 200:
                raise SystemExit(f"{r.status_code} for {body.get('model')}: {r.text}")
            return r.json(), time.perf_counter() - t0

        for _ in range(args.episodes):
            ep = kvret.episode(rng)
            agent = rng.randrange(len(ep.reports))
            context = kvret.consumer_parts(ep, agent)
            parts = [{"token_ids": p.ids, "shared": isinstance(p, Shared)} for p in context]
            own, *asked = kvret.questions(rng, ep, agent, 3, reverse=0.5)
            complete({"model": "kvret", "prompt": "",
                      "agentserve": {"share": {"template": f"agent{agent}", "parts": parts + [{"token_ids": own.prompt}]}}})
            for q in asked:
                shared, wall_shared = complete({"model": "kvret-ft", "prompt": "", "agentserve": {"share": {
                    "template": f"agent{agent}", "parts": parts + [{"token_ids": q.prompt}]}}})
                full, wall_full = complete({"model": "kvret-ft", "prompt": flatten(context) + q.prompt})
                s, f = shared["agentserve"]["cross_model"], full["agentserve"]["cross_model"]
                a_shared, a_full = answer(shared), answer(full)
                rows.append({"reverse": q.prompt[0] == kvret.ID["R"], "reason": s["reason"], "agree": a_shared == a_full,
                             "right_shared": a_shared == q.answer, "right_full": a_full == q.answer,
                             "first_token_ratio": s["first_token_ms"] / f["first_token_ms"],
                             "wall_ratio": wall_shared / wall_full, "first_token_ms_full": f["first_token_ms"]})
        stats = http.get("/v1/kvshare/stats").json()["cross_model"]
    n = len(rows)
    result = {
        "questions": n, "group": stats["group"], "front": stats["front"],
        "reuse_rate": sum(r["reason"] == "reused" for r in rows) / n,
        "accuracy_shared": sum(r["right_shared"] for r in rows) / n,
        "accuracy_full": sum(r["right_full"] for r in rows) / n,
        "answer_agreement": sum(r["agree"] for r in rows) / n,
        "first_token_ratio_median": statistics.median(r["first_token_ratio"] for r in rows),
        "wall_ratio_median": statistics.median(r["wall_ratio"] for r in rows),
        "first_token_ms_full_median": statistics.median(r["first_token_ms_full"] for r in rows),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"result": result, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
