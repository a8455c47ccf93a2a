"""The periodic background task: a failing step is logged and the next one still runs."""

from __future__ import annotations

import asyncio

import pytest

from agentserve.server.periodic import every


def test_a_failed_step_does_not_stop_the_task_and_cancel_does(caplog):
    calls = []

    async def step():
        calls.append(len(calls))
        if len(calls) == 1:
            raise RuntimeError("engine busy")

    async def main():
        task = asyncio.create_task(every(0.001, step, "test tick"))
        while len(calls) < 3:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert len(calls) >= 3
    assert "test tick failed" in caplog.text and "engine busy" in caplog.text
