"""Programs inferred from conversation continuity: a request that names no program is the next turn
of a live conversation when its messages extend an earlier request's messages plus that request's
answer (chat completions and Anthropic's Messages API alike: server/transcripts.py). The conversation is then a program, so a plain OpenAI client's agent loop gets
what a named one gets (pins across its tool calls, program order, working-set admission).

Matching is on a chain of hashes over a normal form of each message (role, text, tool calls, nothing
else: server/transcripts.py), seeded by the tenant's scope, the API, the model and the client's cache
salt, so that the re-serializations clients do between turns do not break a conversation, and two
tenants never share one. After each answer the index holds one *state*: the
hash of the request's messages plus the answer. A later request whose chain passes through a state
continues it:
- the first request to extend a state continues its program (a conversation's second turn starts it:
  a first turn is served as a one-off, since most single requests never come back);
- the same messages sent again (a client's retry, or an identical conversation) get the same program;
- a different extension of a state already extended is a fork: a program of its own.
The gap between an answer and the request that continues it is the tool time, reported as a tool run
named after the answer's first tool call (`USER_TURN` for an answer without one: the wait is a person's).

Memory is bounded per scope (`max_states`, the oldest answer's state dropped first) and in time: a state
idle past the programs' idle timeout is dropped, as the tracker abandons the program.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from agentserve.programs.fields import ToolRun

if TYPE_CHECKING:
    from agentserve.options import ProgramOptions

DEFAULT_MAX_STATES = 4096  # answered states kept per scope (a tenant, or the whole server without tenants)
MAX_EXTENSIONS = 16  # distinct extensions of one state remembered (a state forked wider forks on)
USER_TURN = "(user)"  # the tool name of the wait after an answer that called no tool
PROGRAM_PREFIX = "conv-"  # inferred program ids: this and 64 random bits (unique across front-end processes)
_encode = msgspec.json.Encoder(order="sorted").encode


class Pending(msgspec.Struct):
    """A request the index has seen, waiting for its answer (`Conversations.answered`)."""

    scope: str
    chain: bytes  # the hash of the request's messages
    program_id: str  # the program of the request's line of turns (a first turn's: of its next turn)
    turn: int
    parent: bytes | None = None  # the state the request extends


class Turn(msgspec.Struct):
    """What the index says about a request: `kind` first | continued | resent | forked; its program
    (None for a first turn, served as a one-off, whose next turn's program is `Pending.program_id`)."""

    kind: str
    program_id: str | None
    turn: int
    tools_done: list[ToolRun] | None = None


class _State:
    __slots__ = ("program_id", "turn", "answered_at", "tool", "extensions", "answered")

    def __init__(self, program_id: str, turn: int, answered_at: float, tool: str):
        self.program_id, self.turn, self.answered_at, self.tool = program_id, turn, answered_at, tool
        self.extensions: dict[bytes, str] = {}  # request chain -> the program it got
        self.answered: set[bytes] = set()  # those of the extensions that have an answer


def conversations_for(options: "ProgramOptions") -> "Conversations | None":
    """A front end's conversation index, None without --infer-programs."""
    return Conversations(idle_timeout_s=options.idle_timeout_s) if options.infer_programs else None


class Conversations:
    def __init__(self, *, max_states: int = DEFAULT_MAX_STATES, idle_timeout_s: float = 600.0,
                 clock: Callable[[], float] = time.monotonic, prefix: str = PROGRAM_PREFIX):
        if max_states < 1:
            raise ValueError("max_states must be >= 1")
        self.max_states = max_states
        self.idle_timeout_s = idle_timeout_s
        self.clock = clock
        self.prefix = prefix
        self._states: dict[str, OrderedDict[bytes, _State]] = {}

    def __len__(self) -> int:
        return sum(len(s) for s in self._states.values())

    def begin(self, scope: str, transcript: list, seed: Any = "") -> tuple[Turn, Pending]:
        """The request's place in its conversation. `transcript`: its messages in a normal form
        (server/transcripts.py); `seed`: what else keeps conversations apart (the API, the model, the
        client's cache salt)."""
        chain = chain_of(transcript, _encode((scope, seed)))
        states = self._live(scope)
        parent = next((h for h in reversed(chain[1:]) if h in states), None)
        if parent is None:
            return Turn("first", None, 0), Pending(scope, chain[-1], self._new_id(), 0)
        state = states[parent]
        key, turn, tools = chain[-1], state.turn + 1, None
        if key in state.extensions:
            kind, program = "resent", state.extensions[key]
        elif not state.extensions:
            kind, program = "continued", state.program_id
            tools = [ToolRun(state.tool, max(0.0, self.clock() - state.answered_at))]
        else:
            kind, program = "forked", self._new_id()
        if len(state.extensions) < MAX_EXTENSIONS:
            state.extensions[key] = program
        return Turn(kind, program, turn, tools), Pending(scope, key, program, turn, parent)

    def answered(self, pending: Pending, answer: Any, tool: str | None) -> None:
        """The request's answer (normalized, as the transcript's messages; `tool`: its first tool call's
        name): the state a next turn will extend. A request sent twice whose second answer differs from
        the first (sampling) forks there: the second line of turns gets a program of its own."""
        key = _link(pending.chain, answer)
        states = self._live(pending.scope)
        program, known = pending.program_id, states.get(key)
        parent = states.get(pending.parent) if pending.parent is not None else None
        if parent is not None and pending.chain in parent.extensions:
            if pending.chain in parent.answered and known is None:
                program = self._new_id()
            parent.answered.add(pending.chain)
        if known is None:
            states[key] = _State(program, pending.turn, self.clock(), (tool or "")[:256] or USER_TURN)
        else:  # the same turn answered again, alike (a resent request): its extensions so far stay
            known.answered_at = self.clock()
            states.move_to_end(key)
        while len(states) > self.max_states:
            states.popitem(last=False)

    def _new_id(self) -> str:
        return f"{self.prefix}{uuid.uuid4().hex[:16]}"

    def _live(self, scope: str) -> OrderedDict[bytes, _State]:
        """The scope's states, those idle past the timeout dropped (oldest answers first)."""
        states = self._states.setdefault(scope, OrderedDict())
        horizon = self.clock() - self.idle_timeout_s
        while states and next(iter(states.values())).answered_at < horizon:
            states.popitem(last=False)
        return states


def chain_of(transcript: list, seed: bytes) -> list[bytes]:
    """[seed hash, hash after message 1, ..., hash after message n] of a normalized transcript."""
    chain = [hashlib.blake2b(seed, digest_size=16).digest()]
    for item in transcript:
        chain.append(_link(chain[-1], item))
    return chain


def _link(previous: bytes, item: Any) -> bytes:
    return hashlib.blake2b(previous + _encode(item), digest_size=16).digest()
