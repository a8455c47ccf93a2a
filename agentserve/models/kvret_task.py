"""The multi-agent key-value retrieval task: the workload of KV sharing, and what its model is trained on.

Five agents each write a report: facts `k17 v42 ;` among filler words. In the next round every agent
reads the four others' reports under its own prefix (fully connected, KVCOMM's setting) and answers a
question whose answer sits in one of them: `Q k17` -> `v42` (forward lookup) or, the skill the
fine-tuned variant adds, `R v42` -> `k17` (reverse lookup). A report is a shared segment: its tokens
are the same in every consumer, its position and what precedes it are not, so prefix caching misses.

A consumer prompt, as parts (`Text` is the consumer's own template, `Shared` another agent's output):
    <bos> agent3 : w5 w9 ... ;  [ agent0 says : <report 0> ]  [ agent1 says : <report 1> ] ...  Q k17

Word-level vocabulary (one token per word), so token counts are exact and the task is about retrieval,
not spelling. Keys and values are unique within an episode, so every question has one answer.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from agentserve.kvshare.parts import Part, Shared, Text, flatten  # noqa: F401  (flatten: re-exported)

SPECIALS = ["<pad>", "<bos>", "<eos>"]
STRUCTURE = ["[", "]", ":", "=", ";", "says", "Q", "R", "A"]
MAX_AGENTS = 8
WORDS = KEYS = VALUES = 128  # filler words, keys, values
INSTRUCTION_WORDS = 8  # an agent's own prefix: fixed filler words per role


def vocabulary() -> list[str]:
    return (SPECIALS + STRUCTURE + [f"agent{i}" for i in range(MAX_AGENTS)] + [f"w{i}" for i in range(WORDS)]
            + [f"k{i}" for i in range(KEYS)] + [f"v{i}" for i in range(VALUES)])


VOCAB = vocabulary()
ID = {word: i for i, word in enumerate(VOCAB)}


def ids(words: str | Sequence[str]) -> list[int]:
    words = words.split() if isinstance(words, str) else words
    try:
        return [ID[w] for w in words]
    except KeyError as e:
        raise ValueError(f"word {e.args[0]!r} is not in the kvret vocabulary") from None


def words(token_ids: Sequence[int]) -> str:
    return " ".join(VOCAB[i] for i in token_ids)


@dataclass(frozen=True)
class Question:
    prompt: list[int]  # the question's tokens: `Q k` or `R v`
    answer: int


@dataclass(frozen=True)
class Episode:
    reports: list[list[int]]  # agent i's output
    facts: list[dict[int, int]]  # agent i's facts, key id -> value id


def instruction(agent: int) -> list[int]:
    """Agent `agent`'s own prefix words: fixed per role."""
    rng = random.Random(f"instruction-{agent}")
    return ids([f"w{rng.randrange(WORDS)}" for _ in range(INSTRUCTION_WORDS)])


def episode(rng: random.Random, agents: int = 5, facts: tuple[int, int] = (4, 10),
            filler: tuple[int, int] = (8, 40)) -> Episode:
    """Reports for `agents` agents: each a shuffle of `facts` facts and runs of filler words."""
    if not 1 <= agents <= MAX_AGENTS:
        raise ValueError(f"agents must be in [1, {MAX_AGENTS}], got {agents}")
    counts = [rng.randint(*facts) for _ in range(agents)]
    if sum(counts) > min(KEYS, VALUES):
        raise ValueError(f"{sum(counts)} facts need unique keys and values; at most {min(KEYS, VALUES)}")
    keys = rng.sample(range(KEYS), sum(counts))
    values = rng.sample(range(VALUES), sum(counts))
    reports, all_facts, at = [], [], 0
    for n in counts:
        mine = {ID[f"k{k}"]: ID[f"v{v}"] for k, v in zip(keys[at:at + n], values[at:at + n])}
        at += n
        items = [[k, v, ID[";"]] for k, v in mine.items()]
        budget = rng.randint(*filler)
        for _ in range(budget):
            items.insert(rng.randrange(len(items) + 1), [ID[f"w{rng.randrange(WORDS)}"]])
        reports.append([t for item in items for t in item])
        all_facts.append(mine)
    return Episode(reports, all_facts)


def consumer_parts(ep: Episode, agent: int) -> list[Part]:
    """Agent `agent`'s prompt before the question: its prefix, then every other agent's report."""
    parts: list[Part] = [Text(ids(["<bos>", f"agent{agent}", ":"]) + instruction(agent) + ids(";"))]
    for source, report in enumerate(ep.reports):
        if source == agent:
            continue
        parts.append(Text(ids(["[", f"agent{source}", "says", ":"])))
        parts.append(Shared(list(report), source))
        parts.append(Text(ids("]")))
    return parts


def questions(rng: random.Random, ep: Episode, agent: int, n: int, reverse: float = 0.0,
              repeat: bool = False) -> list[Question]:
    """`n` questions for `agent` about the other agents' facts; a share `reverse` asks value -> key.
    With `repeat`, facts are drawn with replacement (n questions however many facts)."""
    pool = [(k, v) for source, facts in enumerate(ep.facts) if source != agent for k, v in facts.items()]
    drawn = [rng.choice(pool) for _ in range(n)] if repeat else rng.sample(pool, min(n, len(pool)))
    out = []
    for k, v in drawn:
        if rng.random() < reverse:
            out.append(Question([ID["R"], v], k))
        else:
            out.append(Question([ID["Q"], k], v))
    return out


def tokenizer_json() -> str:
    """A `tokenizers` WordLevel tokenizer over the vocabulary (whitespace-split), as JSON."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab=dict(ID), unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok.to_str()
