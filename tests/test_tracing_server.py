"""Program traces from a real server: agentserve's spans and vLLM's own request spans reach an OTLP
collector (an in-process gRPC one here), and vLLM's span nests under the program's chat span."""

from __future__ import annotations

import os
import time
from concurrent import futures

import pytest

pytestmark = pytest.mark.slow


class Collector:
    """A minimal OTLP/gRPC trace collector: keeps every span it is sent."""

    def __init__(self):
        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        self.spans = []
        outer = self

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):  # noqa: N802 - the gRPC method name
                for resource in request.resource_spans:
                    for scope in resource.scope_spans:
                        outer.spans.extend(scope.spans)
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def named(self, prefix: str) -> list:
        return [s for s in self.spans if s.name.startswith(prefix)]


def test_program_spans_and_vllm_spans_reach_the_collector_nested():
    from agentserve.sdk import AgentServe
    from agentserve.server.process import ServerProcess

    collector = Collector()
    args = ["--model", "tiny", "--kv-tokens", "4096", "--max-model-len", "2048", "--policy", "fixed",
            "--otlp-traces-endpoint", f"http://127.0.0.1:{collector.port}"]
    env = {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
           "OTEL_BSP_SCHEDULE_DELAY": "200"}  # export batches every 0.2 s
    try:
        with ServerProcess(args, env=env) as srv:
            client = AgentServe(srv.base_url)
            with client.program("traced") as program:
                program.chat(model="tiny", max_tokens=4, messages=[{"role": "user", "content": "hello " * 80}])
                with program.tool("bash"):
                    time.sleep(0.1)
                program.chat(model="tiny", max_tokens=4, last=True,
                             messages=[{"role": "user", "content": "hello " * 80 + "again"}])
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and not (collector.named("invoke_workflow")
                                                       and len(collector.named("llm_request")) >= 2):
                time.sleep(0.2)
        chats = collector.named("chat tiny")
        workflow = collector.named("invoke_workflow traced")
        assert len(workflow) == 1 and len(chats) == 2 and len(collector.named("execute_tool bash")) == 1
        assert all(c.trace_id == workflow[0].trace_id for c in chats)
        vllm_spans = collector.named("llm_request")
        assert len(vllm_spans) >= 2, [s.name for s in collector.spans]
        chat_ids = {c.span_id for c in chats}
        assert all(v.parent_span_id in chat_ids for v in vllm_spans)  # vLLM's spans nest in ours
        cached = [a.value.int_value for c in chats for a in c.attributes
                  if a.key == "gen_ai.usage.cache_read.input_tokens"]
        assert len(cached) == 2 and cached[1] > 0  # the second turn hit the first one's KV
    finally:
        collector.server.stop(0)
