"""Locally built models: deterministic, cached by fingerprint, with a working chat template."""

import json

import msgspec
import pytest

from agentserve.models import build
from agentserve.models.catalog import CATALOG, get_spec


def test_unknown_model_names_the_known_ones():
    with pytest.raises(ValueError, match="tiny"):
        get_spec("gpt-5")


def test_fingerprint_follows_the_spec():
    spec = get_spec("tiny")
    changed = msgspec.structs.replace(spec, num_layers=spec.num_layers + 1)
    assert build.fingerprint(spec) == build.fingerprint(get_spec("tiny"))
    assert build.fingerprint(changed) != build.fingerprint(spec)


def test_catalog_has_the_three_models_with_their_architectures():
    assert {n: s.architecture for n, s in CATALOG.items()} == {
        "tiny": "llama", "bench": "llama", "tiny-qwen2": "qwen2"}
    qwen = get_spec("tiny-qwen2")
    assert qwen.num_kv_heads < qwen.num_heads  # grouped-query attention


@pytest.mark.parametrize("name", ["tiny", "tiny-qwen2"])
def test_build_is_bit_for_bit_deterministic(tmp_path, monkeypatch, name):
    digests = []
    for i in range(2):
        monkeypatch.setenv("AGENTSERVE_CACHE", str(tmp_path / str(i)))
        d = build.ensure_model(name)
        digests.append({f: (d / f).read_bytes() for f in ("model.safetensors", "tokenizer.json", "config.json")})
    assert digests[0] == digests[1]
    cfg = json.loads((d / "config.json").read_text())
    spec = get_spec(name)
    assert cfg["num_hidden_layers"] == spec.num_layers
    assert cfg["num_key_value_heads"] == spec.num_kv_heads
    assert cfg["model_type"] == spec.architecture


def test_ensure_model_reuses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AGENTSERVE_CACHE", str(tmp_path))
    first = build.ensure_model("tiny")
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert build.ensure_model("tiny") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime


def test_chat_template_rerenders_history_to_identical_tokens():
    """Prefix caching across turns needs turn k's prompt to start with turn k-1's prompt + answer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(build.ensure_model("tiny")))
    history = [{"role": "system", "content": "You are an agent."}, {"role": "user", "content": "ls -la"}]
    first = tok.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
    history += [{"role": "assistant", "content": "```bash\nls\n```"}, {"role": "user", "content": "a.py"}]
    second = tok.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
    assert second.startswith(first)
    ids = tok(second)["input_ids"]
    assert tok.decode(ids) == second
    assert tok.eos_token == "<|im_end|>"
