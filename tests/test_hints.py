"""Request hints (programs/hints.py): every convention in the shape its clients send it, read onto the
program fields, judged (applied, clipped, ignored) and reported; the control plane, the book and the TTL
rule acting on what was applied; and, on the real server, the header and the TTL a hint gets."""

from __future__ import annotations

import asyncio
import json

import httpx
import msgspec
import pytest

from agentserve.options import ProgramOptions, Tenant
from agentserve.programs import hints
from agentserve.programs.book import ProgramBook
from agentserve.programs.control import ControlPlane
from agentserve.programs.fields import (XARG_EXPECTED_TOOL, XARG_OUTPUT, XARG_PARENT, XARG_PRIORITY, XARG_PROGRAM,
                                        XARG_TTL, XARG_TTL_ASKED, ProgramFields, from_xargs)
from agentserve.programs.tracker import ProgramTracker
from agentserve.server.middleware import AgentFieldsMiddleware
from agentserve.server.tenants import TenantGate
from agentserve.options import SchedulerConfig, TenantsConfig
from agentserve.ttl.policy import CostBenefitTTL, FixedTTL, OnlineBenefit
from agentserve.ttl.predictor import ToolDurationPredictor
from agentserve.ttl.reload import ReloadProfile

RULES = hints.rules_for(ProgramOptions())  # the default server: plugin, the cost-benefit rule, 60 s bound
KEY = "k" * 16
TENANT = Tenant(name="acme", api_keys=[KEY], max_ttl_s=10.0)


class Engine:
    """An ASGI app that keeps each body and answers 200 (streamed or not)."""

    def __init__(self):
        self.bodies: list[dict] = []

    async def __call__(self, scope, receive, send):
        body = json.loads((await receive())["body"])
        self.bodies.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{}"})


def post(body: dict, *, rules: hints.HintRules = RULES, tenant: bool = False) -> tuple[int, dict, dict | None]:
    """(status, response headers, the body the engine got) for one request through the middleware."""
    engine = Engine()
    gate = TenantGate(TenantsConfig(tenants=[TENANT])) if tenant else None
    app = AgentFieldsMiddleware(engine, gate=gate, hint_rules=rules)
    raw, sent = json.dumps(body).encode(), []

    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    async def send(message):
        sent.append(message)

    headers = [(b"x-api-key", KEY.encode())] if tenant else []
    asyncio.run(app({"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": headers,
                     "raw_path": b""}, receive, send))
    start = sent[0]
    headers = {k.decode(): v.decode() for k, v in start.get("headers", ())}
    if start["status"] != 200:  # the error's body, for the test to read
        headers["body"] = b"".join(m.get("body", b"") for m in sent[1:]).decode()
    return start["status"], headers, engine.bodies[-1] if engine.bodies else None


def outcomes(headers: dict) -> dict[str, str]:
    return dict(item.split("=", 1) for item in headers[hints.HEADER.decode()].split(", "))


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64}


# -- each convention, as its clients send it ----------------------------------------------------------------------

def test_dynamos_agent_hints_set_the_priority_level_and_the_expected_output():
    status, headers, body = post({**CHAT, "session_id": "s", "nvext": {"agent_hints": {
        "priority": 5, "strict_priority": 1, "osl": 32, "speculative_prefill": True}}})
    assert status == 200 and "nvext" not in body  # taken out: vLLM does not read it
    xargs = body["vllm_xargs"]
    assert xargs[XARG_PRIORITY] == 1 * hints.PRIORITY_LEVELS + 5 and xargs[XARG_OUTPUT] == 32
    assert outcomes(headers) == {"nvext.agent_hints.priority": "applied", "nvext.agent_hints.strict_priority": "applied",
                                 "nvext.agent_hints.osl": "applied",
                                 "nvext.agent_hints.speculative_prefill": "ignored:not-implemented"}


