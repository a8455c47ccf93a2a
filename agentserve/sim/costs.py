"""What an engine step costs in the simulator: a linear model over what the step computes.

    step seconds = fixed + per prefill token x prefill tokens + per decoding sequence x sequences
                   + per KV token read x KV tokens the decodes attend to

The four terms are what a continuous-batching step spends: launch and scheduling overhead, the
prefill's matmuls (linear in tokens at these sizes), each sequence's sampling and per-sequence work,
and decode attention (memory-bound: it reads every cached token of every decoding sequence). The
trade-off: no quadratic prefill-attention term (the replays' contexts are short enough that the
linear term fits), and no interference beyond adding the terms.
"""

from __future__ import annotations

import msgspec


class CostModel(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    step_s: float  # fixed cost of a step that runs anything
    prefill_token_s: float
    decode_seq_s: float
    kv_read_token_s: float  # per cached token a decoding sequence attends to

    def step(self, prefill_tokens: int, decode_seqs: int, decode_kv_tokens: int) -> float:
        if prefill_tokens == 0 and decode_seqs == 0:
            return 0.0
        return (self.step_s + self.prefill_token_s * prefill_tokens + self.decode_seq_s * decode_seqs
                + self.kv_read_token_s * decode_kv_tokens)

    def prefill_s(self, tokens: int) -> float:
        """A re-prefill of `tokens` alone: what the TTL rule weighs a miss at."""
        return self.step(tokens, 0, 0)


# Named profiles (`agentserve sim --profile NAME`). Provisional: validation against real replays
# (issue 20) fits `cpu-bench` from the engine's step times; until then the split of a decode step
# into its terms is an assumption, stated per profile.
PROFILES = {
    # This machine, the `bench` model (bench/model_costs.py, 2026-12-03): a 4,096-token prefill in
    # 1.722 s, decode 7.3 ms per token alone at a 4,096-token context, split as 5 ms fixed, 1.5 ms per
    # sequence and the rest attention.
    "cpu-bench": CostModel(name="cpu-bench", step_s=5.0e-3, prefill_token_s=4.2e-4, decode_seq_s=1.5e-3,
                           kv_read_token_s=2.0e-7),
    # Llama-3.1-8B, bf16, one H100 SXM: prefill ~14k tokens/s; a decode step reads the weights (16 GB at
    # 3.35 TB/s: ~5 ms) and each sequence's KV (128 KiB per token).
    "h100-llama8b": CostModel(name="h100-llama8b", step_s=5.0e-3, prefill_token_s=7.1e-5, decode_seq_s=2.0e-5,
                              kv_read_token_s=128 * 1024 / 3.35e12),
}
