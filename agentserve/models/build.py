"""Build a catalog model into the user cache, once: `ensure_model("tiny")` returns its directory.

The directory name carries a fingerprint of everything that determines the bytes (spec, corpus,
builder version), so a changed config is rebuilt next to the old one instead of silently reused.
Builds go to a temporary directory renamed into place, so concurrent builders (a test process and a
server it spawns) never see a half-written model.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import msgspec

from agentserve.models.catalog import ModelSpec, get_spec
from agentserve.models.tokenizer import corpus_digest, train_tokenizer

# Bump when the build procedure changes in a way that changes the produced files.
BUILDER_VERSION = 1
_COMPLETE_MARKER = "agentserve-model.json"


def cache_root() -> Path:
    """`$AGENTSERVE_CACHE`, else `$XDG_CACHE_HOME/agentserve`, else `~/.cache/agentserve`."""
    if env := os.environ.get("AGENTSERVE_CACHE"):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "agentserve"


def fingerprint(spec: ModelSpec) -> str:
    h = hashlib.sha256()
    h.update(msgspec.json.encode(spec))
    h.update(corpus_digest().encode())
    h.update(str(BUILDER_VERSION).encode())
    return h.hexdigest()[:16]


def model_dir(name: str) -> Path:
    spec = get_spec(name)
    return cache_root() / "models" / f"{spec.name}-{fingerprint(spec)}"


def ensure_model(name: str) -> Path:
    """Return the directory of the built model `name`, building it first if missing."""
    target = model_dir(name)
    if (target / _COMPLETE_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _build(get_spec(name), tmp)
        try:
            tmp.rename(target)
        except OSError:
            # Another process finished the same build first; its files are identical.
            if not (target / _COMPLETE_MARKER).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def hf_config(spec: ModelSpec, vocab_size: int, eos_id: int, bos_id: int, pad_id: int):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rope_theta=spec.rope_theta,
        initializer_range=spec.initializer_range,
        tie_word_embeddings=False,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="float32",
    )
    if spec.architecture == "llama":
        return LlamaConfig(**common)
    if spec.architecture == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    raise ValueError(f"model {spec.name!r}: unsupported architecture {spec.architecture!r}")


def _build(spec: ModelSpec, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train_tokenizer(out, max_length=spec.max_position_embeddings)
    tok = AutoTokenizer.from_pretrained(str(out))
    config = hf_config(
        spec,
        vocab_size=len(tok),
        eos_id=tok.eos_token_id,
        bos_id=tok.bos_token_id,
        pad_id=tok.pad_token_id,
    )
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(out), safe_serialization=True)
    meta = {"spec": msgspec.to_builtins(spec), "fingerprint": fingerprint(spec)}
    (out / _COMPLETE_MARKER).write_bytes(msgspec.json.encode(meta))