def test_dynamos_agent_context_names_the_program_and_its_parent_when_the_parent_is_known():
    _, headers, body = post({**CHAT, "nvext": {"agent_context": {
        "workflow_type_id": "deep_research", "workflow_id": "run-42", "program_id": "run-42:researcher"}}})
    assert body["vllm_xargs"][XARG_PROGRAM] == "run-42:researcher" and "nvext" not in body
    assert hints.HEADER.decode() not in headers  # identity is no hint: nothing to report
    _, _, body = post({**CHAT, "nvext": {"agent_context": {"session_id": "run-42", "trajectory_id": "t-1",
                                                           "parent_trajectory_id": "t-0"}}})
    assert body["vllm_xargs"][XARG_PROGRAM] == "t-1" and body["vllm_xargs"][XARG_PARENT] == "t-0"


def test_the_vllm_rfcs_agent_hint_names_the_program_and_asks_a_ttl():
    _, headers, body = post({**CHAT, "agent_hint": {"session_id": "worker-7", "cache_control": {
        "type": "ephemeral", "ttl": 30}, "context_management": {"manage_request": True}}})
    fields = from_xargs(body["vllm_xargs"])
    assert fields.program_id == "worker-7" and fields.ttl_s == 30.0 and "agent_hint" not in body
    assert outcomes(headers) == {"agent_hint.cache_control.ttl": "applied",
                                 "agent_hint.context_management": "ignored:not-implemented"}


def test_sglangs_agent_hints_ask_a_ttl_and_tell_the_tools_duration_in_milliseconds():
    _, headers, body = post({**CHAT, "session_id": "s", "agent_hints": {
        "workflow_id": "wf", "step_id": "3", "expected_tool_duration_ms": 1500, "cache_ttl_ms": 4000}})
    xargs = body["vllm_xargs"]
    assert xargs[XARG_EXPECTED_TOOL] == 1.5 and xargs[XARG_TTL_ASKED] == 4.0
    assert outcomes(headers) == {"agent_hints.workflow_id": "ignored:unknown", "agent_hints.step_id": "ignored:unknown",
                                 "agent_hints.expected_tool_duration_ms": "applied", "agent_hints.cache_ttl_ms": "applied"}


def test_each_action_of_vllms_kv_hints_envelope_is_reported_ignored():
    envelope = {"protocol_version": "1", "message_id": "m1", "actions": [
        {"action_id": "a1", "action_type": "retain", "action_version": "1", "payload": {"ttl": 5}},
        {"action_id": "a2", "action_type": "x\r\nSet-Cookie: y", "action_version": "1", "payload": {}}]}
    status, headers, body = post({**CHAT, "kv_hints": envelope})
    assert status == 200 and "kv_hints" not in body
    assert outcomes(headers) == {"kv_hints.actions.retain": "ignored:not-implemented",
                                 "kv_hints.actions.x__Set-Cookie__y": "ignored:not-implemented"}


def test_vllms_own_priority_is_read_where_the_plugin_orders_and_left_to_vllm_where_it_does_not():
    _, headers, body = post({**CHAT, "priority": -3})  # vLLM's sense: lower first
    assert "priority" not in body and body["vllm_xargs"][XARG_PRIORITY] == 3  # a one-off's priority too
    assert outcomes(headers) == {"priority": "applied"}
    stock = hints.rules_for(ProgramOptions(policy="vllm"))
    _, headers, body = post({**CHAT, "priority": -3}, rules=stock)
    assert body == {**CHAT, "priority": -3} and hints.HEADER.decode() not in headers  # stock vLLM's request


def test_the_agentserve_objects_own_hints_come_first():
    _, headers, body = post({**CHAT, "agentserve": {"program_id": "p", "ttl_s": 3, "priority": 2},
                             "agent_hint": {"cache_control": {"ttl": 9}}})
    assert body["vllm_xargs"][XARG_TTL_ASKED] == 3.0 and body["vllm_xargs"][XARG_PRIORITY] == 2
    assert outcomes(headers) == {"agentserve.priority": "applied", "agentserve.ttl_s": "applied",
                                 "agent_hint.cache_control.ttl": "ignored:superseded"}


# -- bounded, clipped, overruled ---------------------------------------------------------------------------------

