"""agentserve's vLLM scheduler plugin (`SchedulerConfig.scheduler_cls`): the adapter between vLLM's
scheduler and the program book.

Every program-level decision (ranks, the wait bound, admission, which pins exist and which go) is
made by `agentserve.programs.book.ProgramBook`, the queue order by `ProgramFCFS`; the TTL of a turn's
pin arrives per request in `SamplingParams.extra_args` (the front end's TTL policy decides it). This
class only reads vLLM's requests and moves blocks:

- pin: when a non-final turn finishes, `block_pool.touch` its full (prefix-cached) blocks before vLLM
  frees the request, so their reference count stays > 0 and LRU cannot evict them; the next turn hits
  them through ordinary prefix caching. Unpin = `block_pool.free_blocks`.
- memory pressure: `allocate_slots` is wrapped so that, before vLLM preempts or leaves a request
  waiting for lack of blocks, the book names pins to release.
- admission: vLLM's `_handle_blocked_waiting_request` hook skips a held request for the step.
- program FCFS: a request's `priority` is its program's (or workflow's) rank (vLLM's priority policy
  then preempts the latest program first) and the waiting queue is a `ProgramQueue`.

Why a scheduler subclass rather than a KV connector's delayed free: the connector sees the finish but
not admission or allocation failure, so "unpin when the next turn is admitted" and "release before
preempting" would need the scheduler anyway; the connector slot stays free for KV sharing.

The front end talks to it through the engine core's `agentserve_scheduler_command` utility (registered
below, engine/utilities.py).

Both of vLLM's schedulers: vLLM decides async scheduling late (on by default on GPU, forced off on CPU,
off for some executors and speculative methods) and, with a `scheduler_cls` set, builds that class
whatever it decided. So `ProgramScheduler` picks its variant when built, from the final config:
`AsyncProgramScheduler` (the same rules over `AsyncScheduler`, which only adds output placeholders and
caches blocks one step later) when async scheduling is on. Nothing here depends on which: a request's
blocks are pinned in `_free_request`, which both call once its last output is applied.
"""

from __future__ import annotations

from typing import Any

import msgspec
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from agentserve.engine import utilities
from agentserve.engine.orphan import exit_with_parent
from agentserve.engine.program_queue import ProgramQueue
from agentserve.programs.queue_order import ProgramFCFS
from agentserve.options import SchedulerConfig
from agentserve.programs.book import ProgramBook
from agentserve.programs.core import ProgramCore
from agentserve.hosttier import policy as host_policy
from agentserve.programs.fields import XARG_PROGRAM, XARG_REMAINING


def _xargs(request: Request) -> dict:
    return (request.sampling_params.extra_args if request.sampling_params else None) or {}


def _xarg(request: Request, key: str, default=None):
    return _xargs(request).get(key, default)


def program_of_request(request: Request) -> str | None:
    return _xarg(request, XARG_PROGRAM)


def remaining_of_request(request: Request) -> float:
    return float(_xarg(request, XARG_REMAINING, 0.0) or 0.0)


class AsyncVariant:
    """A scheduler class that is built as its `async_variant` (set on the class itself; a subclass
    names its own or has none) when the final config turns async scheduling on: vLLM builds
    `scheduler_cls` whatever it decided."""

    async_variant: type | None = None

    def __new__(cls, *args, **kwargs):
        config = kwargs.get("vllm_config", args[0] if args else None)
        variant = cls.__dict__.get("async_variant")
        if variant is not None and config is not None and config.scheduler_config.async_scheduling:
            cls = variant
        return super().__new__(cls)


class VllmBlocks:
    """The core's block operations (programs/core.py `BlockOps`) on vLLM's KV cache manager."""

    def __init__(self, manager):
        self.manager = manager
        self.pool = manager.block_pool

    def touch(self, blocks) -> None:
        self.pool.touch(blocks)

    def free(self, blocks) -> None:
        self.pool.free_blocks(reversed(blocks))  # vLLM's free queue takes them in order: the tail first

    def evict_first(self, blocks) -> int:
        free = [b for b in blocks if b.ref_cnt == 0 and b.block_hash is not None]
        if not free:
            return 0
        queue = self.pool.free_block_queue
        for b in free:
            queue.remove(b)
        # Behind the blank blocks at the queue's front (vLLM reuses those before any cached one, as the
        # simulator's pool does), the context's tail first, as vLLM frees it.
        prev, end = queue.fake_free_list_head, queue.fake_free_list_tail
        while prev.next_free_block is not end and prev.next_free_block.block_hash is None:
            prev = prev.next_free_block
        after = prev.next_free_block
        for b in reversed(free):
            b.prev_free_block, prev.next_free_block, prev = prev, b, b
        prev.next_free_block, after.prev_free_block = after, prev
        queue.num_free_blocks += len(free)
        return len(free)

    def blocks_of(self, request_id: str) -> list:
        return [b for group in self.manager.get_blocks(request_id).blocks
                for b in group if b.block_hash is not None and not b.is_null]

    def num_free(self) -> int:
        return self.pool.get_num_free_blocks()


