"""Program tracker (networkx DAG, lifecycle), wire fields, body rewriting and the control plane."""

import asyncio
import json

import pytest

from agentserve.programs.control import ControlPlane
from agentserve.programs.fields import XARG_PROGRAM, XARG_TTL, ProgramFields, ToolRun, from_xargs
from agentserve.programs.tracker import ProgramError, ProgramTracker
from agentserve.server.middleware import rewrite
from agentserve.ttl.policy import FixedTTL, OnlineBenefit
from agentserve.ttl.reload import ReloadProfile
from agentserve.ttl.predictor import ToolDurationPredictor


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_dag_records_llm_and_tool_nodes_in_order():
    clock = Clock()
    tr = ProgramTracker(clock=clock)
    tr.llm_start("p")
    tr.llm_end("p", context_tokens=100)
    tr.tool_start("p", "bash")
    clock.t = 1.5
    assert tr.tool_end("p", "bash") == 1.5
    turn, gap, _ = tr.llm_start("p")
    assert turn == 1 and gap is None  # the tool was reported: no server-side gap
    g = tr.get("p").graph
    assert list(g.edges) == [("llm:0", "tool:0:bash"), ("tool:0:bash", "llm:1")]
    import networkx as nx
    assert nx.is_directed_acyclic_graph(g)


def test_server_gap_when_the_client_reports_no_tool():
    clock = Clock()
    tr = ProgramTracker(clock=clock)
    tr.llm_start("p", tool="bash")
    tr.llm_end("p", context_tokens=10)
    clock.t = 0.7
    turn, gap, tool = tr.llm_start("p")
    assert (turn, gap, tool) == (1, pytest.approx(0.7), "bash")


def test_client_errors_are_4xx():
    tr = ProgramTracker()
    with pytest.raises(ProgramError) as e:
        tr.tool_start("nope", "bash")
    assert e.value.status == 404
    tr.llm_start("p")
    with pytest.raises(ProgramError) as e:
        tr.tool_end("p", "bash")
    assert e.value.status == 409
    tr.end("p")
    with pytest.raises(ProgramError):
        tr.end("p")


def test_subagents_and_abandonment_leave_nothing_behind():
    clock = Clock()
    tr = ProgramTracker(idle_timeout_s=10, clock=clock)
    tr.llm_start("parent")
    tr.llm_start("child", parent="parent")
    assert tr.get("parent").children == {"child"}
    tr.llm_end("parent", context_tokens=1)
    tr.llm_end("child", context_tokens=1)
    clock.t = 11
    assert sorted(p.program_id for p in tr.reap()) == ["child", "parent"]
    assert len(tr) == 0


def test_in_flight_program_is_not_reaped():
    clock = Clock()
    tr = ProgramTracker(idle_timeout_s=1, clock=clock)
    tr.llm_start("p")
    clock.t = 100
    assert tr.reap() == []


def test_rewrite_moves_fields_to_vllm_xargs():
    body = json.dumps({"model": "m", "messages": [], "agentserve": {"program_id": "p", "turn": 2}}).encode()
    out, _, err = rewrite(body)
    assert err is None
    data = json.loads(out)
    assert "agentserve" not in data and data["vllm_xargs"][XARG_PROGRAM] == "p"


@pytest.mark.parametrize("fields, param", [
    ({"turn": 1}, "agentserve.program_id"),
    ("p", "agentserve"),
    ({"program_id": 5}, "agentserve.program_id"),
    ({"program_id": "p", "turn": -1}, "agentserve.turn"),
    ({"program_id": "p", "colour": "red"}, "agentserve.colour"),
])
def test_rewrite_names_the_bad_field(fields, param):
    _, _, err = rewrite(json.dumps({"model": "m", "agentserve": fields}).encode())
    assert err.status_code == 400
    payload = json.loads(err.body)
    assert payload["error"]["param"] == param


@pytest.mark.parametrize("xargs", [{"agentserve_ttl_s": 1e9}, {"agentserve_program_id": "other"},
                                   {"agentserve_is_last_turn": False, "mine": 1}])
