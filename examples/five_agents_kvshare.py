"""Five fully connected agents sharing KV (KVCOMM's setting, on this machine), with the trained `kvret`
model on the HuggingFace path of agentserve.kvshare:

    python examples/five_agents_kvshare.py --rounds 12

Every round, each agent writes a report (its output); then each agent reads the four others' reports
under its own prefix and answers a question about them. The reports are marked as shared parts, so their
KV is computed once, when written, and reused by the four readers with KVCOMM's offset correction; a
reader whose anchors cannot vouch for the reuse prefills in full and leaves an anchor behind. Printed per
round: how many readers reused, their answers' accuracy, and the mean time to first token of the last
agent against a full prefill of the same prompt.
"""

from __future__ import annotations

import argparse
import random
import statistics

import torch

from agentserve.kvshare import kvret
from agentserve.kvshare.parts import Text
from agentserve.kvshare.reuse import SharedPrefill
from agentserve.kvshare.segments import SegmentStore
from agentserve.models.catalog import trained_model_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--agents", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(str(trained_model_dir("kvret")), dtype=torch.float32).eval()
    share = SharedPrefill(model, "kvret", SegmentStore(max_bytes=256 << 20))
    rng = random.Random(args.seed)
    for r in range(args.rounds):
        ep = kvret.episode(rng, agents=args.agents, filler=(80, 120))
        for report in ep.reports:  # each agent writes: its output's KV goes to the segment store once
            share.produce(report)
        reused = correct = 0
        last = {}
        for agent in range(args.agents):
            q = kvret.questions(rng, ep, agent, 1)[0]
            parts = kvret.consumer_parts(ep, agent) + [Text(q.prompt)]
            got = share(parts, template=f"agent{agent}")
            reused += got.reused
            correct += int(got.logits.argmax()) == q.answer
            if agent == args.agents - 1:
                full = share(parts, template=f"agent{agent}", mode="full")
                last = {"ttft_ms": 1e3 * got.ttft_s, "full_ms": 1e3 * full.ttft_s, "reused": got.reused}
        print(f"round {r:2d}: {reused}/{args.agents} readers reused shared KV, {correct}/{args.agents} answers right; "
              f"last agent TTFT {last['ttft_ms']:.1f} ms vs full prefill {last['full_ms']:.1f} ms"
              f"{'' if last['reused'] else ' (prefilled in full: anchors recorded)'}")
    sizes = [len(p) for p in share.pools.values()]
    print(f"anchor pools: {len(sizes)} placeholders, {statistics.mean(sizes):.1f} anchors each; "
          f"segment store {share.store.bytes / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
