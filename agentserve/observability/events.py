"""Where a control plane's program events go: Prometheus metrics and OpenTelemetry spans."""

from __future__ import annotations

from agentserve.options import ProgramOptions


def program_events(options: ProgramOptions, model: str):
    """(on_event sink, tracer) of a control plane: Prometheus metrics and OpenTelemetry spans."""
    from agentserve.observability.tracing import ProgramTracer, fan_out, tracer_provider
    from agentserve.server import metrics

    tracer = ProgramTracer(model, tracer_provider=tracer_provider(options.otlp_traces_endpoint))
    return fan_out(metrics.record_event, tracer.record), tracer
