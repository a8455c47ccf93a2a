"""An engine core ends when the process that started it is killed (agentserve/engine/orphan.py): the
Ray replay left replicas' engine cores running after each round until this."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import psutil

from agentserve.engine.orphan import exit_with_parent

WAIT_S = 30.0  # a bound on the wait, not a speed: the watch wakes at once


def _engine_core(ready: str, watch: bool) -> None:
    """Stands in for vLLM's engine core: spawned by its front end, it runs until stopped."""
    if watch:
        assert exit_with_parent()
    Path(ready).write_text(str(os.getpid()))
    time.sleep(600)


def _front_end(ready: str, watch: bool) -> None:
    multiprocessing.get_context("spawn").Process(target=_engine_core, args=(ready, watch)).start()
    time.sleep(600)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _orphan_outlives_its_front_end(tmp_path: Path, watch: bool) -> bool:
    ready = tmp_path / f"core-{watch}.pid"
    front = multiprocessing.get_context("spawn").Process(target=_front_end, args=(str(ready), watch))
    front.start()
    deadline = time.monotonic() + WAIT_S
    while not (ready.exists() and ready.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    core = int(ready.read_text())
    try:
        os.kill(front.pid, signal.SIGKILL)  # as Ray kills a replica's worker
        front.join()
        deadline = time.monotonic() + (WAIT_S if watch else 3.0)
        while not _gone(core) and time.monotonic() < deadline:
            time.sleep(0.1)
        return not _gone(core)
    finally:
        if not _gone(core):
            os.kill(core, signal.SIGKILL)


def test_an_engine_core_ends_when_its_front_end_is_killed(tmp_path):
    assert _orphan_outlives_its_front_end(tmp_path, watch=False)  # what vLLM does alone
    assert not _orphan_outlives_its_front_end(tmp_path, watch=True)


def test_no_watch_outside_a_spawned_process():
    assert not exit_with_parent()  # pytest's own process: nobody spawned it through multiprocessing
