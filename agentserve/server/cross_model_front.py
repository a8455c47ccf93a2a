"""The served face of cross-model reuse (`agentserve serve --kvshare --cross-model NAME`).

The engine serves the sender (the `--model`); NAME is a fine-tuned variant of one architecture. A
`/v1/completions` body with `"model": NAME` is answered here, on the HuggingFace path of
agentserve/kvshare/cross_reuse.py (why not vLLM: that module's docstring), with the same fields as
any completion: the prompt as `prompt` or as `agentserve.share` parts. When a sender request with
shared parts goes to the engine, the sender's state of its prompt through the last shared part is
prepared in the background; a receiver prompt starting with that prefix reuses it, recomputing the
layer group chosen at start-up (the cheapest on the DroidSpeak Pareto front within `max_kl`, profiled
on the two models, or given). Greedy decoding only; fields this path cannot honour get a 400.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from pathlib import Path

import msgspec

from agentserve.programs.fields import SharedPrompt
from agentserve.server import metrics
from agentserve.server.shared_prompts import ShareError, assemble

log = logging.getLogger("agentserve.kvshare")

DEFAULT_MAX_TOKENS = 16  # as OpenAI's completions API
MAX_TOKENS = 4096
# Body fields the path reads; anything else (stop, logprobs, echo, suffix, ...) is refused by name
# rather than silently ignored.
FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream", "agentserve", "user",
          "seed", "ignore_eos", "cache_salt", "kv_transfer_params"}
PROFILE_PROMPTS = 8  # DroidSpeak: the critical layers of a model pair are stable across inputs


class CrossModelFront:
    def __init__(self, reuse, tokenizer, name: str, vocab_size: int, profile: list | None = None):
        self.reuse = reuse
        self.tokenizer = tokenizer
        self.name = name
        self.vocab_size = vocab_size
        self.profile = profile or []  # the Pareto front measured at start-up (GroupScore), for stats
        self._pending: dict[str, asyncio.Task] = {}

    def wants(self, data: dict) -> bool:
        return data.get("model") == self.name

    def sender_prompt(self, ids: list[int], segments: list[tuple[int, int]], scope: str) -> None:
        """A sender request with shared parts is on its way to the engine: prepare its prefix."""
        from agentserve.kvshare.cross_reuse import prefix_key

        start, length = segments[-1]
        prefix = ids[: start + length]
        key = prefix_key(prefix, scope)  # the store's own key: one preparation in flight per prefix
        if key not in self._pending:
            task = asyncio.create_task(asyncio.to_thread(self.reuse.prepare, prefix, scope))
            self._pending[key] = task
            task.add_done_callback(lambda t, k=key: self._finished(k, t))

    def _finished(self, key: str, task: asyncio.Task) -> None:
        self._pending.pop(key, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("preparing a sender prefix failed", exc_info=task.exception())

    async def complete(self, data: dict, scope: str) -> dict:
        """The OpenAI completion for body `data`; raises ShareError naming a bad field."""
        unknown = sorted(set(data) - FIELDS)
        if unknown:
            raise ShareError(f"the cross-model path does not support {unknown[0]!r}", unknown[0])
        if data.get("stream"):
            raise ShareError("the cross-model path does not stream", "stream")
        if data.get("n", 1) != 1:
            raise ShareError("the cross-model path returns one choice (n=1)", "n")
        if data.get("temperature") not in (None, 0, 0.0) or data.get("top_p") not in (None, 1, 1.0):
            raise ShareError("the cross-model path decodes greedily: temperature must be 0 and top_p 1",
                             "temperature")
        max_tokens = data.get("max_tokens", DEFAULT_MAX_TOKENS)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= MAX_TOKENS:
            raise ShareError(f"max_tokens must be an integer in [1, {MAX_TOKENS}]", "max_tokens")
        ids, boundaries = self._prompt(data)
        if self._pending:  # a sender prefix still being prepared may be this prompt's
            await asyncio.gather(*self._pending.values(), return_exceptions=True)
        got = await asyncio.to_thread(self.reuse.complete, ids, boundaries, max_tokens,
                                      bool(data.get("ignore_eos")), scope)
        metrics.CROSS_MODEL_REQUESTS.labels(got.reason).inc()
        metrics.CROSS_MODEL_TOKENS_REUSED.inc(got.reused_tokens)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": self.name,
            "choices": [{"index": 0, "text": self.tokenizer.decode(got.tokens), "logprobs": None,
                         "finish_reason": "stop" if got.finished_by_eos else "length"}],
            "usage": {"prompt_tokens": got.prompt_tokens, "completion_tokens": len(got.tokens),
                      "total_tokens": got.prompt_tokens + len(got.tokens),
                      "prompt_tokens_details": {"cached_tokens": got.reused_tokens}},
            "agentserve": {"cross_model": {"reason": got.reason, "reused_tokens": got.reused_tokens,
                                           "recomputed_layers": list(self.reuse.group),
                                           "first_token_ms": round(got.first_token_s * 1e3, 3)}},
        }

    def _prompt(self, data: dict) -> tuple[list[int], list[int]]:
        """(token ids, ends of shared parts) from `prompt` or `agentserve.share`."""
        fields = data.get("agentserve") or {}
        share = fields.get("share") if isinstance(fields, dict) else None
        if share is not None:
            try:
                share = msgspec.convert(share, SharedPrompt)
            except msgspec.ValidationError as e:
                raise ShareError(f"invalid agentserve.share: {e}", "agentserve.share") from None
            ids, segments, _ = assemble(data, share, self.tokenizer, self.vocab_size)
            return ids, [start + length for start, length in segments]
        prompt = data.get("prompt")
        if isinstance(prompt, str) and (ids := self.tokenizer.encode(prompt, add_special_tokens=False)):
            return ids, []
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if any(not 0 <= t < self.vocab_size for t in prompt):
                raise ShareError(f"token ids must be in [0, {self.vocab_size})", "prompt")
            return prompt, []
        raise ShareError("prompt must be a non-empty string or list of token ids (or agentserve.share)", "prompt")

    def stats(self) -> dict:
        return {**self.reuse.stats(), "model": self.name,
                "front": [{"group": list(g.group), "layers": g.recomputed, "kl": g.kl} for g in self.profile]}


def parse_group(text: str) -> tuple[int, int]:
    try:
        s, e = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"a layer group is S:E (recompute layers S..E-1), got {text!r}") from None
    return s, e


def profiling_prompts(path: str | None, sender_name: str, receiver_name: str, tokenizer) -> list[list[int]]:
    """The prompts the layer groups are scored on: a JSONL file of {"prompt": text} or
    {"token_ids": [...]}, or, for the built-in kvret pair, seeded samples of its task."""
    if path is not None:
        prompts = []
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompts.append(list(row["token_ids"]) if "token_ids" in row
                               else tokenizer.encode(row["prompt"], add_special_tokens=False))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: want {{\"prompt\": text}} or {{\"token_ids\": [...]}} ({e})") from None
        if not prompts:
            raise ValueError(f"{path}: no profiling prompts")
        return prompts
    if {sender_name, receiver_name} == {"kvret", "kvret-ft"}:
        from agentserve.models import kvret_task as kvret

        rng = random.Random(0)
        out = []
        for _ in range(PROFILE_PROMPTS):
            ep = kvret.episode(rng)
            agent = rng.randrange(len(ep.reports))
            out.append(kvret.flatten(kvret.consumer_parts(ep, agent))
                       + kvret.questions(rng, ep, agent, 1, reverse=0.5)[0].prompt)
        return out
    raise ValueError("--cross-model needs --cross-model-group S:E or --cross-model-profile FILE "
                     "(prompts to choose the layers to recompute on)")


def build_cross_model(sender_dir: str, sender_name: str, receiver: str, *, group: str | None, max_kl: float,
                      profile_path: str | None, max_bytes: int) -> CrossModelFront:
    """Load both models on the HF path, choose the layer group, and return the front."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agentserve.engine.settings import resolve_model
    from agentserve.kvshare.cross_reuse import CrossModelReuse, check_compatible, pick_group
    from agentserve.kvshare.droidspeak import profile_groups

    receiver_dir, receiver_name = resolve_model(receiver)
    load = lambda d: AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()  # noqa: E731
    sender_model, receiver_model = load(sender_dir), load(receiver_dir)
    check_compatible(sender_model.config, receiver_model.config)
    tokenizer = AutoTokenizer.from_pretrained(sender_dir)
    if AutoTokenizer.from_pretrained(str(receiver_dir)).get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"{receiver_name} and {sender_name} tokenize differently: no KV can be shared")
    front = []
    if group is not None:
        chosen = parse_group(group)
    else:
        front = profile_groups(receiver_model, sender_model,
                               profiling_prompts(profile_path, sender_name, receiver_name, tokenizer))
        chosen = pick_group(front, max_kl).group
        log.info("cross-model %s -> %s: Pareto front %s; recomputing layers %s (max KL %s)", sender_name,
                 receiver_name, [(g.group, round(g.kl, 4)) for g in front], chosen, max_kl)
    reuse = CrossModelReuse(sender_model, receiver_model, chosen, max_bytes, eos_token_id=tokenizer.eos_token_id)
    return CrossModelFront(reuse, tokenizer, receiver_name, receiver_model.config.vocab_size, front)
