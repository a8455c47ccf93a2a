"""agentserve's Prometheus metrics, served on `/metrics` next to vLLM's (same default registry).

Every pin decision is counted: created / refused, released by reason (consumed, expired, pressure,
program_end, abort, replaced, cap), pinned blocks now, tokens served from pinned KV, TTLs chosen, and
predicted vs actual tool durations.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_TIME_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 300)

PINS_CREATED = Counter("agentserve_pins_created", "KV pins created (a program's turn finished, TTL > 0)")
PINS_REFUSED = Counter("agentserve_pins_refused", "KV pins refused (pin cap held by earlier programs)")
PINS_RELEASED = Counter("agentserve_pins_released", "KV pins released, by reason", ["reason"])
PINNED_BLOCKS = Gauge("agentserve_pinned_blocks", "KV blocks held by pins now")
COMMANDS_PENDING = Gauge("agentserve_control_commands_pending",
                         "ends and releases queued for Ray Serve replicas that they have not carried out yet")
PINS_NOW = Gauge("agentserve_pins", "Pins outstanding now")
PINNED_TOKENS_SERVED = Counter("agentserve_pinned_tokens_served", "Prompt tokens served from pinned KV")
REQUESTS_AGED = Counter("agentserve_requests_aged", "Requests that waited past --max-wait behind earlier "
                        "programs and were then served in arrival order")
SUB_AGENTS_BY_WORKFLOW = Counter("agentserve_sub_agents_ranked_by_workflow", "Sub-agents whose requests took "
                                 "their workflow's rank (--order other than program)")
PRIORITY_HINTS = Counter("agentserve_priority_hints", "Requests the engine ordered by a priority hint's level "
                         "ahead of program rank (programs/hints.py)")
PINS_HELD_FOR_SUB_AGENTS = Counter("agentserve_pins_held_for_sub_agents", "Pins kept past their TTL because "
                                   "their program's sub-agents were live (the prefix they fork from)")
REQUESTS_OUTLIVING_PROGRAM_END = Counter(
    "agentserve_requests_outliving_program_end", "Requests that left the engine after their program ended "
    "(still running at the end, or arrived after it): served as one-offs, no pin, rank or next use kept")
BLOCKS_DEMOTED = Counter("agentserve_blocks_demoted", "KV blocks of programs paused by working-set admission "
                         "moved to the front of vLLM's free queue (evicted before other cached blocks; the host tier "
                         "keeps a copy)")
BLOCKS_EVICTED_FIRST = Counter("agentserve_blocks_evicted_first", "KV blocks computed by one-off requests and last "
                               "turns moved to the front of vLLM's free queue (--one-off-blocks evict-first)")
ADMISSION = Counter("agentserve_admission_decisions", "Working-set admission (--admission-mode), by reason: "
                    "admitted, admitted_idle (nothing else admitted), admitted_uncontended (auto, not contended), "
                    "admitted_displacing (later programs paused for it), admitted_overdue (past --admission-max-hold: "
                    "a guest), resumed, paused, joined_workflow, ended, expired_idle, contention_on, contention_off, "
                    "guests_at_contention", ["reason"])
PROGRAM_REQUESTS = Counter("agentserve_program_requests", "LLM requests of programs, by what named the "
                           "program: agentserve (the object), session_id, x-session-id, vllm_xargs.session_id, "
                           "metadata.session_id, agent_hint.session_id, nvext.agent_context, metadata.user_id (its session), inferred (the conversation it continues)", ["named_by"])
HINTS = Counter("agentserve_hints", "Request hints read (programs/hints.py), by convention field (unknown: one "
                "nothing here reads; kv_hints.actions: an action of vLLM's envelope) and outcome: applied, clipped "
                "(to the value used) or ignored", ["hint", "outcome"])
CONVERSATION_TURNS = Counter("agentserve_conversation_turns", "Chat requests naming no program, by what the "
                             "conversation index made of them: first (a one-off, until a next turn continues it), "
                             "continued, resent (the same turn sent again), forked (a second, different extension of "
                             "one answer), over_limit (an inferred program its tenant had no room for: a one-off)",
                             ["kind"])
ROUTING = Counter("agentserve_routing_decisions", "Replica choices of the program-affinity router (Ray Serve, "
                  "router affinity), by decision: home (the program's replica, where its KV is), new (a new program, "
                  "by load), moved (its replica gone: by load), unnamed (a request of no program, by load), "
                  "fallback (a program's call served on another replica than its home: Serve's fallback under "
                  "backpressure, or another router's choice; its home moves there)",
                  ["decision"])
ENGINE_STREAMS_OPEN = Gauge("agentserve_engine_streams_open", "LLM requests the front end is generating now "
                            "(streamed or not): 0 once every response has ended or its client has gone")
PROGRAMS_LIVE = Gauge("agentserve_programs_live", "Programs being tracked now")
PROGRAMS_ENDED = Counter("agentserve_programs_ended", "Programs ended, by reason", ["reason"])
TTL_CHOSEN = Histogram("agentserve_ttl_seconds", "TTL chosen for a turn's pin", buckets=(0,) + _TIME_BUCKETS)
TOOL_ACTUAL = Histogram("agentserve_tool_actual_seconds", "Reported tool-call durations", buckets=_TIME_BUCKETS)
TOOL_PREDICTED = Histogram("agentserve_tool_predicted_seconds", "Predicted (mean) duration of each reported "
                           "tool call, before it was observed", buckets=_TIME_BUCKETS)
TOOL_ABS_ERROR = Histogram("agentserve_tool_prediction_abs_error_seconds",
                           "|predicted - actual| tool-call duration", buckets=_TIME_BUCKETS)

TTL_T = Gauge("agentserve_ttl_T_seconds", "T of the TTL rule: extra first-token delay of evicted turns")
TTL_ETA = Gauge("agentserve_ttl_eta", "eta of the TTL rule: -Corr(turns served, turns left)")

KVSHARE_DECISIONS = Counter("agentserve_kvshare_decisions", "KV-sharing planner decisions on sharing requests, "
                            "by reason (reused, cached, no_base, new_template, template_changed, "
                            "anchors_refused, produced, recorded, recomputed)", ["reason"])
KVSHARE_TOKENS_REUSED = Counter("agentserve_kvshare_tokens_reused", "Prompt tokens whose KV was reused from "
                                "shared segments (not prefilled)")
KVSHARE_SEGMENTS = Gauge("agentserve_kvshare_segments", "Shared segments whose base KV is held now")
KVSHARE_SEGMENT_BYTES = Gauge("agentserve_kvshare_segment_bytes", "Bytes of shared segments' base KV held now")
CROSS_MODEL_REQUESTS = Counter("agentserve_kvshare_cross_model_requests", "Requests for the cross-model "
                               "variant (--cross-model), by reason (reused, no_sender_prefix)", ["reason"])
CROSS_MODEL_TOKENS_REUSED = Counter("agentserve_kvshare_cross_model_tokens_reused", "Prompt tokens of the "
                                    "cross-model variant served from the sender's KV (layers outside the "
                                    "recomputed group)")
KVSHARE_ANCHORS = Gauge("agentserve_kvshare_anchors", "KVCOMM anchors held now, all templates and placeholders")

_last_engine_counters: dict[str, float] = {}
# the scheduler plugin's counters that map one to one onto a Prometheus counter
_ENGINE_COUNTERS = {"pins_created": PINS_CREATED, "pins_refused": PINS_REFUSED,
                    "pinned_tokens_served": PINNED_TOKENS_SERVED, "requests_aged": REQUESTS_AGED,
                    "sub_agents_ranked_by_workflow": SUB_AGENTS_BY_WORKFLOW, "priority_hints": PRIORITY_HINTS,
                    "pins_held_for_sub_agents": PINS_HELD_FOR_SUB_AGENTS,
                    "requests_outliving_program_end": REQUESTS_OUTLIVING_PROGRAM_END,
                    "blocks_demoted": BLOCKS_DEMOTED, "blocks_evicted_first": BLOCKS_EVICTED_FIRST}
_last_kvshare_counters: dict[str, float] = {}


def record_kvshare_stats(stats: dict) -> None:
    """Fold the KV-sharing planner's cumulative counts (connector.stats()) into Prometheus."""
    KVSHARE_SEGMENTS.set(stats["segments"])
    KVSHARE_SEGMENT_BYTES.set(stats["segment_bytes"])
    KVSHARE_ANCHORS.set(stats["anchors"])
    for name, value in {**stats["decisions"], "tokens_reused": stats["tokens_reused"]}.items():
        delta = value - _last_kvshare_counters.get(name, 0)
        _last_kvshare_counters[name] = value
        if delta > 0:
            (KVSHARE_TOKENS_REUSED if name == "tokens_reused" else KVSHARE_DECISIONS.labels(name)).inc(delta)