def test_a_ttl_past_the_tenants_cap_is_clipped_to_it_and_a_tenant_cannot_raise_its_priority():
    _, headers, body = post({**CHAT, "session_id": "s", "agent_hint": {"cache_control": {"ttl": 3600}},
                             "nvext": {"agent_hints": {"priority": 50, "osl": 4096}}}, tenant=True)
    xargs = body["vllm_xargs"]
    assert xargs[XARG_TTL_ASKED] == TENANT.max_ttl_s and xargs[XARG_PRIORITY] == 0 and xargs[XARG_OUTPUT] == 64
    assert outcomes(headers) == {"agent_hint.cache_control.ttl": "clipped:10", "nvext.agent_hints.priority": "clipped:0",
                                 "nvext.agent_hints.osl": "clipped:64"}
    _, headers, _ = post({**CHAT, "nvext": {"agent_hints": {"priority": -7}}}, tenant=True)
    assert outcomes(headers) == {"nvext.agent_hints.priority": "applied"}  # lowering its own is its right


def test_without_tenants_ttl_is_bounded_by_the_servers_max_and_priority_by_the_limit():
    _, headers, body = post({**CHAT, "session_id": "s", "agent_hints": {"cache_ttl_ms": 3_600_000},
                             "nvext": {"agent_hints": {"priority": -1000}}})
    assert body["vllm_xargs"][XARG_TTL_ASKED] == RULES.max_ttl_s
    assert body["vllm_xargs"][XARG_PRIORITY] == -hints.PRIORITY_LIMIT
    assert outcomes(headers) == {"agent_hints.cache_ttl_ms": "clipped:60", "nvext.agent_hints.priority": "clipped:-100"}


@pytest.mark.parametrize("body, rules, expected", [
    # a one-off has no program to keep KV for
    ({"agent_hint": {"cache_control": {"ttl": 5}}}, RULES, {"agent_hint.cache_control.ttl": "ignored:no-program"}),
    # a last turn is not pinned: a TTL would keep KV nobody will read
    ({"agentserve": {"program_id": "p", "is_last_turn": True}, "agent_hint": {"cache_control": {"ttl": 5}}}, RULES,
     {"agent_hint.cache_control.ttl": "ignored:last-turn"}),
    # stock vLLM pins nothing and serves first come first served
    ({"session_id": "s", "agent_hint": {"cache_control": {"ttl": 5}}, "nvext": {"agent_hints": {"priority": 1}}},
     hints.rules_for(ProgramOptions(policy="vllm")),
     {"agent_hint.cache_control.ttl": "ignored:policy-pins-nothing", "nvext.agent_hints.priority": "ignored:fcfs-engine"}),
    # a fixed TTL rule reads no tool estimate: the hint would change nothing
    ({"session_id": "s", "agent_hints": {"expected_tool_duration_ms": 100}}, hints.rules_for(ProgramOptions(policy="fixed")),
     {"agent_hints.expected_tool_duration_ms": "ignored:ttl-rule-reads-no-estimate"}),
    # program order off ("arrival"): the plugin orders first come first served
    ({"nvext": {"agent_hints": {"priority": 1}}}, hints.rules_for(ProgramOptions(order="arrival")),
     {"nvext.agent_hints.priority": "ignored:fcfs-engine"}),
])
def test_a_hint_that_would_be_overruled_is_reported_ignored_and_not_sent_on(body, rules, expected):
    _, headers, sent = post({**CHAT, **body}, rules=rules)
    assert outcomes(headers) == expected
    xargs = sent.get("vllm_xargs") or {}
    assert XARG_TTL_ASKED not in xargs and XARG_PRIORITY not in xargs and XARG_EXPECTED_TOOL not in xargs


@pytest.mark.parametrize("body, param", [
    ({"nvext": "fast"}, "nvext"),
    ({"nvext": {"agent_hints": {"priority": "high"}}}, "nvext.agent_hints.priority"),
    ({"nvext": {"agent_hints": {"osl": -1}}}, "nvext.agent_hints.osl"),
    ({"agent_hint": {"cache_control": {"ttl": -5}}}, "agent_hint.cache_control.ttl"),
    ({"agent_hint": {"cache_control": {"type": "persistent"}}}, "agent_hint.cache_control.type"),
    ({"agent_hints": {"cache_ttl_ms": "1h"}}, "agent_hints.cache_ttl_ms"),
    ({"kv_hints": {"actions": []}}, "kv_hints"),
    ({"priority": 1.5}, "priority"),
])
def test_a_malformed_hint_is_a_400_naming_it(body, param):
    status, headers, sent = post({**CHAT, "session_id": "s", **body})
    assert status == 400 and sent is None
    assert json.loads(headers["body"])["error"]["param"] == param


