"""A request's program from the session conventions clients already send, so an unmodified OpenAI
client, vLLM's own session field or a Ray Serve LLM deployment's router header names a program.

Precedence, first found wins (vLLM's own order for the last three):
1. `agentserve.program_id` (the object, ProgramFields);
2. `session_id` in the body (vLLM 0.32's request field);
3. the `X-Session-ID` header (vLLM's name; Ray Serve LLM's session router reads the same header,
   `x-session-id`: HTTP header names are case-insensitive);
4. `vllm_xargs.session_id` (vLLM reads it there too);
5. the request-hint conventions (programs/hints.py): `agent_hint.session_id` (vLLM RFC 52113, with its
   `parent_session_id`), then Dynamo's `nvext.agent_context` (`program_id` or `trajectory_id`, with
   `parent_program_id` or `parent_trajectory_id`): the parent makes the program its sub-agent;
6. `metadata.session_id`, or the session in `metadata.user_id` (`..._session_<id>`, as Claude Code
   sends it on the Messages API; a user id without a session names a person, not a program).
A request with none of them is not a program's: the conversation it continues may name it
(programs/continuity.py), else it is served as stock vLLM serves it.

The end of a program can be said in a header, for clients that send headers but no body fields:
`X-Agentserve-End-Program: true` makes the call the program's last (no pin) and ends the program when
the call ends, as `"ends_program": true` in the object does. The convention ids pass through
unchanged, so vLLM still sees its session id.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from agentserve.programs.fields import ID, ProgramFields

SESSION_HEADER = "x-session-id"
END_HEADER = "x-agentserve-end-program"
HEADERS = (SESSION_HEADER, END_HEADER)  # the headers this module reads (lower case)
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no", "")
_SESSION_ID = msgspec.json.Decoder(ID)  # the id's bounds, checked as the object's program_id is
_SESSION_IN_USER = re.compile(r"(?:^|_)session_([A-Za-z0-9][A-Za-z0-9-]*)$")


class SessionError(ValueError):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def program_fields(fields: ProgramFields | None, body: dict[str, Any],
                   headers: dict[str, str]) -> tuple[ProgramFields | None, str | None]:
    """The request's program fields (the object's, or a program named by a session convention, with
    the end header applied) and what named the program (`agentserve` for the object, else the
    convention's name; None: no program). Raises SessionError (a 400 naming `param`) for a malformed
    id or header."""
    ends = _flag(headers.get(END_HEADER), END_HEADER)
    named_by = "agentserve" if fields is not None else None
    if fields is None:
        session, named_by, parent = _session(body, headers)
        if session is None:
            if ends:
                raise SessionError(f"{END_HEADER} needs a program: send agentserve.program_id, session_id "
                                   f"or {SESSION_HEADER}", END_HEADER)
            return None, None
        fields = ProgramFields(program_id=_checked(session, named_by),
                               parent_program_id=_checked(parent, named_by + ".parent") if parent is not None else None)
    if ends:
        fields = msgspec.structs.replace(fields, ends_program=True)
    if fields.ends_program and not fields.is_last_turn:
        fields = msgspec.structs.replace(fields, is_last_turn=True)
    return fields, named_by


def _session(body: dict[str, Any], headers: dict[str, str]) -> tuple[Any, str | None, Any]:
    """(the session id, the convention that named it, the parent's id) of the first convention given."""
    if body.get("session_id") is not None:
        return body["session_id"], "session_id", None
    if headers.get(SESSION_HEADER):
        return headers[SESSION_HEADER], SESSION_HEADER, None
    xargs = body.get("vllm_xargs")
    if isinstance(xargs, dict) and xargs.get("session_id") is not None:
        return xargs["session_id"], "vllm_xargs.session_id", None
    hint = body.get("agent_hint")
    if isinstance(hint, dict) and hint.get("session_id") is not None:
        return hint["session_id"], "agent_hint.session_id", hint.get("parent_session_id")
    nvext = body.get("nvext")
    context = nvext.get("agent_context") if isinstance(nvext, dict) else None
    if isinstance(context, dict):
        program = context.get("program_id", context.get("trajectory_id"))
        if program is not None:
            return program, "nvext.agent_context", context.get("parent_program_id", context.get("parent_trajectory_id"))
    metadata = body.get("metadata")
    if isinstance(metadata, dict):
        if metadata.get("session_id") is not None:
            return metadata["session_id"], "metadata.session_id", None
        user = metadata.get("user_id")
        if isinstance(user, str) and (found := _SESSION_IN_USER.search(user)):
            return found.group(1), "metadata.user_id", None
    return None, None, None


def _checked(session: Any, param: str) -> str:
    if not isinstance(session, str):
        raise SessionError(f"{param} must be a string", param)
    try:
        return _SESSION_ID.decode(msgspec.json.encode(session))
    except msgspec.ValidationError as e:
        raise SessionError(f"invalid {param}: {e}", param) from None


def _flag(value: str | None, name: str) -> bool:
    if value is None:
        return False
    v = value.strip().lower()
    if v in _TRUE or v in _FALSE:
        return v in _TRUE
    raise SessionError(f"{name} must be true or false, not {value!r}", name)
