"""Cross-model KV reuse in the served path (DroidSpeak): a receiver model fine-tuned from a sender's
base reuses the sender's KV of a prompt prefix, recomputing one contiguous layer group (droidspeak.py).

Why this runs on HuggingFace copies of both models and not in vLLM: two steps have no place in vLLM's
KV connector API. (1) The group's input is the sender's residual stream at layer s (the "E cache");
a connector sees each layer's KV, never hidden states. (2) The receiver must run layers [s, e) for
the reused tokens and load the sender's KV for the other layers; a vLLM token is either scheduled
(every layer runs) or external (no layer runs). So a request for the receiver model that names a
sender's prefix is served here, behind the same `/v1/completions` API (server/cross_model_front.py); the
receiver's own question tokens and the decode run here too (the cache they extend lives here).

Store: per sender prefix (keyed by token content, the sender's prompt through its last shared part),
the sender's KV and its hidden state at the group's input (none for a group starting at layer 0:
the receiver embeds the tokens itself). Bounded by bytes, least recently used out first.
Lookup: the longest stored prefix among the receiver prompt's shared-part ends; none -> the receiver
prefills in full (counted as `no_sender_prefix`), never a wrong answer.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from agentserve.kvshare.droidspeak import GroupScore, reuse_and_prefill
from agentserve.kvshare.hf import prefill
from agentserve.kvshare.reuse import decode, forward_over

# Config fields two models must agree on for one's KV to mean anything in the other.
SAME_ARCHITECTURE = ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "vocab_size", "rope_theta", "rope_scaling")


def check_compatible(sender_config, receiver_config) -> None:
    """Raise ValueError naming the first field where the two architectures differ."""
    for name in SAME_ARCHITECTURE:
        a, b = getattr(sender_config, name, None), getattr(receiver_config, name, None)
        if a != b:
            raise ValueError(f"cross-model reuse needs one architecture: {name} is {a!r} in the sender, "
                             f"{b!r} in the receiver")


def pick_group(front: Sequence[GroupScore], max_kl: float) -> GroupScore:
    """The cheapest group on the Pareto front within the quality bound (the last one, recompute
    everything, always qualifies: its KL is 0)."""
    for score in front:  # cheapest first
        if score.kl <= max_kl:
            return score
    return front[-1]


def prefix_key(tokens: Sequence[int], scope: str = "") -> str:
    """Content key of a prefix within a scope (a tenant: one tenant's prefixes never serve another)."""
    digest = hashlib.sha256(scope.encode() + b"\0")
    digest.update(torch.tensor(list(tokens), dtype=torch.int64).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class SenderPrefix:
    kv: torch.Tensor  # [layers, 2, heads, n, head_dim]
    hidden: torch.Tensor | None  # [layers + 1, n, d] or None (the group starts at layer 0)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.kv, self.hidden) if t is not None)


@dataclass(frozen=True)
class CrossCompletion:
    tokens: list[int]
    prompt_tokens: int
    reused_tokens: int  # the sender prefix's length (0: full prefill by the receiver)
    reason: str  # "reused" or "no_sender_prefix"
    first_token_s: float  # the prefill (reuse, the group's recompute, the rest of the prompt) to the first token
    finished_by_eos: bool


class CrossModelReuse:
    def __init__(self, sender, receiver, group: tuple[int, int], max_bytes: int, eos_token_id: int | None = None):
        check_compatible(sender.config, receiver.config)
        layers = receiver.config.num_hidden_layers
        s, e = group
        if not (0 <= s <= e <= layers):
            raise ValueError(f"layer group {group} outside [0, {layers}]")
        if max_bytes <= 0:
            raise ValueError("max_bytes must be > 0")
        self.sender, self.receiver, self.group = sender, receiver, (s, e)
        self.max_bytes, self.bytes = max_bytes, 0
        self.eos_token_id = eos_token_id
        self._prefixes: OrderedDict[str, SenderPrefix] = OrderedDict()
        self._lock = threading.Lock()  # one forward pass at a time; callers run in threads
        self.counters: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._prefixes)

    # ---- sender side -------------------------------------------------------------------------
    def prepare(self, prefix: Sequence[int], scope: str = "") -> bool:
        """Keep the sender's state of `prefix` (idempotent); False if it alone exceeds the budget."""
        key = prefix_key(prefix, scope)
        with self._lock:
            if key in self._prefixes:
                self._prefixes.move_to_end(key)
                return True
            kv, hidden = prefill(self.sender, prefix, hidden=True)
            state = SenderPrefix(kv, hidden[: self.group[0] + 1].clone() if self.group[0] > 0 else None)
            if state.nbytes > self.max_bytes:
                self.counters["prefix_too_large"] += 1
                return False
            while self.bytes + state.nbytes > self.max_bytes:
                _, old = self._prefixes.popitem(last=False)
                self.bytes -= old.nbytes
                self.counters["prefixes_evicted"] += 1
            self._prefixes[key] = state
            self.bytes += state.nbytes
            self.counters["prefixes_prepared"] += 1
            return True

    # ---- receiver side -----------------------------------------------------------------------
    def complete(self, ids: Sequence[int], boundaries: Sequence[int], max_tokens: int,
                 ignore_eos: bool = False, scope: str = "") -> CrossCompletion:
        """Greedy completion of `ids` by the receiver; the longest sender prefix ending at one of
        `boundaries` (token counts) is reused, the rest of the prompt is the receiver's own work."""
        ids = list(ids)
        if not ids:
            raise ValueError("empty prompt")
        if max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        with self._lock:
            start = time.perf_counter()
            reused, state = 0, None
            for end in sorted({b for b in boundaries if 0 < b < len(ids)}, reverse=True):
                key = prefix_key(ids[:end], scope)
                state = self._prefixes.get(key)
                if state is not None:
                    reused = end
                    self._prefixes.move_to_end(key)
                    break
            if state is not None:
                kv, logits = reuse_and_prefill(self.receiver, state.kv, state.hidden, self.group, ids[:reused],
                                               ids[reused:])
            else:
                kv, logits = forward_over(self.receiver, ids, range(len(ids)), None, [])
            first = int(logits.argmax())
            first_token = time.perf_counter()
            tokens = decode(self.receiver, kv, first, len(ids), max_tokens)
        eos = False
        if not ignore_eos and self.eos_token_id is not None and self.eos_token_id in tokens:
            tokens, eos = tokens[: tokens.index(self.eos_token_id) + 1], True
        reason = "reused" if state is not None else "no_sender_prefix"
        self.counters[reason] += 1
        self.counters["reused_tokens"] += reused
        return CrossCompletion(tokens, len(ids), reused, reason, first_token - start, eos)

    def stats(self) -> dict:
        return {"group": list(self.group), "prefixes": len(self._prefixes), "bytes": self.bytes,
                "max_bytes": self.max_bytes, "counters": dict(self.counters)}