def test_a_body_of_many_unknown_fields_gets_a_bounded_report():
    _, headers, _ = post({**CHAT, "nvext": {f"field{i}": i for i in range(100)}})
    report = outcomes(headers)
    assert len(report) == hints.MAX_REPORTED + 1 and report["more"] == f"ignored:{100 - hints.MAX_REPORTED}"


# -- what applied hints do ---------------------------------------------------------------------------------------

def _control(policy) -> ControlPlane:
    async def link(command, payload):
        return {}

    return ControlPlane(ProgramTracker(), policy.predictor if hasattr(policy, "predictor") else ToolDurationPredictor(),
                        policy, link)


def _cost_benefit() -> CostBenefitTTL:
    reload = ReloadProfile(a=0.0, b=0.001, c=0.0, max_tokens=100_000)  # 1 s per 1,000 tokens
    return CostBenefitTTL(ToolDurationPredictor(min_samples=3), reload, OnlineBenefit())


def test_the_asked_ttl_replaces_the_policys_choice():
    control = _control(FixedTTL(2.0))
    assert control.begin_call(ProgramFields(program_id="p", ttl_s=7.5), 100, 10)[XARG_TTL] == 7.5
    assert control.begin_call(ProgramFields(program_id="q"), 100, 10)[XARG_TTL] == 2.0


def test_a_told_tool_duration_beats_the_tools_history_and_the_output_length_sizes_the_context():
    policy = _cost_benefit()
    for _ in range(5):  # the tool's history: 0.1 s runs, worth pinning a 2,000-token context for
        policy.predictor.observe("bash", 0.1, client_measured=True)
    control = _control(policy)
    assert control.begin_call(ProgramFields(program_id="p", tool="bash"), 1000, 1000)[XARG_TTL] == pytest.approx(0.1)
    # the client says this run takes 30 s: not worth a 2 s re-prefill
    assert control.begin_call(ProgramFields(program_id="q", tool="bash", expected_tool_s=30.0), 1000, 1000)[XARG_TTL] == 0
    # told 0.5 s: tau = mu ln(B / mu); the expected output (100, not max_tokens 9,000) sizes B
    xargs = control.begin_call(ProgramFields(program_id="r", tool="bash", expected_tool_s=0.5, output_tokens=100),
                               1000, 9000)
    assert xargs[XARG_TTL] == pytest.approx(0.5 * __import__("math").log(1.1 / 0.5))


def test_a_priority_level_goes_before_every_rank_in_the_books_order():
    book = ProgramBook(SchedulerConfig(), total_blocks=100, block_size=32, max_model_len=4096, clock=lambda: 0.0)
    first = book.arrive_request("a", {XARG_PROGRAM: "A"}, 10)
    later = book.arrive_request("b", {XARG_PROGRAM: "B", XARG_PRIORITY: 1}, 10)
    one_off = book.arrive_request("c", {XARG_PRIORITY: -1}, 10)
    assert later < first < one_off and book.counters["priority_hints"] == 2


def test_the_rules_follow_the_servers_options():
    assert RULES == hints.HintRules(orders_by_priority=True, pins=True, predictive=True, max_ttl_s=60.0)
    assert hints.rules_for(ProgramOptions(policy="continuum", max_ttl_s=5)) == hints.HintRules(
        orders_by_priority=True, pins=True, predictive=False, max_ttl_s=5.0)


# -- the real server ---------------------------------------------------------------------------------------------

