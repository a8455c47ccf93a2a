"""Request hints: what agent harnesses already send about a request, read onto agentserve's program
fields and judged against what this server does with each (README, "Request hints", has the table).

Conventions read; for each hint the first one given wins (the `agentserve` object's own fields first):
- priority, higher served earlier: `agentserve.priority`; Dynamo's `nvext.agent_hints.priority`, with its
  `strict_priority` as a tier above it; vLLM's own `priority` field (lower earlier), read only where the
  scheduler plugin orders requests (elsewhere vLLM serves it as it always does).
- expected output length: `agentserve.output_tokens`, Dynamo's `nvext.agent_hints.osl`.
- TTL, a bounded request to keep the program's KV after this turn: `agentserve.ttl_s`, vLLM RFC 52113's
  `agent_hint.cache_control.ttl` (seconds), SGLang's proposed `agent_hints.cache_ttl_ms`.
- expected tool duration of this call's tool: `agentserve.expected_tool_s`, SGLang's proposed
  `agent_hints.expected_tool_duration_ms`. A caller's word about this step beats the tool's history.
- read and ignored: Dynamo's `speculative_prefill`, the RFC's `context_management` and
  `cache_control.block_offset`, every other field of these objects, and each action of vLLM's typed
  `kv_hints` envelope (vLLM 0.32 defines no action type, nor does agentserve).
The identity conventions (`agent_hint.session_id`, `nvext.agent_context`) name programs
(programs/sessions.py).

Hints are advisory, soft and bounded (the maintainers' lesson): each is applied, clipped (to the value
used) or ignored (and why), and the response says which in `x-agentserve-hints`. The judge runs where
the request enters, before anything reaches the engine, and knows everything that would overrule a hint
later: a TTL on a one-off or a last turn, or under a policy that pins nothing; a tool estimate or an
output length under a TTL rule that reads neither; a priority on an engine serving first come first
served, or above what a tenant may ask (tenants may lower their priority, not raise it over others').
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Annotated, Any, Literal

import msgspec

from agentserve.options import ProgramOptions, Tenant
from agentserve.programs.fields import Duration, ProgramFields

PRIORITY_LIMIT = 100  # priorities and tiers beyond +-this are clipped (Dynamo's are any integer)
PRIORITY_LEVELS = 2 * PRIORITY_LIMIT + 1  # one tier holds every priority
HEADER = b"x-agentserve-hints"
CONTAINERS = ("nvext", "agent_hint", "agent_hints", "kv_hints")  # body fields vLLM does not read (taken out)
PRIORITY, TTL, TOOL, OUTPUT, TIER = "priority", "ttl_s", "expected_tool_s", "output_tokens", "strict_priority"
PROGRAM_HINTS = (PRIORITY, OUTPUT, TTL, TOOL)  # the hints the agentserve object itself carries (ProgramFields)

Count = Annotated[int, msgspec.Meta(ge=0)]
# (convention field, hint it asks, its type, factor into agentserve's unit); None: read, not implemented
_LEAVES: dict[str, tuple[str | None, Any, float]] = {
    "nvext.agent_hints.priority": (PRIORITY, int, 1),
    "nvext.agent_hints.strict_priority": (TIER, int, 1),
    "nvext.agent_hints.osl": (OUTPUT, Count, 1),
    "nvext.agent_hints.speculative_prefill": (None, bool, 1),
    "agent_hint.cache_control.ttl": (TTL, Duration, 1),
    "agent_hint.cache_control.type": (None, Literal["ephemeral"], 1),
    "agent_hint.cache_control.block_offset": (None, Count, 1),
    "agent_hint.context_management": (None, dict, 1),
    "agent_hints.cache_ttl_ms": (TTL, Annotated[float, msgspec.Meta(ge=0, le=86_400_000)], 0.001),
    "agent_hints.expected_tool_duration_ms": (TOOL, Annotated[float, msgspec.Meta(ge=0, le=86_400_000)], 0.001),
}
_MARKERS = ("agent_hint.cache_control.type",)  # checked, not a hint of its own
_IDENTITY = ("agent_hint.session_id", "agent_hint.parent_session_id", "nvext.agent_context")  # sessions.py's
_VLLM_PRIORITY = "priority"
MAX_REPORTED = 32  # outcomes a response lists
_LABELS = {*_LEAVES, *(f"agentserve.{name}" for name in PROGRAM_HINTS), _VLLM_PRIORITY}
_TOKEN = re.compile(r"[^A-Za-z0-9._-]")


class HintError(ValueError):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class Outcome(msgspec.Struct, frozen=True):
    """What became of one hint: `detail` is the value used (clipped) or why (ignored)."""

    hint: str  # the convention's field as sent, e.g. "nvext.agent_hints.priority"
    status: Literal["applied", "clipped", "ignored"]
    detail: str = ""

    def header(self) -> str:
        return f"{self.hint}={self.status}" + (f":{self.detail}" if self.detail else "")


class HintRules(msgspec.Struct, frozen=True, kw_only=True):
    """What this server does with each hint (from its options: policies.py's row and the bounds)."""

    orders_by_priority: bool  # the scheduler plugin orders requests by priority (not stock FCFS)
    pins: bool  # its policy pins KV across tool calls
    predictive: bool  # its TTL rule reads tool-time predictions and the context size
    max_ttl_s: float  # no pin is longer (the server's bound)


class Judged(msgspec.Struct):
    """A request's hints judged: the fields carrying the applied values, the priority level for the
    engine (None: none asked or ignored), and the outcome of each hint read."""

    fields: ProgramFields | None
    priority_level: int | None
    outcomes: list[Outcome]


def take(data: dict, fields: ProgramFields | None, rules: HintRules) -> list[tuple[str, str | None, Any]]:
    """The hints of a body as (convention field, hint, value in agentserve's unit), in precedence order
    (the object's first); their containers are taken out of the body. HintError: a malformed one."""
    asked: list[tuple[str, str | None, Any]] = []
    if fields is not None:
        asked += [(f"agentserve.{name}", name, getattr(fields, name)) for name in PROGRAM_HINTS
                  if getattr(fields, name) is not None]
    for name in CONTAINERS:
        value = data.pop(name, None)
        if value is not None:
            asked += _envelope(value) if name == "kv_hints" else _leaves(name, value)
    if rules.orders_by_priority and data.get(_VLLM_PRIORITY) not in (None, 0):
        asked.append((_VLLM_PRIORITY, PRIORITY, -_checked(_VLLM_PRIORITY, data.pop(_VLLM_PRIORITY), int)))
    return asked


def _leaves(path: str, value: Any) -> Iterator[tuple[str, str | None, Any]]:
    if path in _IDENTITY:
        return
    leaf = _LEAVES.get(path)
    if leaf is not None:
        hint, kind, factor = leaf
        value = _checked(path, value, kind)
        if path not in _MARKERS:
            yield path, hint, value * factor if hint is not None and factor != 1 else value
        return
    if not any(k.startswith(path + ".") for k in (*_LEAVES, *_IDENTITY)):
        yield _TOKEN.sub("_", path)[:128], None, None  # a field nothing here reads
        return
    if not isinstance(value, dict):
        raise HintError(f"{path} must be an object", path)
    for key, item in value.items():
        if item is not None:
            yield from _leaves(f"{path}.{key}", item)


def _envelope(value: Any) -> list[tuple[str, str | None, Any]]:
    from vllm.v1.kv_hints import KvHintsEnvelope  # the engine's own type: the same checks as its

    try:
        envelope = msgspec.convert(value, KvHintsEnvelope)
    except msgspec.ValidationError as e:
        raise HintError(f"invalid kv_hints: {e}", "kv_hints") from None
    return [(f"kv_hints.actions.{_TOKEN.sub('_', a.action_type)[:64]}", None, None) for a in envelope.actions]


def _checked(path: str, value: Any, kind: Any) -> Any:
    try:
        return msgspec.convert(value, kind)
    except msgspec.ValidationError as e:
        raise HintError(f"invalid {path}: {e}", path) from None


def judge(asked: list[tuple[str, str | None, Any]], rules: HintRules, *, fields: ProgramFields | None,
          tenant: Tenant | None, max_tokens: int | None) -> Judged:
    """Each hint applied, clipped or ignored; `fields`: the request's program (None: a one-off),
    `max_tokens`: the request's output bound."""
    outcomes: list[Outcome] = []
    values: dict[str, Any] = {}
    for source, hint, value in asked:
        if hint is None:
            known = source in _LEAVES or source.startswith("kv_hints.")
            outcomes.append(Outcome(source, "ignored", "not-implemented" if known else "unknown"))
            continue
        if hint in values:
            outcomes.append(Outcome(source, "ignored", "superseded"))
            continue
        why = _why_not(hint, rules, fields)
        if why is not None:
            outcomes.append(Outcome(source, "ignored", why))
            continue
        used, clipped_by = _bounded(hint, value, rules, tenant, max_tokens)
        values[hint] = used
        outcomes.append(Outcome(source, "clipped", _show(used)) if clipped_by else Outcome(source, "applied"))
    level = None
    if PRIORITY in values or TIER in values:
        level = values.get(TIER, 0) * PRIORITY_LEVELS + values.get(PRIORITY, 0)
    if fields is not None:
        fields = msgspec.structs.replace(fields, priority=None, ttl_s=values.get(TTL), output_tokens=values.get(OUTPUT),
                                         expected_tool_s=values.get(TOOL))
    if len(outcomes) > MAX_REPORTED:  # a body of many unknown fields does not make a header of them all
        outcomes = [*outcomes[:MAX_REPORTED], Outcome("more", "ignored", str(len(outcomes) - MAX_REPORTED))]
    return Judged(fields, level, outcomes)


def _why_not(hint: str, rules: HintRules, fields: ProgramFields | None) -> str | None:
    """Why the hint cannot be applied to this request here (None: it can)."""
    if hint in (PRIORITY, TIER):
        return None if rules.orders_by_priority else "fcfs-engine"
    if fields is None:
        return "no-program"
    if not rules.pins:
        return "policy-pins-nothing"
    if fields.is_last_turn:
        return "last-turn"
    if hint in (TOOL, OUTPUT) and not rules.predictive:
        return "ttl-rule-reads-no-estimate"
    return None


def _bounded(hint: str, value: Any, rules: HintRules, tenant: Tenant | None,
             max_tokens: int | None) -> tuple[Any, bool]:
    """The value used and whether it was clipped to get there."""
    if hint in (PRIORITY, TIER):
        top = 0 if tenant is not None else PRIORITY_LIMIT  # a tenant may lower its priority, not raise it
        used = max(-PRIORITY_LIMIT, min(top, value))
    elif hint == TTL:
        cap = rules.max_ttl_s if tenant is None or tenant.max_ttl_s is None else min(rules.max_ttl_s, tenant.max_ttl_s)
        used = min(value, cap)
    elif hint == OUTPUT and max_tokens is not None:
        used = min(value, max_tokens)
    else:
        used = value
    return used, used != value


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def label(hint: str) -> str:
    """A hint's metric label: its convention field where this module knows it (labels stay a fixed set)."""
    if hint in _LABELS:
        return hint
    return "kv_hints.actions" if hint.startswith("kv_hints.") else "unknown"


def header_value(outcomes: list[Outcome]) -> bytes:
    return ", ".join(o.header() for o in outcomes).encode("latin-1")


def rules_for(options: ProgramOptions) -> HintRules:
    """What a server started with `options` does with each hint."""
    from agentserve import policies
    from agentserve.qualname import resolve

    policy = policies.get(options.policy)
    rule = resolve(policy.ttl) if policy.ttl is not None else None
    return HintRules(orders_by_priority=policy.plugin and options.order != "arrival", pins=rule is not None,
                     predictive=rule is not None and rule.predictive, max_ttl_s=options.max_ttl_s)
