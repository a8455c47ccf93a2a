"""Text of an exact token count, for replaying traces that give token counts but not text.

Words that the served model's tokenizer encodes as exactly one token after a space (byte-level BPE
vocabulary entries of letters only): a text of N such words, space-separated, is N tokens, because the
pre-tokenizer splits at spaces and no merge crosses a word. Each program draws its own words (seeded),
so programs share no prefix by accident. With no tokenizer at hand (a remote endpoint of another
model), plain lowercase words stand in (about one token each in GPT/Llama-class tokenizers).
"""

from __future__ import annotations

import random
from pathlib import Path

MIN_WORDS = 256  # fewer single-token words than this: the tokenizer is not a byte-level BPE we know
FALLBACK_WORDS = ("time person year way day thing man world life hand part child eye woman place work "
                  "week case point number group problem fact file line code test value error result "
                  "function class module patch change build run check state list table field model").split()


def single_token_words(tokenizer_dir: str | Path | None) -> list[str]:
    if tokenizer_dir is None or not (Path(tokenizer_dir) / "tokenizer.json").exists():
        return list(FALLBACK_WORDS)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    words = sorted({t[1:] for t in tok.get_vocab() if t.startswith("\u0120") and t[1:].isalpha()
                    and t[1:].isascii()})
    words = [w for w in words if len(tok.encode(" " + w, add_special_tokens=False).ids) == 1]
    return words if len(words) >= MIN_WORDS else list(FALLBACK_WORDS)


class Filler:
    def __init__(self, words: list[str]):
        if not words:
            raise ValueError("no filler words")
        self.words = words

    def text(self, tokens: int, rng: random.Random) -> str:
        """`tokens` words (one token each), starting with a space so concatenations stay exact."""
        return "".join(" " + rng.choice(self.words) for _ in range(tokens))
