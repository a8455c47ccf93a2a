"""KV sharing quality and speed on the trained retrieval models (docs/benchmarks.md, "KV sharing").

    python bench/kvshare.py --episodes 60 --out bench-out/kvshare.json

KVCOMM (across agents, model `kvret`): five fully connected agents; every agent's prompt holds its own
prefix and the four others' reports (shared segments) and ends with a question whose answer is in one
of them. Each prompt is answered three ways from the same segment store: full prefill, naive reuse
(segments' standalone KV moved by RoPE only) and anchors (KVCOMM's offset correction, full prefill and a
new anchor when the pool refuses). Reported per way: task accuracy, greedy-token agreement with full
prefill, next-token KL to full prefill, reuse rate, TTFT split into preparation and forward, and TTFT
relative to full prefill measured on the same prompt in the same run.

DroidSpeak (across models, sender `kvret`, receiver its fine-tuned variant `kvret-ft`): the receiver
answers forward and reverse questions over a context the sender prefilled. Layer groups are profiled
on a separate profiling set (Pareto front); for every group on the front the receiver's accuracy and
its context-prefill time relative to its own full prefill are measured on the evaluation set.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from agentserve.models import kvret_task as kvret
from agentserve.kvshare.droidspeak import profile_groups, recompute
from agentserve.kvshare.hf import prefill
from agentserve.kvshare.parts import Text, flatten
from agentserve.kvshare.reuse import SharedPrefill, decode
from agentserve.kvshare.segments import SegmentStore
from agentserve.models.catalog import trained_model_dir

GREEDY_TOKENS = 4  # the answer and what the model writes after it (its guess of a next question: `Q k v`)


def load(name: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(trained_model_dir(name)), dtype=torch.float32).eval()


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    p, q = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    return float((p.exp() * (p - q)).sum())


def kvcomm(model, episodes: int, seed: int, filler: tuple[int, int], warmup: int, temperature: float,
           entropy_gamma: float) -> dict:
    sp = SharedPrefill(model, "kvret", SegmentStore(1 << 30), temperature=temperature, entropy_gamma=entropy_gamma)
    rng = random.Random(seed)
    rows = []
    for e in range(episodes):
        ep = kvret.episode(rng, filler=filler)
        for report in ep.reports:  # each agent's output, as it is produced
            sp.produce(report)
        for agent in range(len(ep.reports)):
            q = kvret.questions(rng, ep, agent, 1)[0]
            parts = kvret.consumer_parts(ep, agent) + [Text(q.prompt)]
            n = len(flatten(parts))
            ways = {mode: sp(parts, f"agent{agent}", mode) for mode in ("full", "naive", "anchors")}
            ref = ways["full"]
            ref_top1 = [float(torch.softmax(ref.logits.double(), -1).max())]
            ref_tokens = decode(model, ref.kv, int(ref.logits.argmax()), n, GREEDY_TOKENS, ref_top1)
            for mode, got in ways.items():
                tokens = ref_tokens if mode == "full" else decode(model, got.kv, int(got.logits.argmax()), n,
                                                                   GREEDY_TOKENS)
                rows.append({"episode": e, "agent": agent, "mode": mode, "tokens": n, "reused": got.reused,
                             "correct": int(got.logits.argmax()) == q.answer,
                             "agree": sum(a == b for a, b in zip(tokens, ref_tokens)) / GREEDY_TOKENS,
                             # per position: the same greedy token, on the same greedy path so far
                             "agree_at": [int(tokens[:i + 1] == ref_tokens[:i + 1]) for i in range(GREEDY_TOKENS)],
                             "ref_top1": ref_top1,
                             "kl": kl(ref.logits, got.logits), "prepare_s": got.prepare_s,
                             "forward_s": got.forward_s, "full_ttft_s": ref.ttft_s})
    return {"rows": rows, "summary": {scope: summarize(rows, scope, warmup) for scope in ("all", "last", "steady")}}


def summarize(rows: list[dict], scope: str, warmup: int) -> dict:
    """scope: every consumer (`all`), the last of the five agents (`last`), or every consumer after
    `warmup` episodes (`steady`: anchor pools filled)."""
    agents = max(r["agent"] for r in rows) + 1
    pick = {"all": lambda r: True, "last": lambda r: r["agent"] == agents - 1,
            "steady": lambda r: r["episode"] >= warmup}[scope]
    out = {}
    for mode in ("full", "naive", "anchors"):
        rs = [r for r in rows if r["mode"] == mode and pick(r)]
        reused = [r for r in rs if r["reused"]]
        out[mode] = {
            "prompts": len(rs),
            "mean_tokens": round(statistics.mean(r["tokens"] for r in rs)),
            "accuracy": statistics.mean(r["correct"] for r in rs),
            "greedy_agreement": statistics.mean(r["agree"] for r in rs),
            "greedy_prefix_agreement_at": [statistics.mean(r["agree_at"][i] for r in rs) for i in range(GREEDY_TOKENS)],
            "reference_top1_prob_at": [statistics.mean(r["ref_top1"][i] for r in rs) for i in range(GREEDY_TOKENS)],
            "next_token_kl": statistics.mean(r["kl"] for r in rs),
            "reuse_rate": len(reused) / len(rs),
            "ttft_ms_median": 1e3 * statistics.median(r["prepare_s"] + r["forward_s"] for r in rs),
            "prepare_ms_median": 1e3 * statistics.median(r["prepare_s"] for r in rs),
            "forward_ms_median": 1e3 * statistics.median(r["forward_s"] for r in rs),
            # per prompt: this way's TTFT over full prefill's TTFT on the same prompt, then the median
            "ttft_vs_full_median": statistics.median((r["prepare_s"] + r["forward_s"]) / r["full_ttft_s"] for r in rs),
            "ttft_vs_full_when_reused": (statistics.median((r["prepare_s"] + r["forward_s"]) / r["full_ttft_s"]
                                                           for r in reused) if reused else None),
        }
    return out


def droidspeak(sender, receiver, episodes: int, profile_prompts: int, seed: int, filler: tuple[int, int]) -> dict:
    rng = random.Random(seed)

    def sample(n):
        out = []
        for _ in range(n):
            ep = kvret.episode(rng, filler=filler)
            agent = rng.randrange(len(ep.reports))
            context = kvret.flatten(kvret.consumer_parts(ep, agent))
            out.append((context, kvret.questions(rng, ep, agent, 2, reverse=0.5)))
        return out

    profiling = sample(profile_prompts)
    front = profile_groups(receiver, sender, [c + qs[0].prompt for c, qs in profiling])
    evaluation = sample(episodes)
    results = []
    for score in front:
        right = total = 0
        ratios = []
        for context, qs in evaluation:
            t0 = time.perf_counter()
            own = prefill(receiver, context)
            t_full = time.perf_counter() - t0
            sender_kv, sender_hidden = prefill(sender, context, hidden=True)
            t0 = time.perf_counter()
            kv = recompute(receiver, sender_kv, sender_hidden, score.group, context)
            ratios.append((time.perf_counter() - t0) / t_full)
            for q in qs:
                total += 1
                right += answer(receiver, kv, context, q) == q.answer
        results.append({"group": list(score.group), "recomputed_layers": score.recomputed,
                        "profile_kl": score.kl, "accuracy": right / total,
                        "prefill_vs_full_median": statistics.median(ratios)})
    full = sum(answer(receiver, prefill(receiver, c), c, q) == q.answer for c, qs in evaluation for q in qs)
    sender_alone = sum(answer(sender, prefill(sender, c), c, q) == q.answer for c, qs in evaluation for q in qs)
    n = sum(len(qs) for _, qs in evaluation)
    return {"receiver_full_accuracy": full / n, "sender_accuracy": sender_alone / n, "questions": n,
            "layers": len(receiver.model.layers), "front": results}


def answer(model, kv: torch.Tensor, context: list[int], q: kvret.Question) -> int:
    from agentserve.kvshare.reuse import forward_over

    n = len(context)
    _, logits = forward_over(model, q.prompt, range(n, n + len(q.prompt)), kv, range(n))
    return int(logits.argmax())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--episodes", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10, help="episodes before the steady-state scope")
    ap.add_argument("--filler", default="80,120", help="filler words per report, min,max")
    ap.add_argument("--temperature", type=float, default=1.0, help="anchor softmax temperature")
    ap.add_argument("--entropy-gamma", type=float, default=0.3,
                    help="KVCOMM's reuse gate: refuse when the anchor weights' entropy > gamma * log2(anchors); "
                    "inf = always reuse once a placeholder has 2 anchors (default: KVCOMM's 0.3)")
    ap.add_argument("--ds-episodes", type=int, default=100)
    ap.add_argument("--ds-profile", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench-out/kvshare.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    filler = tuple(int(x) for x in args.filler.split(","))
    base, variant = load("kvret"), load("kvret-ft")
    result = {"args": vars(args) | {"out": str(args.out)}}
    if args.episodes:
        result["kvcomm"] = kvcomm(base, args.episodes, args.seed, filler, args.warmup, args.temperature,
                                  args.entropy_gamma)
        print(json.dumps(result["kvcomm"]["summary"], indent=1))
    if args.ds_episodes:
        result["droidspeak"] = droidspeak(base, variant, args.ds_episodes, args.ds_profile, args.seed + 1, filler)
        print(json.dumps(result["droidspeak"], indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
