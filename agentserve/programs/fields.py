"""The wire contract of a program: what an LLM request and a tool event carry (msgspec structs).

An LLM request of a program carries, next to the OpenAI body, `"agentserve": {...}` (`ProgramFields`;
with the openai client: `extra_body={"agentserve": {...}}`). Only `program_id` is required; the
server infers the rest. Inside the engine the fields travel as `SamplingParams.extra_args` under the
`XARG_*` keys (vLLM's `vllm_xargs`: scalar values only).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

ID = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]

XARG_PREFIX = "agentserve_"  # every engine key of agentserve's; clients may not send them
XARG_PROGRAM = "agentserve_program_id"
XARG_TURN = "agentserve_turn"
XARG_IS_LAST = "agentserve_is_last_turn"
XARG_ENDS = "agentserve_ends_program"
XARG_TOOL = "agentserve_tool"
XARG_PARENT = "agentserve_parent_program_id"
XARG_TTL = "agentserve_ttl_s"
XARG_NEXT_USE = "agentserve_next_use_s"  # predicted seconds from this turn's end to the program's next turn
XARG_WORKFLOW = "agentserve_workflow"  # the root program's id (the server's, from the program forest)
XARG_DEPTH = "agentserve_depth"  # the program's depth in its workflow (the root's is 0)
XARG_REMAINING = "agentserve_remaining_s"  # predicted seconds of work the program has left (critical path)
# The life of the program a call belongs to (the control plane's serial, a new one each time the id
# begins again after an end): an engine tells a late request of an ended life from the next life's.
XARG_LIFE = "agentserve_life"
# The tool calls that ran since the program's previous call (ProgramFields.tools_done), as JSON text:
# vLLM's xargs hold scalars only.
XARG_TOOLS_DONE = "agentserve_tools_done"
# On a request of no program that may be a conversation's first turn (programs/continuity.py): the id its
# next turn's program will have. Its blocks keep vLLM's LRU order rather than going first (--one-off-blocks
# evict-first), as that turn may need them, and a router places it as that program (the next turn follows).
XARG_CONVERSATION = "agentserve_conversation"
XARG_INFERRED = "agentserve_inferred"  # the program was inferred from its conversation (ProgramFields.inferred)
# Request hints, as judged at the front (programs/hints.py): the TTL asked for, the caller's estimate of this
# call's tool, the expected output length, and the priority level the book orders by (one-offs too).
XARG_TTL_ASKED = "agentserve_ttl_asked_s"
XARG_EXPECTED_TOOL = "agentserve_expected_tool_s"
XARG_OUTPUT = "agentserve_output_tokens"
XARG_PRIORITY = "agentserve_priority"
# The tool of a turn whose answer spawns sub-agents and waits for them: the wait is the join.
JOIN_TOOL = "join"


MAX_PARTS = 64
MAX_TOOLS_DONE = 64  # tool calls one LLM call reports (an agent's parallel tool calls between two turns)
ToolName = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Duration = Annotated[float, msgspec.Meta(ge=0, le=86400)]  # parts of a shared prompt (agentserve/kvshare/planner.py bounds its segments alike)


class PromptPart(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One part of a prompt: `text` (tokenized on its own, no special tokens added) or `token_ids`;
    `shared`: content other agents' prompts hold too (an agent's output, the common question)."""

    text: str | None = None
    token_ids: list[Annotated[int, msgspec.Meta(ge=0)]] | None = None
    shared: bool = False


class SharedPrompt(msgspec.Struct, forbid_unknown_fields=True):
    """A `/v1/completions` prompt as parts, for KV sharing (`agentserve serve --kvshare`): the KV of
    its shared parts is reused under this prompt's prefix with KVCOMM's offset correction.
    `template`: the agent's role; prompts of one template share their layout (anchors are per template)."""

    template: ID
    parts: Annotated[list[PromptPart], msgspec.Meta(min_length=2, max_length=MAX_PARTS)]


class ToolRun(msgspec.Struct, forbid_unknown_fields=True):
    """A tool call that ran, timed by the client (`duration_s`)."""

    name: ToolName
    duration_s: Duration


