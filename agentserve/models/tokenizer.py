"""A byte-level BPE tokenizer trained on text shipped in the repo, with a ChatML chat template.

The corpus (`corpus/swe_agent_text.txt`) is agent text: messages of mini-swe-agent SWE-bench
trajectories (MIT, see corpus/README.md), so the vocabulary fits what agentserve replays. Training is
single-threaded and the corpus fixed, so the tokenizer is the same bytes on every machine.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

CORPUS = Path(__file__).with_name("corpus") / "swe_agent_text.txt"
VOCAB_SIZE = 4096
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
EOS_TOKEN = "<|im_end|>"
# ChatML, the format of Qwen2 and many agent stacks. The history re-renders to identical tokens turn
# after turn, which prefix caching (and hence KV pinning) relies on.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def corpus_digest() -> str:
    return hashlib.sha256(CORPUS.read_bytes()).hexdigest()


def train_tokenizer(out_dir: Path, *, max_length: int) -> None:
    """Train the tokenizer and save it (HF `PreTrainedTokenizerFast` files) into `out_dir`."""
    # Parallel training would make merge order depend on thread timing: pin it to one thread.
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(CORPUS)], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token=EOS_TOKEN,
        pad_token="<|pad|>",
        unk_token=None,
        model_max_length=max_length,
        chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(str(out_dir))
