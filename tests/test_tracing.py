"""Program traces: the control plane's events become GenAI-convention spans, in memory, no engine."""

from __future__ import annotations

import asyncio

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agentserve.observability.tracing import ProgramTracer, fan_out
from agentserve.programs.control import ControlPlane
from agentserve.programs.fields import ProgramFields
from agentserve.programs.tracker import ProgramTracker
from agentserve.ttl.policy import FixedTTL
from agentserve.ttl.predictor import ToolDurationPredictor


@pytest.fixture
def traced():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = ProgramTracer("tiny", tracer_provider=provider)
    sent = []

    async def link(command, payload):
        sent.append((command, payload))
        return {"events": [{"kind": "unpin", "program": payload.get("program_id"), "reason": "program_end",
                            "blocks": 3}]} if command == "end" else {}

    control = ControlPlane(ProgramTracker(), ToolDurationPredictor(), FixedTTL(5.0), link,
                             on_event=fan_out(lambda k, d: None, tracer.record))
    return control, tracer, exporter


def spans_by_name(exporter):
    return {s.name: s for s in exporter.get_finished_spans()}


def test_a_program_is_a_workflow_of_chat_and_tool_spans(traced):
    control, tracer, exporter = traced
    control.begin_call(ProgramFields(program_id="p"), 100, 10)
    assert tracer.chat_context("p")["traceparent"].startswith("00-")
    control.first_token("p", 0, 0.05, 100, 0)
    control.end_call("p", 110)
    control.tool_event("p", "bash", "start", None)
    control.tool_event("p", "bash", "end", 0.4)
    control.begin_call(ProgramFields(program_id="p"), 130, 10)
    control.first_token("p", 1, 0.01, 130, 96)
    control.end_call("p", 138)
    asyncio.run(control.end_program("p"))
    spans = exporter.get_finished_spans()
    names = [s.name for s in spans]
    assert names.count("chat tiny") == 2 and "execute_tool bash" in names
    by = spans_by_name(exporter)
    workflow, agent, tool = by["invoke_workflow p"], by["invoke_agent p"], by["execute_tool bash"]
    assert agent.parent.span_id == workflow.context.span_id and workflow.parent is None
    chats = [s for s in spans if s.name == "chat tiny"]
    assert all(c.parent.span_id == agent.context.span_id for c in chats)
    assert all(c.context.trace_id == workflow.context.trace_id for c in spans)
    second = max(chats, key=lambda c: c.attributes["agentserve.turn"])
    assert second.attributes["gen_ai.usage.cache_read.input_tokens"] == 96
    assert second.attributes["gen_ai.usage.input_tokens"] == 130
    assert second.attributes["gen_ai.usage.output_tokens"] == 8
    assert second.attributes["agentserve.ttl_s"] == 5.0 and second.attributes["gen_ai.operation.name"] == "chat"
    assert tool.attributes["agentserve.tool.actual_s"] == 0.4 and tool.attributes["gen_ai.tool.name"] == "bash"
    assert [e.name for e in agent.events] == ["unpin"] and agent.events[0].attributes["agentserve.reason"] == "program_end"
    assert len(tracer) == 0 and tracer.chat_context("p") == {}  # nothing survives the program


def test_sub_agent_nests_under_its_parent_and_abandoned_programs_close_their_spans(traced):
    control, tracer, exporter = traced
    control.begin_call(ProgramFields(program_id="root"), 50, 5)
    control.end_call("root", 55)
    control.begin_call(ProgramFields(program_id="kid", parent_program_id="root"), 40, 5)
    control.tool_event("kid", "search", "start", None)
    control.tool_event("kid", "search", "end", 1.5)
    asyncio.run(control.end_program("kid"))
    control.begin_call(ProgramFields(program_id="root"), 70, 5)  # still running when the program ends
    asyncio.run(control.end_program("root", reason="abandoned"))
    by = spans_by_name(exporter)
    kid, workflow = by["invoke_agent kid"], by["invoke_workflow root"]
    assert kid.parent.span_id == workflow.context.span_id and "invoke_workflow kid" not in by
    assert by["execute_tool search"].parent.span_id == kid.context.span_id
    unfinished = [s for s in exporter.get_finished_spans() if s.name == "chat tiny" and not s.status.is_ok]
    assert len(unfinished) == 2  # kid's call never ended, nor root's second
    assert workflow.attributes["agentserve.end_reason"] == "abandoned" and len(tracer) == 0
