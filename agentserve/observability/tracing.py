"""OpenTelemetry traces of agent programs, after the GenAI semantic conventions.

`ProgramTracer` turns the control plane's program events (`ControlPlane.on_event`) into spans, so
it needs no hook of its own and works the same on the embedded server and on Ray Serve:

    invoke_workflow {program}              a top-level program, from its first call to its end
      invoke_agent {program}               the program's own agent (a sub-agent: its own span, child of
        chat {model}                         the parent's workflow); one per LLM call: input, output and
        execute_tool {tool}                  cached tokens, TTFT, TTL given; one per reported tool call:
                                             predicted vs actual duration
Pin decisions of the engine (pin made, refused, released and why) are events on the agent span.
Spans of a program live until it ends (or is abandoned), then they are ended and forgotten: no span
state survives its program. `chat_context(program)` gives the context of a program's open chat span,
which the engine client passes to vLLM as its trace headers, so vLLM's own spans nest under it.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

TRACER_NAME = "agentserve"
SYSTEM = "agentserve"  # gen_ai.provider.name of our spans
# Engine event kinds worth a span event (the rest are counted in metrics only).
_PIN_EVENTS = {"engine_pin": "pin", "engine_pin_refused": "pin_refused", "engine_unpin": "unpin"}


@dataclass
class _ProgramSpans:
    workflow: Span | None  # None for a sub-agent (its agent span hangs under the parent's workflow)
    agent: Span
    calls: deque = field(default_factory=deque)  # open chat spans with their prompt size, oldest first
    tool: Span | None = None


class ProgramTracer:
    def __init__(self, model: str, tracer_provider=None):
        self.model = model
        self.tracer = trace.get_tracer(TRACER_NAME, tracer_provider=tracer_provider)
        self.programs: dict[str, _ProgramSpans] = {}

    def __len__(self) -> int:
        return len(self.programs)

    # ---- the event sink ----------------------------------------------------------------------
    def record(self, kind: str, data: dict) -> None:
        handler = getattr(self, "_on_" + kind, None)
        if handler is not None:
            handler(data)
        elif kind in _PIN_EVENTS and data.get("program") in self.programs:
            attrs = {f"agentserve.{k}": v for k, v in data.items()
                     if k not in ("kind", "program", "t") and isinstance(v, (str, int, float, bool))}
            self.programs[data["program"]].agent.add_event(_PIN_EVENTS[kind], attrs)

    def chat_context(self, program_id: str) -> dict[str, str]:
        """W3C trace headers (`traceparent`) of the program's latest open chat span."""
        spans = self.programs.get(program_id)
        if spans is None or not spans.calls:
            return {}
        carrier: dict[str, str] = {}
        ctx = trace.set_span_in_context(spans.calls[-1][0])
        TraceContextTextMapPropagator().inject(carrier, context=ctx)
        return carrier

    # ---- events -------------------------------------------------------------------------------
    def _program(self, program_id: str, parent: str | None) -> _ProgramSpans:
        spans = self.programs.get(program_id)
        if spans is not None:
            return spans
        attrs = {"gen_ai.provider.name": SYSTEM, "gen_ai.agent.id": program_id, "gen_ai.agent.name": program_id}
        parent_spans = self.programs.get(parent) if parent else None
        if parent_spans is not None:  # a sub-agent: under the parent's workflow
            root = parent_spans.workflow or parent_spans.agent
            ctx = trace.set_span_in_context(root)
            workflow = None
        else:
            workflow = self.tracer.start_span(f"invoke_workflow {program_id}", kind=SpanKind.INTERNAL,
                                              attributes={**attrs, "gen_ai.operation.name": "invoke_workflow"},
                                              context=otel_context.Context())
            ctx = trace.set_span_in_context(workflow)
        agent = self.tracer.start_span(f"invoke_agent {program_id}", kind=SpanKind.INTERNAL, context=ctx,
                                       attributes={**attrs, "gen_ai.operation.name": "invoke_agent",
                                                   **({"agentserve.parent_program_id": parent} if parent else {})})
        spans = self.programs[program_id] = _ProgramSpans(workflow, agent)
        return spans

    def _on_call_start(self, d: dict) -> None:
        spans = self._program(d["program"], d.get("parent"))
        chat = self.tracer.start_span(
            f"chat {self.model}", kind=SpanKind.CLIENT, context=trace.set_span_in_context(spans.agent),
            attributes={"gen_ai.operation.name": "chat", "gen_ai.provider.name": SYSTEM,
                        "gen_ai.request.model": self.model, "gen_ai.usage.input_tokens": d["prompt_tokens"],
                        "agentserve.turn": d["turn"], "agentserve.last_turn": bool(d.get("last"))})
        spans.calls.append((chat, d["prompt_tokens"]))

    def _latest_call(self, program_id: str) -> Span | None:
        spans = self.programs.get(program_id)
        return spans.calls[-1][0] if spans is not None and spans.calls else None

    def _on_ttl(self, d: dict) -> None:
        chat = self._latest_call(d["program"])
        if chat is not None:
            chat.set_attribute("agentserve.ttl_s", float(d["ttl_s"]))
            if d.get("predicted_tool_s") is not None:
                chat.set_attribute("agentserve.predicted_tool_s", float(d["predicted_tool_s"]))

    def _on_first_token(self, d: dict) -> None:
        chat = self._latest_call(d["program"])
        if chat is None:
            return
        chat.set_attribute("agentserve.ttft_s", float(d["ttft_s"]))
        chat.set_attribute("gen_ai.usage.input_tokens", int(d["prompt"]))
        if d.get("cached") is not None:
            chat.set_attribute("gen_ai.usage.cache_read.input_tokens", int(d["cached"]))

    def _on_call_end(self, d: dict) -> None:
        spans = self.programs.get(d["program"])
        if spans is None or not spans.calls:
            return
        chat, prompt = spans.calls.popleft()
        chat.set_attribute("gen_ai.usage.output_tokens", max(0, int(d["context_tokens"]) - prompt))
        chat.end()

    def _on_tool_start(self, d: dict) -> None:
        spans = self.programs.get(d["program"])
        if spans is not None:
            spans.tool = self._tool_span(spans, d["tool"], None)

    def _on_tool(self, d: dict) -> None:
        spans = self.programs.get(d["program"])
        if spans is None:
            return
        tool = spans.tool
        if tool is None:  # only the end was reported, with its duration: the span covers it
            start = time.time_ns() - int(float(d["actual_s"]) * 1e9)
            tool = self._tool_span(spans, d["tool"], start)
        tool.set_attribute("agentserve.tool.actual_s", float(d["actual_s"]))
        if d.get("predicted_s") is not None:
            tool.set_attribute("agentserve.tool.predicted_s", float(d["predicted_s"]))
        tool.end()
        spans.tool = None

    def _tool_span(self, spans: _ProgramSpans, name: str, start_ns: int | None) -> Span:
        return self.tracer.start_span(f"execute_tool {name}", kind=SpanKind.INTERNAL, start_time=start_ns,
                                      context=trace.set_span_in_context(spans.agent),
                                      attributes={"gen_ai.operation.name": "execute_tool",
                                                  "gen_ai.tool.name": name})

    def _on_program_end(self, d: dict) -> None:
        spans = self.programs.pop(d["program"], None)
        if spans is None:
            return
        reason = d.get("reason", "program_end")
        for chat, _ in spans.calls:  # calls still running when the program ended
            chat.set_status(Status(StatusCode.ERROR, f"program ended ({reason}) during the call"))
            chat.end()
        if spans.tool is not None:
            spans.tool.end()
        for span in (spans.agent, spans.workflow):
            if span is not None:
                span.set_attribute("agentserve.end_reason", reason)
                span.set_attribute("agentserve.llm_calls", int(d.get("turns", 0)))
                span.end()


def fan_out(*sinks):
    """One `on_event` callback feeding several sinks (metrics, tracer)."""

    def emit(kind: str, data: dict) -> None:
        for sink in sinks:
            sink(kind, data)

    return emit


def tracer_provider(otlp_endpoint: str | None):
    """Where program spans go: an OTLP (gRPC) collector at `otlp_endpoint`; without one, OpenTelemetry's
    global provider (a no-op unless the hosting process configured one), so tracing costs nothing
    when nobody collects."""
    if not otlp_endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": "agentserve"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint,
                                                                    insecure=otlp_endpoint.startswith("http://"))))
    return provider