def test_a_clients_own_agentserve_xargs_are_refused(xargs):
    """They would reach the scheduler unchecked: a TTL past --max-ttl, another program's pin."""
    for extra in ({}, {"agentserve": {"program_id": "p"}}):
        _, _, err = rewrite(json.dumps({"model": "m", "vllm_xargs": xargs, **extra}).encode())
        assert err.status_code == 400 and json.loads(err.body)["error"]["param"] == "vllm_xargs"
    body = json.dumps({"model": "m", "vllm_xargs": {"mine": 1}}).encode()
    assert rewrite(body) == (body, [], None)  # other xargs are the client's own business


def test_a_body_is_decoded_once_and_encoded_once(monkeypatch):
    import msgspec

    from agentserve.options import TenantsConfig
    from agentserve.server.tenants import TenantGate

    calls = {"decode": 0, "encode": 0}
    decode, encode = msgspec.json.decode, msgspec.json.encode

    def counted(name, fn):
        def call(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(msgspec.json, "decode", counted("decode", decode))
    monkeypatch.setattr(msgspec.json, "encode", counted("encode", encode))
    gate = TenantGate(msgspec.convert({"tenants": [{"name": "a", "api_keys": ["k" * 16]}]}, TenantsConfig))
    body = json.dumps({"model": "m", "messages": [], "agentserve": {"program_id": "p", "turn": 1}}).encode()
    out, _, err = rewrite(body, tenant=gate.tenants["a"], gate=gate, admit=lambda t, p: True)
    assert err is None and calls == {"decode": 1, "encode": 1}
    assert json.loads(out)["vllm_xargs"][XARG_PROGRAM] == "a:p"


def test_bodies_without_agentserve_pass_untouched():
    for body in (b"{not json", b"[1,2]", b'{"model": "m"}'):
        assert rewrite(body) == (body, [], None)


def test_control_plane_with_a_fake_engine_link():
    sent = []

    async def link(command, payload):
        sent.append((command, payload))
        return {"pins": 0, "pinned_blocks": 0, "counters": {}, "events": []}

    clock = Clock()
    control = ControlPlane(ProgramTracker(idle_timeout_s=5, clock=clock), ToolDurationPredictor(),
                             FixedTTL(3.0), link)
    xargs = control.begin_call(ProgramFields(program_id="p"), prompt_tokens=100, max_tokens=10)
    assert xargs[XARG_TTL] == 3.0 and xargs[XARG_PROGRAM] == "p"
    last = control.begin_call(ProgramFields(program_id="q", is_last_turn=True), 10, 1)
    assert XARG_TTL not in last  # a last turn is never pinned
    control.end_call("p", 110)
    control.end_call("q", 11)
    clock.t = 10
    asyncio.run(control.tick())
    assert [c for c, _ in sent] == ["end", "end", "tick"]  # both abandoned programs ended
    assert len(control.tracker) == 0


def test_evicted_returning_turns_feed_T():
    control = ControlPlane(ProgramTracker(idle_timeout_s=60), ToolDurationPredictor(), FixedTTL(1.0), None)
    control.first_token("p", 0, ttft_s=5.0, prompt_tokens=100, cached_tokens=0)  # a first turn: no KV to lose
    control.first_token("p", 1, ttft_s=5.0, prompt_tokens=100, cached_tokens=90)  # a hit
    assert control.benefit.T == 0
    control.first_token("p", 2, ttft_s=2.5, prompt_tokens=100, cached_tokens=10)  # evicted: 2.5 s
    control.first_token("p", 3, ttft_s=1.5, prompt_tokens=100, cached_tokens=None)  # server says nothing
    assert control.benefit.T == pytest.approx(2.5)  # FixedTTL has no reload profile: nothing to subtract
    benefit = OnlineBenefit()
    benefit.observe_evicted_turn(2.0, 1000, ReloadProfile(a=0.0, b=0.001, c=0.0, max_tokens=4096))
    assert benefit.T == pytest.approx(1.0)  # 2 s to first token, 1 s of it the idle re-prefill


def test_tools_reported_with_the_next_call_enter_the_dag_and_the_predictor():
    clock = Clock()
    events = []
    control = ControlPlane(ProgramTracker(clock=clock), ToolDurationPredictor(), FixedTTL(1.0), None,
                           on_event=lambda kind, d: events.append((kind, d)))
    control.begin_call(ProgramFields(program_id="p", tool="bash"), 10, 1)
    control.end_call("p", 11)
    clock.t = 5.0  # the client reports 2 s of tools; the rest of the gap is the agent's own time
    fields = ProgramFields(program_id="p", tools_done=[ToolRun("bash", 1.5), ToolRun("grep", 0.5)])
    control.begin_call(fields, 20, 1)
    g = control.tracker.get("p").graph
    tools = [(d["name"], d["end"] - d["start"]) for _, d in g.nodes(data=True) if d["kind"] == "tool"]
    assert tools == [("bash", 1.5), ("grep", 0.5)]
    import networkx as nx
    assert nx.is_directed_acyclic_graph(g) and [n for n in nx.topological_sort(g)][-1] == "llm:1"
    # client-measured, and no server gap (5 s) counted for bash
    assert control.predictor.summary()["bash"] == {"samples": 1, "measured_by": "client", "mean_s": 1.5,
                                                    "predicts_from": control.predictor.distribution("bash").source}
    assert [d["tool"] for k, d in events if k == "tool"] == ["bash", "grep"]


def test_a_tool_report_for_a_program_the_server_lost_is_still_evidence():
    control = ControlPlane(ProgramTracker(), ToolDurationPredictor(), FixedTTL(1.0), None)
    control.begin_call(ProgramFields(program_id="new", tools_done=[ToolRun("setup", 3.0)]), 10, 1)
    assert control.predictor.summary()["setup"]["mean_s"] == 3.0
    assert [d["kind"] for _, d in control.tracker.get("new").graph.nodes(data=True)] == ["llm"]
    with pytest.raises(ProgramError) as e:  # the "ran" event needs a known program, as start and end do
        control.tool_event("gone", "bash", "ran", 1.0)
    assert e.value.status == 404
    assert control.tool_event("new", "bash", "ran", 1.0) == 1.0


def test_tools_done_travel_through_the_engine_xargs():
    body = json.dumps({"model": "m", "agentserve": {"program_id": "p", "tools_done": [
        {"name": "bash", "duration_s": 2.5}]}}).encode()
    out, _, err = rewrite(body)
    assert err is None
    assert from_xargs(json.loads(out)["vllm_xargs"]).tools_done == [ToolRun("bash", 2.5)]
    for bad in ([{"name": "bash"}], [{"name": "", "duration_s": 1}], [{"name": "b", "duration_s": -1}]):
        _, _, err = rewrite(json.dumps({"model": "m", "agentserve": {"program_id": "p", "tools_done": bad}}).encode())
        assert err.status_code == 400 and json.loads(err.body)["error"]["param"].startswith("agentserve.tools_done")


def test_an_inferred_program_ends_when_its_conversation_falls_silent_past_its_tools_p99():
    """Nobody ends an inferred program: the control plane ends it when it is silent for twice its tool's
    p99 (at least the floor), where a named one waits for the idle timeout."""
    from agentserve.programs.control import INFERRED_END_MIN_S

    clock = Clock()
    events = []
    control = ControlPlane(ProgramTracker(idle_timeout_s=600, clock=clock), ToolDurationPredictor(min_samples=2),
                           FixedTTL(1.0), None, on_event=lambda kind, d: events.append((kind, d)))
    for program, inferred in (("conv-1", True), ("named", False)):
        control.begin_call(ProgramFields(program_id=program, inferred=inferred), 10, 1)
        control.end_call(program, 11)
        control.begin_call(ProgramFields(program_id=program, inferred=inferred,
                                         tools_done=[ToolRun("bash", 4.0), ToolRun("bash", 6.0)]), 10, 1)
        control.end_call(program, 11)
    clock.t += 11.9  # twice the p99 (6 s) is 12 s
    asyncio.run(control.tick())
    assert control.knows("conv-1") and control.knows("named")
    clock.t += 0.2
    asyncio.run(control.tick())
    assert not control.knows("conv-1") and control.knows("named")
    assert ("program_end", {"program": "conv-1", "reason": "conversation_silent", "turns": 2}) in events
    assert control._silence_s(control.tracker.programs["named"]) == 600
    control.begin_call(ProgramFields(program_id="conv-2", inferred=True, tool="quick"), 10, 1)
    control.end_call("conv-2", 11)
    control.predictor.observe("quick", 0.1, client_measured=True)
    control.predictor.observe("quick", 0.1, client_measured=True)
    assert control._silence_s(control.tracker.programs["conv-2"]) == INFERRED_END_MIN_S