def record_ttl_inputs(inputs: dict) -> None:
    TTL_T.set(inputs["T_s"])
    TTL_ETA.set(inputs["eta"])


TIER_DECISIONS = Counter("agentserve_tier_decisions", "Where a finished turn's KV waits for the next turn "
                         "(device: pinned; host: left to the host tier; drop)", ["decision"])


def record_event(kind: str, data: dict) -> None:
    if kind == "ttl":
        TTL_CHOSEN.observe(data["ttl_s"])
        TIER_DECISIONS.labels(data["tier"]).inc()
    elif kind == "tool":
        TOOL_ACTUAL.observe(data["actual_s"])
        if data.get("predicted_s") is not None:
            TOOL_PREDICTED.observe(data["predicted_s"])
            TOOL_ABS_ERROR.observe(abs(data["predicted_s"] - data["actual_s"]))
    elif kind == "program_end":
        PROGRAMS_ENDED.labels(data["reason"]).inc()


def record_engine_stats(stats: dict) -> None:
    """Fold the scheduler plugin's cumulative counters into the Prometheus counters."""
    if not stats:
        return
    PINNED_BLOCKS.set(stats["pinned_blocks"])
    PINS_NOW.set(stats["pins"])
    if "commands_pending" in stats:  # a Ray Serve app's control plane
        COMMANDS_PENDING.set(stats["commands_pending"])
    for name, value in stats["counters"].items():
        delta = value - _last_engine_counters.get(name, 0)
        _last_engine_counters[name] = value
        if delta <= 0:
            continue
        if (counter := _ENGINE_COUNTERS.get(name)) is not None:
            counter.inc(delta)
        elif name.startswith("admission_"):
            ADMISSION.labels(name.removeprefix("admission_")).inc(delta)
        elif name.startswith("pins_released_"):
            PINS_RELEASED.labels(name.removeprefix("pins_released_")).inc(delta)


def hint_counts() -> dict[str, dict[str, int]]:
    """The request hints this process judged: {convention field: {outcome: count}} (the stats route's)."""
    out: dict[str, dict[str, int]] = {}
    for metric in HINTS.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                out.setdefault(sample.labels["hint"], {})[sample.labels["outcome"]] = int(sample.value)
    return out
