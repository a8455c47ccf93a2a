"""The front end of KV sharing (`agentserve serve --kvshare`): an agent marks the parts of its prompt
that are shared (another agent's output, the common question) and the server turns that into what the
engine's connector (agentserve/kvshare/connector.py) acts on.

A `/v1/completions` body whose `agentserve` object has `share` (`SharedPrompt`) gets:
- `prompt` = its parts' token ids, each part tokenized on its own (KVCOMM's rule: every part boundary
  is a token boundary, so a shared part has the same tokens wherever it appears);
- `kv_transfer_params.agentserve_share` = the template and the token ranges of the shared parts;
- a `cache_salt` of its own, so blocks holding reused (approximate) KV never serve a prompt that did
  not ask for sharing (see the connector's docstring).
Before the request goes on, every shared part (and template text between two shared parts) the server
has not produced yet is *produced*: a one-token request whose prompt is the part alone, whose KV the
connector keeps as the part's base.
The produced set is bounded; forgetting a part costs one more produce request (cheap: its blocks are
usually still in the prefix cache), never a wrong answer.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections import OrderedDict
from collections.abc import Callable

import msgspec

from agentserve.kvshare.planner import PARAMS_KEY, ShareSpec
from agentserve.programs.fields import SharedPrompt

log = logging.getLogger("agentserve.kvshare")

SALT = "agentserve-kvshare"  # appended to a sharing request's cache salt
KNOWN_PARTS = 8192  # produced parts remembered by the front end


class ShareError(ValueError):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def assemble(data: dict, share: SharedPrompt, tokenizer, vocab_size: int
             ) -> tuple[list[int], list[tuple[int, int]], list[list[int]]]:
    """(prompt token ids, shared segments as (start, length), what to produce) of a prompt given as
    parts, each part tokenized on its own. Raises ShareError naming the bad field."""
    if data.get("prompt") not in (None, "", []):
        raise ShareError("give the prompt either as `prompt` or as agentserve.share.parts, not both", "prompt")
    ids: list[int] = []
    segments: list[tuple[int, int]] = []
    shared: list[list[int]] = []
    between: list[int] = []  # template text since the last shared part
    for i, part in enumerate(share.parts):
        where = f"agentserve.share.parts[{i}]"
        if (part.text is None) == (part.token_ids is None):
            raise ShareError("a part has either text or token_ids", where)
        tokens = part.token_ids if part.token_ids is not None else tokenizer.encode(part.text, add_special_tokens=False)
        if any(t >= vocab_size for t in tokens):
            raise ShareError(f"token ids must be < {vocab_size}", where + ".token_ids")
        if not tokens:
            raise ShareError("a part has no tokens", where)
        if part.shared:
            if segments and between:  # the text between two shared parts has a base too (planner.py)
                shared.append(between)
            segments.append((len(ids), len(tokens)))
            shared.append(list(tokens))
            between = []
        else:
            between = between + list(tokens)
        ids += tokens
    if not segments:
        raise ShareError("no part is shared", "agentserve.share.parts")
    if share.parts[-1].shared:
        raise ShareError("the last part must be the agent's own (the engine computes it)", "agentserve.share.parts")
    return ids, segments, shared


class SharedPrompts:
    def __init__(self, engine, tokenizer, vocab_size: int):
        self.engine = engine
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._known: OrderedDict[str, None] = OrderedDict()
        # called with (prompt ids, shared segments, scope) for every sharing request to the engine
        # (the cross-model front prepares the sender's prefix from it)
        self.on_translate: Callable[[list[int], list[tuple[int, int]], str], None] | None = None

    def translate(self, data: dict, share: SharedPrompt, scope: str) -> list[list[int]]:
        """Rewrite the body `data` for `share` (in place); returns what to produce: the shared parts'
        token ids and those of the template text between two shared parts. Raises ShareError naming
        the bad field."""
        ids, segments, shared = assemble(data, share, self.tokenizer, self.vocab_size)
        if self.on_translate is not None:
            self.on_translate(ids, segments, scope)
        spec = ShareSpec(template=share.template, scope=scope, segments=segments)
        params = dict(data.get("kv_transfer_params") or {})
        params[PARAMS_KEY] = msgspec.to_builtins(spec)
        data["prompt"] = ids
        data["kv_transfer_params"] = params
        salt = data.get("cache_salt")
        data["cache_salt"] = f"{salt}:{SALT}" if isinstance(salt, str) else SALT
        return shared

    async def produce(self, parts: list[list[int]], scope: str) -> None:
        """Produce every part not produced yet (its KV becomes the part's base in the engine)."""
        from vllm import SamplingParams

        for tokens in parts:
            key = hashlib.sha256(f"{scope}\0{tokens}".encode()).hexdigest()
            if key in self._known:
                self._known.move_to_end(key)
                continue
            params = SamplingParams(max_tokens=1, temperature=0.0, extra_args={"kv_transfer_params": {
                PARAMS_KEY: msgspec.to_builtins(ShareSpec(scope=scope, produce=True))}})
            async for _ in self.engine.generate({"prompt_token_ids": tokens}, params,
                                                request_id=f"kvshare-produce-{uuid.uuid4().hex}"):
                pass
            self._known[key] = None
            while len(self._known) > KNOWN_PARTS:
                self._known.popitem(last=False)