def _ttl_sum(base_url: str) -> float:
    text = httpx.get(base_url + "/metrics", timeout=30).text
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("agentserve_ttl_seconds_sum"))


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_on_the_real_server_the_response_says_what_became_of_each_hint_and_the_pin_gets_the_ttl(server, stream):
    before = _ttl_sum(server.base_url)
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        with client.stream("POST", "/v1/chat/completions", json={
                "model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "stream": stream,
                "agent_hint": {"session_id": f"hinted-{stream}", "cache_control": {"type": "ephemeral", "ttl": 7.5}},
                "nvext": {"agent_hints": {"priority": 3, "speculative_prefill": True}}}) as r:
            r.read()
            assert r.status_code == 200, r.text
            report = outcomes(dict(r.headers))
        client.post(f"/v1/programs/hinted-{stream}/end")
    assert report == {"agent_hint.cache_control.ttl": "applied", "nvext.agent_hints.priority": "applied",
                      "nvext.agent_hints.speculative_prefill": "ignored:not-implemented"}
    assert _ttl_sum(server.base_url) - before == pytest.approx(7.5)
    metrics = httpx.get(server.base_url + "/metrics", timeout=30).text
    assert 'agentserve_hints_total{hint="agent_hint.cache_control.ttl",outcome="applied"}' in metrics
    stats = httpx.get(server.base_url + "/v1/agentserve/stats", timeout=30).json()
    assert stats["hints"]["nvext.agent_hints.speculative_prefill"]["ignored"] >= 1
    assert stats["engine"]["counters"]["priority_hints"] >= 1  # the level reached the engine's book


def test_the_sdk_sends_a_turns_hints_in_its_object_and_refuses_unknown_ones():
    from agentserve.sdk import _ProgramState

    state = _ProgramState("p", None)
    request = state.chat_kwargs({"model": "m"}, "bash", False, hints={"ttl_s": 4.0, "expected_tool_s": 2.5})
    assert request["extra_body"]["agentserve"] == {"program_id": "p", "turn": 0, "is_last_turn": False,
                                                   "ttl_s": 4.0, "expected_tool_s": 2.5, "tool": "bash"}
    with pytest.raises(ValueError, match="cache_ttl"):
        state.chat_kwargs({"model": "m"}, None, False, hints={"cache_ttl": 4})


@pytest.mark.slow
def test_an_sdk_turns_ttl_hint_is_its_pins_ttl_on_the_real_server(server):
    from agentserve.sdk import AgentServe

    before = _ttl_sum(server.base_url)
    client = AgentServe(server.base_url)
    try:
        with client.program() as prog:
            prog.chat(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2, hints={"ttl_s": 3.25})
            prog.chat(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2, end=True,
                      hints={"ttl_s": 3.25})  # a last turn: not pinned, nothing chosen
    finally:
        client.close()
    assert _ttl_sum(server.base_url) - before == pytest.approx(3.25)


@pytest.mark.parametrize("hinted, expected", [(True, ["A", "C", "B"]), (False, ["A", "B", "C"])])
def test_a_priority_hint_lets_a_later_request_go_first_in_vllms_scheduler(both_schedulers, hinted, expected):
    """vLLM's real scheduler with the plugin, one seat: A runs; B arrives, then C with a priority level.
    C is served before B, which arrived first (program order serves B first without the hint)."""
    import time

    from vllm import SamplingParams
    from vllm.v1.request import Request

    from agentserve.engine import offline
    from agentserve.engine.settings import EngineSettings

    settings = EngineSettings(model="tiny", kv_tokens=4096, max_model_len=2048, max_num_seqs=1,
                              scheduling_policy="priority", scheduler_cls="agentserve.engine.scheduler.ProgramScheduler",
                              additional_config={"agentserve": {"max_wait_s": 60.0}})
    scheduler, hasher = offline.build_scheduler(settings)

    def request(rid: str, base: int, xargs: dict) -> Request:
        params = SamplingParams(max_tokens=4, ignore_eos=True, extra_args=xargs or None)
        return Request(rid, [(base + i) % 3900 + 10 for i in range(64)], params, None, arrival_time=time.time(),
                       block_hasher=hasher)

    scheduler.add_request(request("A", 0, {}))
    finished = offline.step(scheduler, lambda: 7)[1]  # A takes the one seat
    scheduler.add_request(request("B", 1000, {}))
    scheduler.add_request(request("C", 2000, {XARG_PRIORITY: 5} if hinted else {}))
    while scheduler.has_requests():
        finished += offline.step(scheduler, lambda: 7)[1]
    assert finished == expected