class ProgramScheduler(AsyncVariant, Scheduler):

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        exit_with_parent()  # a killed front end (a Ray replica at shutdown) must not leave this engine core running
        config = msgspec.convert((self.vllm_config.additional_config or {}).get("agentserve", {}), SchedulerConfig)
        self.block_pool = self.kv_cache_manager.block_pool
        book = ProgramBook(config, total_blocks=self.block_pool.num_gpu_blocks - 1,  # minus the null block
                           block_size=self.cache_config.block_size,
                           max_model_len=self.vllm_config.model_config.max_model_len)
        self.core = ProgramCore(book, VllmBlocks(self.kv_cache_manager))
        order = ProgramFCFS(book, program_of_request, remaining_of_request)
        # vLLM drains `kv_holding_waiting` (requests whose KV is being loaded, e.g. from the host tier)
        # before `waiting`; both get the program order, the wait bound and pin expiry.
        self.waiting = ProgramQueue(order)
        self.kv_holding_waiting = ProgramQueue(order)
        # the host tier's eviction policy (if the engine runs one) orders by the book's next-use predictions
        if isinstance(policy := host_policy.find(self.connector), host_policy.NextUseCachePolicy):
            policy.attach(self._program_of_id, book.next_use)
        self._allocate = self.kv_cache_manager.allocate_slots
        self.kv_cache_manager.allocate_slots = self._allocate_or_release_pins

    @property
    def book(self) -> ProgramBook:
        return self.core.book

    def _program_of_id(self, request_id: str) -> str | None:
        request = self.requests.get(request_id)
        return program_of_request(request) if request is not None else None

    def add_request(self, request: Request) -> None:
        request.priority = self.core.arrive(request.request_id, _xargs(request), request.num_prompt_tokens)
        super().add_request(request)

    def _handle_blocked_waiting_request(self, request: Request) -> bool:
        """vLLM asks this of every waiting request it considers; False skips it for this step."""
        return (super()._handle_blocked_waiting_request(request)
                and self.core.may_start(request.request_id, request.num_prompt_tokens, request.arrival_time))

    def _free_request(self, request: Request, delay_free_blocks: bool = False):
        return self.core.finish(request.request_id, _xargs(request), request.num_tokens,
                                aborted=request.status == RequestStatus.FINISHED_ABORTED,
                                free_request=lambda: super(ProgramScheduler, self)._free_request(
                                    request, delay_free_blocks))

    def _allocate_or_release_pins(self, request: Request, *args, **kwargs):
        blocks = self._allocate(request, *args, **kwargs)
        # the hot path (called per running request per step) ends here
        while blocks is None and self.core.release_for(program_of_request(request), request.priority,
                                                       running=request.status == RequestStatus.RUNNING,
                                                       preempted=request.num_preemptions > 0,
                                                       arrival_time=request.arrival_time):
            blocks = self._allocate(request, *args, **kwargs)
        return blocks  # None: nothing it may take: it waits (TTL, wait bound) or vLLM preempts

    def schedule(self, *args, **kwargs):
        if self.core.step(self._waiting, bool(self.waiting or self.kv_holding_waiting)):
            # Only here, never inside vLLM's schedule(): its waiting loop peeks the head, allocates
            # (which may release pins, see above) and then pops the head, so re-keying in between
            # would pop another request than the one it allocated for.
            self.waiting.reorder()
            self.kv_holding_waiting.reorder()
        output = super().schedule(*args, **kwargs)
        for new in output.scheduled_new_reqs:
            if (request := self.requests.get(new.req_id)) is not None:
                self.core.started(new.req_id, program_of_request(request), new.num_computed_tokens,
                                  request.num_prompt_tokens, request.arrival_time)
        return output

    def _waiting(self):
        """Every waiting request (id, program, arrival): vLLM's `deferred_waiting` is a subset of these two queues."""
        for queue in (self.waiting, self.kv_holding_waiting):
            for r in queue.unordered():
                yield r.request_id, program_of_request(r), r.arrival_time

    def command(self, command: str, payload: dict) -> dict[str, Any]:
        """A control command from the front end (end / release / release_all / set_ttl / tick); answers
        the book's stats and this engine's load (free blocks count evictable cached ones)."""
        return {**self.core.command(command, payload, self._waiting),
                "total_blocks": self.block_pool.num_gpu_blocks - 1, "queued": sum(self.get_request_counts()),
                "host_tier": host_policy.tier_stats(self.connector),
                "scheduler": type(self).__name__}  # which of vLLM's schedulers it runs under


class AsyncProgramScheduler(ProgramScheduler, AsyncScheduler):
    """The plugin under async scheduling: its rules, then `AsyncScheduler`'s, then `Scheduler`'s (MRO)."""


ProgramScheduler.async_variant = AsyncProgramScheduler


@utilities.register
def agentserve_scheduler_command(core, command: str, payload: dict) -> dict:
    if not isinstance(core.scheduler, ProgramScheduler):
        raise RuntimeError("the engine does not run agentserve's ProgramScheduler")
    return core.scheduler.command(command, payload)
