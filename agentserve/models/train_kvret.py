"""Train the `kvret` model (multi-agent key-value retrieval, agentserve/kvshare/kvret.py) and its
fine-tuned variant `kvret-ft` on this CPU, and write them as HF model directories:

    python -m agentserve.models.train_kvret --out agentserve/models/weights

`kvret` first learns to copy (an induction warm-up: a random word sequence, a random gap, the same
sequence again), then forward lookup (`Q k` -> v) over consumer prompts of five agents. Without the
warm-up the lookup is not learned in this budget: the model settles on "answer some value that is in
the context" (accuracy 1/#facts) and stays there for thousands of steps, because only the answer
tokens carry a signal; copying a repeated sequence supervises every token, and once a content-matching
(induction) circuit exists the lookup takes a hundred steps. The gap must vary, or the warm-up is
solved by a fixed relative position, which does not transfer (both measured). `kvret-ft` starts
from it and is fine-tuned on a mix of forward and reverse lookup (`R v A` -> k), the skill it adds,
so the two share an architecture and a base but not their KV: DroidSpeak's setting. The loss is on
answer tokens only (the reports are random facts: nothing else is predictable).

Weights are stored in float16 (the model is those weights, upcast to float32 at load) so both fit the
repository's 20 MB budget. Seeds are fixed; the committed weights are the output of one run of this
script (about 20 minutes on the 2-core machine, printed at the end); torch's CPU kernels do not
promise bit-identical training across machines, so the weights are committed rather than regenerated.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from agentserve.kvshare import kvret

ARCH = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=6, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0)
QUESTIONS_PER_SEQUENCE = 16  # supervised answers per sequence: the context is the cost, questions are cheap
FILLER = (8, 120)  # filler words per report: prompts of ~150-750 tokens
FACTS = (4, 10)  # facts per report
CURRICULUM = 0.5  # share of the base run over which facts and filler grow to the full task
TOKENS_PER_STEP = 2048
WARMUP_STEPS = 1000  # induction warm-up steps (the copy circuit forms after ~750 on the 2-layer probe)
REPEAT = 48  # words in a warm-up sequence
MAX_GAP = 64  # random words between its two copies


def config():
    from transformers import LlamaConfig

    # tied embeddings: the answer is a token copied from the context, which tying makes easy to learn
    return LlamaConfig(vocab_size=len(kvret.VOCAB), tie_word_embeddings=True, bos_token_id=kvret.ID["<bos>"],
                       eos_token_id=kvret.ID["<eos>"], pad_token_id=kvret.ID["<pad>"], **ARCH)


def sequence(rng: random.Random, reverse: float, filler: tuple[int, int] = FILLER,
             facts: tuple[int, int] = FACTS) -> tuple[list[int], list[int]]:
    """(tokens, labels) of one consumer prompt followed by several questions and their answers."""
    ep = kvret.episode(rng, filler=filler, facts=facts)
    agent = rng.randrange(len(ep.reports))
    tokens = kvret.flatten(kvret.consumer_parts(ep, agent))
    labels = [-100] * len(tokens)
    # drawn with replacement: asking every fact once would let the last answers be found by elimination
    for q in kvret.questions(rng, ep, agent, QUESTIONS_PER_SEQUENCE, reverse, repeat=True):
        tokens += q.prompt + [q.answer]
        labels += [-100] * (len(q.prompt) - 1) + [q.answer, -100]  # labels[i]: the token after position i
    return tokens, labels


def batch(rng: random.Random, reverse: float, grown: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of about TOKENS_PER_STEP tokens; `grown` in [0, 1]: how far the curriculum is (few
    facts and no filler at 0, the full task at 1)."""
    hi = round(grown * FILLER[1])
    filler = (min(FILLER[0], hi), hi)
    facts = (min(FACTS[0], 1 + round(grown * FACTS[1])), max(1, round(2 + grown * (FACTS[1] - 2))))
    seqs, total = [], 0
    while total < TOKENS_PER_STEP:
        seqs.append(sequence(rng, reverse, filler, facts))
        total += len(seqs[-1][0])
    width = max(len(t) for t, _ in seqs)
    pad = kvret.ID["<pad>"]
    x = torch.tensor([t + [pad] * (width - len(t)) for t, _ in seqs])
    y = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in seqs])
    return x, y


