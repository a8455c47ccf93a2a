"""The program-scheduling core: the one sequence of hooks an engine's scheduler calls, over a small
block-operations protocol. Plain Python.

The program book (programs/book.py) decides; this class says when it is asked and what is done with
its answers, so that the vLLM scheduler plugin (engine/scheduler.py) and the simulator's engine
(sim/engine.py) run the same sequence and only move blocks:

- `arrive`: a request entered the engine; its priority is its program's rank.
- `step`: at a step's start, pins past their TTL go (not those a waiting request of their program will
  take) and waiting requests past the wait bound are noted; True: re-key the waiting queue now.
- `release_for`: a request cannot get blocks; the book names a pin to release for it, or it waits.
- `may_start`: the admission check of a waiting request; programs paused to make room for it have
  their last turn's blocks evicted first (the host tier keeps a copy for their next turn).
- `started`: a request was scheduled for the first time; its program's pin is consumed.
- `finish`: leave (the book's last word on the turn), pin its blocks for the TTL, let the engine free
  the request, then move the blocks nobody will ask for again to the front of the free queue.
- `command`: the front end's control commands.

A pin's blocks are unpinned tail first (`BlockOps.free`), so if they are evicted later the end of a
context goes before its start.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol, TypeVar

from agentserve.programs.book import ProgramBook
from agentserve.programs.fields import XARG_CONVERSATION, XARG_PROGRAM
from agentserve.programs.next_use import NEVER
from agentserve.ttl.pins import Release

T = TypeVar("T")
# A waiting request as the core sees it: (request id, program or None, arrival time).
Waiting = tuple[str, "str | None", float]


MAX_KEPT = 65536  # programs whose last blocks are remembered for a pause (clients that never end programs)


def _identity(block):
    """What a block holds: vLLM's block hash (None once evicted), or the simulator's block key itself."""
    return getattr(block, "block_hash", block)


class BlockOps(Protocol):
    """What the core asks of an engine's KV block pool (vLLM's `BlockPool`, the simulator's)."""

    def touch(self, blocks: Sequence) -> None:
        """One more reference to each block (a pin)."""

    def free(self, blocks: Sequence) -> None:
        """One reference less to each (an unpin); blocks left unreferenced stay cached, the last of
        `blocks` nearest eviction."""

    def evict_first(self, blocks: Sequence) -> int:
        """Move those of `blocks` that are cached and unreferenced to the front of the free queue;
        returns how many moved."""

    def blocks_of(self, request_id: str) -> list:
        """The full (cached) blocks a running request holds, in context order."""

    def num_free(self) -> int:
        """Blocks an allocation could take now (free and evictable cached)."""


class ProgramCore:
    def __init__(self, book: ProgramBook, blocks: BlockOps):
        self.book = book
        self.blocks = blocks
        self._hit: dict[str, int] = {}  # started request -> tokens it found cached when first scheduled
        # program -> its last turn's blocks and their identities then (a paused program's KV is demoted
        # only where a block still holds what it held: vLLM reuses block objects)
        self._kept: dict[str, tuple[list, list]] = {}

    def arrive(self, request_id: str, xargs: Mapping | None, prompt_tokens: int) -> int:
        """A request entered the engine; returns its priority."""
        return self.book.arrive_request(request_id, xargs, prompt_tokens)

    def step(self, waiting: Callable[[], Iterable[Waiting]], any_waiting: bool) -> bool:
        """A step starts (`waiting`: the engine's waiting requests, read only when needed). True: the
        queue's keys changed, re-key it before scheduling."""
        self._free(self.book.expire(lambda: {program for _, program, _ in waiting()}))
        if any_waiting:
            self.book.age((request_id, arrival) for request_id, _, arrival in waiting())
        due, self.book.reorder_due = self.book.reorder_due, False
        return due

    def release_for(self, program: str | None, priority: int, *, running: bool, preempted: bool,
                    arrival_time: float) -> bool:
        """A request cannot get blocks: release the pin the book names for it. False: none (it waits,
        or the engine preempts)."""
        if not self.book.pins:
            return False
        release = self.book.release_for(program, priority, running=running, preempted=preempted,
                                        arrival_time=arrival_time)
        if release is None:
            return False
        self._free([release])
        return True

    def may_start(self, request_id: str, prompt_tokens: int, arrival_time: float) -> bool:
        ok = self.book.may_start(request_id, prompt_tokens, arrival_time)
        self._demote_paused()
        return ok

    def started(self, request_id: str, program: str | None, cached_tokens: int, prompt_tokens: int,
                arrival_time: float) -> None:
        """A request was scheduled with `cached_tokens` of prefix hit. Only its first start counts (a
        preempted request that is scheduled again is not a new turn)."""
        if request_id in self._hit:
            return
        self._hit[request_id] = cached_tokens
        self._free(self.book.started(request_id, program, cached_tokens, prompt_tokens, arrival_time))

    def finish(self, request_id: str, xargs: Mapping | None, context_tokens: int, *, aborted: bool,
               free_request: Callable[[], T]) -> T:
        """A request finished with `context_tokens`: the book's leave, the pin, then `free_request` (the
        engine frees it), then its one-off blocks evicted first. Returns what `free_request` returns."""
        hit = self._hit.pop(request_id, 0)
        program = (xargs or {}).get(XARG_PROGRAM)
        releases, ttl = self.book.leave_request(request_id, xargs, context_tokens, aborted=aborted,
                                                computed_tokens=context_tokens - hit)
        self._free(releases)
        blocks = self.blocks.blocks_of(request_id)
        if ttl > 0:
            pinned, releases = self.book.pin(program, blocks, ttl)
            self._free(releases)
            if pinned:
                self.blocks.touch(blocks)
        out = free_request()
        if (self.book.config.one_off_blocks == "evict-first" and self.book.next_use.seconds_until(program) == NEVER
                and not (program is None and (xargs or {}).get(XARG_CONVERSATION))):
            # Only the blocks this request computed: its prefix hit may be a prefix others share.
            self.book.counters["blocks_evicted_first"] += self.blocks.evict_first(
                blocks[hit // self.book.block_size:])
            self._kept.pop(program, None)
        elif program is not None and self.book.admission is not None:
            self._kept.pop(program, None)  # newest last: the oldest entry is the first to go below
            self._kept[program] = (blocks, [_identity(b) for b in blocks])
            if len(self._kept) > MAX_KEPT:
                del self._kept[next(iter(self._kept))]
        self._demote_paused()
        return out

    def command(self, command: str, payload: dict, waiting: Callable[[], Iterable[Waiting]]) -> dict:
        """A control command from the front end (end / release / release_all / set_ttl / tick); answers
        the book's stats and the pool's free blocks. ValueError for an unknown command."""
        self._free(self.book.command(command, payload))
        if command == "end":
            self._kept.pop(payload.get("program_id"), None)
        self._free(self.book.expire(lambda: {program for _, program, _ in waiting()}))
        return {**self.book.stats(), "free_blocks": self.blocks.num_free()}

    def _demote_paused(self) -> None:
        """Programs admission paused: their pins are released, their last blocks evicted first."""
        if not self.book.pauses_pending:  # the common case, asked for every held request at every step
            return
        paused, releases = self.book.take_paused()
        self._free(releases)
        for program in paused:
            blocks, identities = self._kept.pop(program, ([], []))
            same = [b for b, i in zip(blocks, identities) if _identity(b) == i]
            self.book.counters["blocks_demoted"] += self.blocks.evict_first(same)

    def _free(self, releases: Iterable[Release]) -> None:
        for release in releases:
            self.blocks.free(release.pin.blocks)
