"""The program engine client around a fake vLLM engine: a stream that ends unfinished (a client
that went away) is aborted in the engine core by its internal ids, even when vLLM's own abort on
cancellation did not get through (see ProgramEngineClient.generate)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from agentserve.server.engine_client import ProgramEngineClient


class FakeEngine:
    """vLLM's AsyncLLM as far as the client uses it: generate, the front end's id map, the core's abort."""

    def __init__(self, outputs: int):
        self.outputs = outputs
        self.aborted: list[list[str]] = []
        self.output_processor = SimpleNamespace(external_req_ids={})
        self.engine_core = SimpleNamespace(abort_requests_async=self._abort)

    async def _abort(self, ids):
        self.aborted.append(list(ids))

    async def generate(self, prompt, params, request_id, *args, **kwargs):
        self.output_processor.external_req_ids[request_id] = [request_id + "-internal"]
        try:
            for k in range(self.outputs):
                await asyncio.sleep(0)
                yield SimpleNamespace(finished=k == self.outputs - 1)
        finally:  # like vLLM after its own abort: the front end forgets the request (the core may not)
            self.output_processor.external_req_ids.pop(request_id, None)


def consume(outputs: int, take: int) -> FakeEngine:
    async def main():
        engine = FakeEngine(outputs)
        client = ProgramEngineClient(engine, control=None)
        stream = client.generate({"prompt_token_ids": [1, 2]}, SimpleNamespace(extra_args=None), "r1")
        for _ in range(take):
            await stream.__anext__()
        await stream.aclose()  # the client went away (or, with take == outputs, all was read)
        await asyncio.sleep(0.01)  # the abort runs in a task of its own
        return engine

    return asyncio.run(main())


def test_a_stream_left_unfinished_is_aborted_in_the_engine_core_by_its_internal_id():
    assert consume(outputs=10, take=3).aborted == [["r1-internal"]]


def test_a_finished_stream_is_not_aborted():
    assert consume(outputs=3, take=3).aborted == []


def test_the_http_scope_closes_a_stream_its_response_abandoned():
    """The middleware's scope (streams.py) closes what the response left open: the engine request is
    aborted even when nothing else ever closes the stream."""
    from agentserve.server.streams import request_streams

    async def main():
        engine = FakeEngine(10)
        client = ProgramEngineClient(engine, control=None)
        async with request_streams():
            stream = client.generate({"prompt_token_ids": [1]}, SimpleNamespace(extra_args=None), "r2")
            await stream.__anext__()  # ... and the response stops reading it (client gone)
        await asyncio.sleep(0.01)
        return engine, stream

    engine, stream = asyncio.run(main())
    assert engine.aborted == [["r2-internal"]]
    assert stream.ag_frame is None  # closed, not waiting for a garbage collection
