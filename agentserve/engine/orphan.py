"""An engine core ends when the process that started it is gone.

vLLM's engine core is a process spawned by its front end (the API server, or a Ray Serve replica's
actor). When the front end ends cleanly it stops the core, but a front end that is killed (Ray kills
its replica actors' workers at `serve.shutdown`, an operator's SIGKILL) leaves the core running: it
holds its KV memory and its threads spin on the CPU until someone kills it by hand. vLLM 0.32 watches
its parent in the multiprocessing executor's workers (a death pipe), not in the engine core.
multiprocessing gives a spawned child its parent's sentinel, which becomes ready when the parent exits;
a daemon thread waits on it and then stops this process as an operator would, SIGTERM (the core's own
handler shuts it down), and exits outright if that has not worked within GRACE_S.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from multiprocessing.connection import wait

log = logging.getLogger("agentserve.engine")

GRACE_S = 20.0  # a graceful shutdown's time, before the process exits outright
_watching = False


def exit_with_parent() -> bool:
    """In a process spawned by multiprocessing, end it when its parent exits (once per process).
    Returns whether a watch runs (False in a process not spawned by multiprocessing)."""
    global _watching
    parent = multiprocessing.parent_process()
    if parent is None or parent.sentinel is None:
        return False
    if not _watching:
        _watching = True
        threading.Thread(target=_watch, args=(parent.sentinel, parent.pid), name="agentserve-parent-watch",
                         daemon=True).start()
    return True


def _watch(sentinel: int, parent_pid: int | None) -> None:
    wait([sentinel])
    log.warning("the engine core's parent process %s is gone: stopping", parent_pid)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_S)
    os._exit(1)
