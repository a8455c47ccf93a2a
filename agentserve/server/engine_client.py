"""The engine client of agentserve's front ends: vLLM's, with every program request's `generate`
going through the program control plane (turn tracking, the TTL decision) and reporting its first
token, its end or its abort back. The embedded server and each Ray Serve replica wrap their vLLM engine
client in it; vLLM's OpenAI serving code sees an ordinary engine client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import msgspec

from agentserve.programs.control import TRACEPARENT, Control
from agentserve.programs.tracker import ProgramError
from agentserve.programs.fields import XARG_LIFE, XARG_TURN, ProgramFields, from_xargs
from agentserve.server import metrics
from agentserve.server.streams import track

log = logging.getLogger("agentserve.server")

SHUTDOWN_RELEASE_S = 5.0  # a graceful shutdown waits this long at most for the pins' release


def _running_loop():
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class ProgramEngineClient:
    """vLLM's engine client, with program requests routed through the program control plane (a
    `Control`: the server's own, or on Ray Serve the shared one)."""

    def __init__(self, engine, control: Control, *, release_at_shutdown: bool = True):
        self._engine = engine
        self.control = control
        self.release_at_shutdown = release_at_shutdown  # a remote control plane releases its own pins
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Future] = set()

    def shutdown(self, *args, **kwargs):
        """vLLM's launcher stops the engine on SIGTERM/SIGINT (from a worker thread): every pin is
        released first, while the engine still runs (a graceful shutdown leaves no pinned KV)."""
        on_loop = _running_loop() is self._loop
        if self.release_at_shutdown and not on_loop and self._loop.is_running():
            try:
                stats = asyncio.run_coroutine_threadsafe(self._release_all(), self._loop).result(
                    timeout=SHUTDOWN_RELEASE_S)
                released = sum(1 for e in stats.get("events", ()) if e["kind"] == "unpin")
                log.info("released %d pin(s) at shutdown", released)
            except Exception:  # noqa: BLE001 - shutting down regardless
                log.exception("could not release pins at shutdown")
        return self._engine.shutdown(*args, **kwargs)

    async def _release_all(self) -> dict:
        return await self.control.shutdown()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def generate(self, prompt, sampling_params, request_id, *args, **kwargs):
        """vLLM's `generate`, as a stream its HTTP request closes when the response ends (streams.py)."""
        return track(self._stream(prompt, sampling_params, request_id, *args, **kwargs))

    async def _stream(self, prompt, sampling_params, request_id, *args, **kwargs):
        metrics.ENGINE_STREAMS_OPEN.inc()  # a leak check's input (the soak): 0 once every response has ended
        stream = self._program_stream(prompt, sampling_params, request_id, *args, **kwargs)
        try:
            async for out in stream:
                yield out
        finally:
            try:
                await stream.aclose()  # at once, not at garbage collection: its end aborts and unpins
            finally:
                metrics.ENGINE_STREAMS_OPEN.dec()

    async def _program_stream(self, prompt, sampling_params, request_id, *args, **kwargs):
        program, life = await self._begin_call(prompt, sampling_params, kwargs)  # None: not a program's call
        out, finished, engine_ids, t0 = None, False, [], time.perf_counter()
        try:
            async for out in self._engine.generate(prompt, sampling_params, request_id, *args, **kwargs):
                if t0 is not None:  # the first output
                    engine_ids = self._engine_request_ids(request_id)
                    if program is not None:  # its TTFT and prefix hit
                        await self.control.first_token(
                            program.program_id, program.turn, time.perf_counter() - t0,
                            len(out.prompt_token_ids or ()), out.num_cached_tokens)
                    t0 = None
                finished = out.finished
                yield out
        finally:
            if not finished and engine_ids:
                # vLLM aborts a request whose stream is cancelled, but a disconnected client's stream is
                # cancelled through Starlette's anyio cancel scope, which re-delivers the cancellation
                # at every await, vLLM's own abort included: its message to the engine core can be
                # dropped after the front end forgot the request. This abort runs in a task of its own,
                # outside that scope, by the engine core's ids (the front end's mapping is gone by
                # then); the engine ignores an abort of a request it no longer has.
                self._background(self._engine.engine_core.abort_requests_async(engine_ids))
            if program is not None:
                context = ((len(out.prompt_token_ids or ()) + sum(len(o.token_ids) for o in out.outputs))
                           if out else 0)
                self._background(self._finish(program, life, context, aborted=not finished))

    async def _finish(self, call: ProgramFields, life: int | None, context: int, aborted: bool) -> None:
        """A program's call ended: the control plane hears it, then the abort (a client disconnect: the
        engine drops the pin too) and the program's end when the call said it was the last. `life`:
        the program's life the call began in, so that a call outliving its program's end does not
        touch the next life of the same id."""
        await self.control.end_call(call.program_id, context, life)
        if aborted:
            await self.control.abort_call(call.program_id, life)
        if call.ends_program:
            try:
                await self.control.end_program(call.program_id)
            except ProgramError:  # the client ended it too (POST /end), or it was reaped
                pass

    async def _begin_call(self, prompt, sampling_params, kwargs: dict) -> tuple[ProgramFields | None, int | None]:
        """A program's call (the middleware put its fields into extra_args): tell the control plane,
        attach the xargs it answers (TTL, turn, life) and the program's trace context. Returns the
        call's fields with the turn the server counted and the program's life, or (None, None) for a
        request with no program fields."""
        extra = sampling_params.extra_args or {}
        fields = from_xargs(extra)
        if fields is None:
            return None, None
        tokens = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None
        xargs = await self.control.begin_call(fields, len(tokens or ()), sampling_params.max_tokens or 0)
        traceparent = xargs.pop(TRACEPARENT, None)
        if traceparent is not None:  # vLLM's spans of this request nest under the program's chat span
            kwargs["trace_headers"] = {**(kwargs.get("trace_headers") or {}), "traceparent": traceparent}
        sampling_params.extra_args = {**extra, **xargs}
        return msgspec.structs.replace(fields, turn=xargs[XARG_TURN]), xargs.get(XARG_LIFE)

    def _engine_request_ids(self, request_id: str) -> list[str]:
        """The engine core's ids of a request (vLLM gives each request an internal id of its own)."""
        processor = getattr(self._engine, "output_processor", None)
        return list(getattr(processor, "external_req_ids", {}).get(request_id, ()))

    def _background(self, awaitable) -> None:
        """Run a control or abort call in a task of its own (held until done: the loop keeps only a
        weak reference), its failure logged, never raised into a request."""
        task = asyncio.ensure_future(self._safe(awaitable))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _safe(coro) -> None:
        try:
            await coro
        except Exception:  # noqa: BLE001 - a failed release is logged, never raised into a request
            log.exception("agentserve control call failed")
