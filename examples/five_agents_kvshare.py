"""Five fully connected agents sharing KV (KVCOMM's setting, on this machine) through agentserve's API:

    python examples/five_agents_kvshare.py --rounds 12            # starts `agentserve serve --kvshare`
    python examples/five_agents_kvshare.py --url http://127.0.0.1:8000   # or uses a running one

Every round, each agent writes a report; then each agent reads the four others' reports under its own
prefix and answers a question about them (the trained `kvret` model: agentserve/models/kvret_task.py). The
reports are marked as shared parts (`agentserve.sdk.part(..., shared=True)`), so the server computes
each report's KV once and the four readers reuse it with KVCOMM's offset correction; a reader whose
anchors cannot vouch for the reuse is prefilled in full and leaves anchors behind. Printed per round:
how many readers reused shared KV (from `GET /v1/kvshare/stats`) and how many answered right. With
anchors, reuse starts once a reader's anchor pools hold two anchors at least as long as a new report
(KVCOMM's rule), so the first rounds are prefilled and recorded; `--correction none` reuses from the
second round on (docs/benchmarks.md compares the two).
"""

from __future__ import annotations

import argparse
import random
from contextlib import nullcontext

import httpx

from agentserve.models import kvret_task as kvret
from agentserve.kvshare.parts import Shared
from agentserve.sdk import AgentServe, part


def reused(url: str) -> int:
    return httpx.get(url + "/v1/kvshare/stats").json()["decisions"].get("reused", 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--agents", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--url", default=None, help="a running `agentserve serve --model kvret --kvshare`")
    ap.add_argument("--gate", default="inf", help="--kvshare-gate of the server this starts (default: inf; "
                    "KVCOMM's 0.3 refuses anchors of unrelated contents, which random reports are)")
    ap.add_argument("--correction", default="anchors", choices=["anchors", "none"],
                    help="--kvshare-correction of the server this starts: KVCOMM's anchors, or the RoPE move alone")
    args = ap.parse_args()
    from agentserve.server.process import ServerProcess

    server = nullcontext() if args.url else ServerProcess(
        ["--model", "kvret", "--kv-tokens", "16384", "--max-model-len", "2048", "--kvshare", "--kvshare-gate", args.gate,
         "--kvshare-correction", args.correction])
    with server as srv:
        url = args.url or srv.base_url
        client = AgentServe(url)
        rng = random.Random(args.seed)
        for r in range(args.rounds):
            ep = kvret.episode(rng, agents=args.agents, filler=(80, 120))
            before, right = reused(url), 0
            for agent in range(args.agents):
                q = kvret.questions(rng, ep, agent, 1)[0]
                parts = [part(kvret.words(p.ids), shared=isinstance(p, Shared)) for p in kvret.consumer_parts(ep, agent)]
                with client.program() as prog:
                    out = prog.complete(model="kvret", template=f"agent{agent}", max_tokens=1, temperature=0,
                                        parts=parts + [part(kvret.words(q.prompt))], last=True)
                right += out.choices[0].text.strip() == kvret.VOCAB[q.answer]
            print(f"round {r:2d}: {reused(url) - before}/{args.agents} readers reused shared KV, "
                  f"{right}/{args.agents} answers right")
        stats = httpx.get(url + "/v1/kvshare/stats").json()
        print(f"planner: {stats['decisions']}; {stats['segments']} segments ({stats['segment_bytes'] / 2**20:.1f} MiB), "
              f"{stats['anchors']} anchors, {stats['tokens_reused']} prompt tokens reused")
        client.close()


if __name__ == "__main__":
    main()