class ProgramFields(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    program_id: ID
    turn: Annotated[int, msgspec.Meta(ge=0)] | None = None  # default: LLM calls of the program so far
    is_last_turn: bool = False  # unmarked last turns just let their pin expire
    ends_program: bool = False  # the program ends when this call does (a last turn that also says /end)
    tool: Annotated[str, msgspec.Meta(max_length=256)] | None = None  # the tool this call's answer runs
    parent_program_id: ID | None = None  # set on a sub-agent's first call: a DAG edge from the parent
    share: SharedPrompt | None = None  # the prompt as parts, some shared (completions only, --kvshare)
    # The tool calls that ran since the program's previous call, reported with this call rather than in
    # tool events of their own: no round trip between an agent's turns (the SDK's default).
    tools_done: Annotated[list[ToolRun], msgspec.Meta(max_length=MAX_TOOLS_DONE)] | None = None
    # Request hints (programs/hints.py judges them: each is applied, clipped or ignored, as the response
    # says in x-agentserve-hints): a priority (higher is served earlier), the TTL asked for this turn's KV
    # (the policy's choice otherwise), the expected seconds of this call's tool (over the tool's history)
    # and the expected output tokens.
    priority: int | None = None
    ttl_s: Duration | None = None
    expected_tool_s: Duration | None = None
    output_tokens: Annotated[int, msgspec.Meta(ge=0)] | None = None
    # Set by the server, never by a client: the program was inferred from its conversation
    # (programs/continuity.py), so nobody will end it; the control plane ends it when it falls silent.
    inferred: bool = False


class ToolEvent(msgspec.Struct, forbid_unknown_fields=True):
    """`POST /v1/programs/{id}/tool`: a tool call started or ended (client clock, or server's), or
    "ran": one that started and ended, with its `duration_s` (no start event sent)."""

    name: ToolName
    event: Literal["start", "end", "ran"]
    # Client-measured duration, sent with "end": preferred over the server's start/end gap.
    duration_s: Duration | None = None

    def __post_init__(self) -> None:
        if self.event == "ran" and self.duration_s is None:
            raise ValueError('a "ran" tool event needs duration_s')


def to_xargs(f: ProgramFields) -> dict[str, str | int | float | bool]:
    out: dict[str, str | int | float | bool] = {XARG_PROGRAM: f.program_id, XARG_IS_LAST: f.is_last_turn}
    if f.turn is not None:
        out[XARG_TURN] = f.turn
    if f.ends_program:
        out[XARG_ENDS] = True
    if f.tool is not None:
        out[XARG_TOOL] = f.tool
    if f.parent_program_id is not None:
        out[XARG_PARENT] = f.parent_program_id
    if f.tools_done:
        out[XARG_TOOLS_DONE] = msgspec.json.encode(f.tools_done).decode()
    if f.inferred:
        out[XARG_INFERRED] = True
    for key, value in ((XARG_TTL_ASKED, f.ttl_s), (XARG_EXPECTED_TOOL, f.expected_tool_s), (XARG_OUTPUT, f.output_tokens)):
        if value is not None:
            out[key] = value
    return out


def from_xargs(xargs: dict) -> ProgramFields | None:
    """The program fields the middleware put into a request's xargs (None: not a program's request)."""
    program = xargs.get(XARG_PROGRAM)
    if program is None:
        return None
    done = xargs.get(XARG_TOOLS_DONE)
    return ProgramFields(program_id=program, turn=xargs.get(XARG_TURN), is_last_turn=bool(xargs.get(XARG_IS_LAST)),
                         ends_program=bool(xargs.get(XARG_ENDS)), tool=xargs.get(XARG_TOOL),
                         parent_program_id=xargs.get(XARG_PARENT),
                         tools_done=msgspec.json.decode(done, type=list[ToolRun]) if done else None,
                         inferred=bool(xargs.get(XARG_INFERRED)), ttl_s=xargs.get(XARG_TTL_ASKED),
                         expected_tool_s=xargs.get(XARG_EXPECTED_TOOL), output_tokens=xargs.get(XARG_OUTPUT))
