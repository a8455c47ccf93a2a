"""A background task that runs a step at a fixed period and survives the step's failures.

Used for the front end's control ticks (pin expiry, engine counters onto /metrics), the KV-sharing
stats poll and the Ray Serve control plane's tick: a failed tick is logged and the next one runs;
only cancellation stops it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("agentserve")


async def every(period_s: float, step: Callable[[], Awaitable[object]], what: str) -> None:
    while True:
        await asyncio.sleep(period_s)
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - keep going; the failure is in the log
            log.exception("%s failed", what)
