"""Engine streams of one HTTP request, closed when its response ends.

When a streaming client disconnects, Starlette cancels the response's task but leaves the response's
body iterator (vLLM's stream generator over our engine client's stream) suspended; the engine
request is then aborted only when that chain of generators is finalized (by reference counting
at once, or by a later garbage collection if a cycle holds it). So the HTTP layer opens a scope per request
(`request_streams`), the engine client registers each stream it hands out (`track`), and at the end
of the response every stream still open is closed: the engine client's `finally` then aborts the
engine request and releases the program's pin. A stream read to its end is closed already; closing
it again does nothing. Outside a scope (Ray Serve replicas, tests) `track` does nothing.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from contextvars import ContextVar

log = logging.getLogger("agentserve.server")

_open: ContextVar[list[AsyncGenerator] | None] = ContextVar("agentserve_request_streams", default=None)


def track(stream: AsyncGenerator) -> AsyncGenerator:
    streams = _open.get()
    if streams is not None:
        streams.append(stream)
    return stream


@contextlib.asynccontextmanager
async def request_streams() -> AsyncIterator[None]:
    streams: list[AsyncGenerator] = []
    token = _open.set(streams)
    try:
        yield
    finally:
        _open.reset(token)
        for stream in streams:
            try:
                await stream.aclose()
            except RuntimeError:  # still running in another task: that task ends it
                log.debug("stream still running at the end of its response")
