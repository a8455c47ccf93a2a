"""Named model specs: the only place that says what `tiny`, `bench` and `tiny-qwen2` are.

Every model agentserve serves on CPU is built locally from one of these specs (random weights from a
fixed seed, or weights trained by a script in the repo) with the tokenizer of `tokenizer.py`. A spec
is a wire type so its canonical JSON is the cache fingerprint: change a field and the model is rebuilt.

Sizing (measured on the 2-core AVX2 machine; see docs/models.md):
- `tiny`: 2 layers, d=128. Prefills thousands of tokens/s; for tests, where only plumbing matters.
- `bench`: 8 layers, d=256. Chosen so that re-prefilling a SWE-bench turn scaled by 1/4 costs, relative
  to decoding its output and to the tool call, about what Llama-3.1-8B costs on one H100 for the
  unscaled turn (docs/models.md gives the measured ratios).
- `tiny-qwen2`: Qwen2 architecture with grouped-query attention (4 query heads share 2 KV heads) and
  q/k/v biases, for the KV-sharing work, which must handle GQA and a second architecture.
"""

from __future__ import annotations

from pathlib import Path

import msgspec


class ModelSpec(msgspec.Struct, frozen=True, kw_only=True):
    """Architecture and initialisation of one locally built model."""

    name: str
    architecture: str  # "llama" or "qwen2"
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int = 32768
    rope_theta: float = 10000.0
    seed: int = 0
    initializer_range: float = 0.02  # std of the random init (HF's default for Llama and Qwen2)
    description: str = ""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


CATALOG: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="tiny",
            architecture="llama",
            hidden_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=4,
            intermediate_size=384,
            seed=1,
            description="2-layer Llama, d=128: fast, for tests",
        ),
        ModelSpec(
            name="bench",
            architecture="llama",
            hidden_size=256,
            num_layers=8,
            num_heads=8,
            num_kv_heads=8,
            intermediate_size=768,
            seed=2,
            description="8-layer Llama, d=256: re-prefill/decode/tool cost ratios of an 8B model on an H100",
        ),
        ModelSpec(
            name="tiny-qwen2",
            architecture="qwen2",
            hidden_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=384,
            seed=3,
            description="2-layer Qwen2 with grouped-query attention (4 query / 2 KV heads)",
        ),
    )
}


# Models trained by a script in the repo, weights committed under agentserve/models/weights/ (float16,
# loaded as float32): `python -m agentserve.models.train_kvret` (docs/models.md).
TRAINED: dict[str, str] = {
    "kvret": "4-layer Llama, d=128, 4 heads: multi-agent key-value retrieval (forward lookup)",
    "kvret-ft": "kvret fine-tuned to add reverse lookup: the cross-model (DroidSpeak) partner of kvret",
}


def trained_model_dir(name: str) -> Path:
    if name not in TRAINED:
        raise ValueError(f"unknown trained model {name!r}; trained models: {', '.join(sorted(TRAINED))}")
    path = Path(__file__).parent / "weights" / name
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"{path} holds no weights: run `python -m agentserve.models.train_kvret`")
    return path


def get_spec(name: str) -> ModelSpec:
    try:
        return CATALOG[name]
    except KeyError:
        known = ", ".join(sorted(CATALOG))
        raise ValueError(f"unknown model {name!r}; built-in models: {known}") from None
