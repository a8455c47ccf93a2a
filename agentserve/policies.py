"""The policies: one table of what each policy name means, for the server, the replay and the
simulator alike. Plain data; a policy's TTL rule is named by its import path and loaded on use, so
this table imports nothing of agentserve.

A serve policy is what `agentserve serve --policy` runs; a replay row (`serves` set) is a comparison
a replay or simulation runs with a serve policy underneath: `vllm+offload` (stock vLLM with the host
KV tier, what a user would deploy instead of agentserve), `oracle` (stock vLLM with a KV budget
nothing is evicted from: the bound any residency policy has) and `clairvoyant` (simulator only:
agentserve told the future, the headroom of better predictions; sim/clairvoyant.py). Adding a policy is an entry here and its TTL rule
in its own module (a `TTLPolicy` with a `build` classmethod, ttl/policy.py).
"""

from __future__ import annotations

import msgspec

from agentserve.qualname import resolve


class Policy(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    help: str
    plugin: bool  # the engine runs agentserve's scheduler plugin (program order, pins, admission)
    reload_profile: bool = False  # its TTL rule needs the re-prefill (and load-back) curves measured on the engine
    host_tier: bool = False  # served with the host KV tier unless --host-kv-tokens says otherwise
    ttl: str | None = None  # "module:Class" of its TTL rule (None: nothing is pinned)
    serves: str | None = None  # a replay row: the serve policy it runs with
    unbounded_kv: bool = False  # the oracle's KV budget: nothing is ever evicted
    clairvoyant: bool = False  # simulator only: the plan's truth in place of every prediction (headroom)


TABLE = (
    Policy(name="vllm", help="stock vLLM (plugin off, no pins, FCFS)", plugin=False),
    Policy(name="continuum", help="Continuum's published rule (2 s pin for short tools) with program FCFS",
           plugin=True, host_tier=True, ttl="agentserve.ttl.policy:ContinuumDemoTTL"),
    Policy(name="fixed", help="--fixed-ttl for every turn", plugin=True, host_tier=True,
           ttl="agentserve.ttl.policy:FixedTTL"),
    Policy(name="agentserve", help="the Continuum paper's TTL rule from the measured reload cost and learned tool "
           "durations", plugin=True, reload_profile=True, host_tier=True, ttl="agentserve.ttl.policy:CostBenefitTTL"),
    Policy(name="vllm+offload", help="stock vLLM with the host KV tier and vLLM's LRU", plugin=False,
           host_tier=True, serves="vllm"),
    Policy(name="oracle", help="stock vLLM with a KV budget nothing is evicted from", plugin=False, serves="vllm",
           unbounded_kv=True),
    Policy(name="clairvoyant", help="simulator only: agentserve told the plan's truth (each tool's duration, each "
           "program's remaining work) and evicting on both tiers by true next use", plugin=True, reload_profile=True,
           host_tier=True, ttl="agentserve.ttl.policy:CostBenefitTTL", serves="agentserve", clairvoyant=True),
)
POLICIES = {p.name: p for p in TABLE}
SERVE_POLICIES = tuple(p.name for p in TABLE if p.serves is None)


def get(name: str) -> Policy:
    """The policy `name`; ValueError naming the choices."""
    policy = POLICIES.get(name)
    if policy is None:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    return policy


def split(spec: str) -> tuple[Policy, list[str]]:
    """A replay spec `NAME+OPTION+...` as (its policy, its options): the longest policy name the spec
    starts with (`vllm+offload+replicas=2` is vllm+offload with one option)."""
    names = sorted((n for n in POLICIES if spec == n or spec.startswith(n + "+")), key=len)
    if not names:
        raise ValueError(f"unknown policy {spec.split('+')[0]!r} in {spec!r}; choose from {', '.join(POLICIES)}")
    name = names[-1]
    rest = spec[len(name) + 1:]
    return POLICIES[name], rest.split("+") if rest else []


def serve_help() -> str:
    return "; ".join(f"{p.name} = {p.help}" for p in TABLE if p.serves is None)


def make_ttl(name: str, **inputs):
    """The TTL rule of policy `name` built from what the control plane has (`TTLPolicy.build`'s
    keywords), or None for a policy that pins nothing."""
    policy = get(name)
    return None if policy.ttl is None else resolve(policy.ttl).build(**inputs)