def copy_batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Induction warm-up: per row a random sequence of words, keys and values, a gap of random length,
    and the sequence again, whose tokens are supervised."""
    lo, pad, rows = kvret.ID["w0"], kvret.ID["<pad>"], TOKENS_PER_STEP // (2 * REPEAT + MAX_GAP)
    xs, ys = [], []
    for _ in range(rows):
        seq = torch.randint(lo, len(kvret.VOCAB), (REPEAT,), generator=g)
        gap = torch.randint(lo, len(kvret.VOCAB), (int(torch.randint(0, MAX_GAP, (1,), generator=g)),), generator=g)
        x = torch.cat([seq, gap, seq, torch.full((MAX_GAP - len(gap),), pad)])
        y = torch.full_like(x, -100)
        at = REPEAT + len(gap)
        y[at:at + REPEAT - 1] = x[at + 1:at + REPEAT]
        xs.append(x)
        ys.append(y)
    return torch.stack(xs), torch.stack(ys)


def train(model, steps: int, lr: float, reverse: float, seed: int, log: str, curriculum: float = 0.0,
          warmup_copy: int = 0) -> dict:
    """AdamW with warm-up and cosine decay; the first `warmup_copy` steps train copying (copy_batch),
    and with `curriculum`, reports then start short and reach full length after that share of the
    remaining steps."""
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    total = steps
    steps = steps - warmup_copy
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    # constant rate through the copy warm-up, then cosine decay over the task
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(max(0, s - warmup_copy), steps) / steps)))
    model.train()
    start, seen = time.monotonic(), 0.0
    for step in range(-warmup_copy, steps):
        grown = min(1.0, step / (curriculum * steps)) if curriculum and step >= 0 else 1.0
        x, y = copy_batch(g) if step < 0 else batch(rng, reverse, grown)
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        mask = y != -100
        acc = float((logits.argmax(-1)[mask] == y[mask]).float().mean())
        seen = acc if step in (0, -warmup_copy) else 0.95 * seen + 0.05 * acc
        if step % 25 == 0 or step == steps - 1:
            phase = "copy" if step < 0 else "task"
            print(f"[{log}] {phase} step {step + warmup_copy}/{total} loss {loss.item():.3f} answer acc (ema) {seen:.3f} "
                  f"{time.monotonic() - start:.0f}s", flush=True)
    model.eval()
    return {"steps": total, "copy_warmup_steps": warmup_copy, "lr": lr, "reverse_share": reverse, "seconds": round(time.monotonic() - start),
            "final_answer_acc_ema": round(seen, 3), "tokens_per_step": TOKENS_PER_STEP, "curriculum": curriculum}


def accuracy(model, seed: int, n: int, reverse: float) -> float:
    rng, right = random.Random(seed), 0
    with torch.no_grad():
        for _ in range(n):
            ep = kvret.episode(rng, filler=FILLER)
            agent = rng.randrange(len(ep.reports))
            q = kvret.questions(rng, ep, agent, 1, reverse)[0]
            x = torch.tensor([kvret.flatten(kvret.consumer_parts(ep, agent)) + q.prompt])
            right += int(model(input_ids=x).logits[0, -1].argmax()) == q.answer
    return right / n


def save(model, out: Path, meta: dict) -> None:
    from transformers import PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(str(out), safe_serialization=True)
    model.to(torch.float32)
    cfg = json.loads((out / "config.json").read_text())
    cfg["torch_dtype"] = cfg["dtype"] = "float32"  # load (and serve) in float32; stored as float16
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out / "tokenizer.json").write_text(kvret.tokenizer_json())
    tok = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"), bos_token="<bos>",
                                  eos_token="<eos>", pad_token="<pad>", unk_token="<pad>")
    tok.save_pretrained(str(out))
    (out / "training.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> None:
    from transformers import LlamaForCausalLM

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "weights")
    ap.add_argument("--steps", type=int, default=1800, help="base model steps, copy warm-up included")
    ap.add_argument("--copy-steps", type=int, default=WARMUP_STEPS)
    ap.add_argument("--ft-steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config())
    base = train(model, args.steps, 1e-3, reverse=0.0, seed=1, log="kvret", curriculum=CURRICULUM,
                 warmup_copy=args.copy_steps)
    base["eval_forward_acc"] = accuracy(model, seed=10_001, n=200, reverse=0.0)
    print(f"[kvret] held-out forward accuracy {base['eval_forward_acc']:.3f}", flush=True)
    save(model, args.out / "kvret", {"model": "kvret", "arch": ARCH, "filler": FILLER, **base})
    ft = train(model, args.ft_steps, 3e-4, reverse=0.5, seed=2, log="kvret-ft")
    ft["eval_forward_acc"] = accuracy(model, seed=10_001, n=200, reverse=0.0)
    ft["eval_reverse_acc"] = accuracy(model, seed=10_002, n=200, reverse=1.0)
    print(f"[kvret-ft] held-out forward {ft['eval_forward_acc']:.3f} reverse {ft['eval_reverse_acc']:.3f}", flush=True)
    save(model, args.out / "kvret-ft", {"model": "kvret-ft", "from": "kvret", "arch": ARCH, "filler": FILLER, **ft})


if __name__ == "__main__":
    main()
