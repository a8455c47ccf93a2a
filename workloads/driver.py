"""The replay driver: runs a plan against one OpenAI-compatible server and records what each turn saw.

Turn k's messages are turn k-1's messages + its answer (the text the server returned) + turn k's new
input as a user message (filler text of the planned token count), so the server sees what a real
agent sends. Outputs are forced to the planned length (`max_tokens` + `ignore_eos`); the tool time is
waited between turns. `client="agentserve"` drives the server through the SDK (program fields, tool
events, program end); `client="openai"` sends plain OpenAI requests, for stock vLLM or any endpoint.
Streaming gives the TTFT; the final usage chunk gives prompt and cached tokens.

A workflow's sub-programs start when the turn that spawns them is done, each with the parent's
messages so far as its prompt's prefix (with the SDK: `spawn`, a sub-program of the parent); the
parent waits for all of them (the join, reported as its tool call) before its next turn. Every
program of a workflow gets its own record, carrying the workflow's id (the root's) and its parent.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

import msgspec

from workloads.filler import Filler
from workloads.plan import PlannedProgram, PlannedTurn

CLIENTS = ("agentserve", "openai")
# A turn the server failed (5xx, a stream cut by a dying replica) is sent again this many times.
TURN_RETRIES = 2
RETRY_BACKOFF_S = 0.5


class IncompleteStream(RuntimeError):
    """A stream that ended without its final usage chunk: cut by the server side."""


def server_failed(error: BaseException) -> bool:
    """A failure of the server or the connection, not of the request: worth sending again."""
    import httpx
    import openai

    if isinstance(error, (openai.APIConnectionError, openai.InternalServerError, httpx.TransportError,
                          IncompleteStream)):
        return True
    return type(error) is openai.APIError  # an error event inside a stream: no HTTP status


class TurnRecord(msgspec.Struct):
    sent: float  # seconds from the replay start
    first_token: float
    done: float
    prompt_tokens: int
    cached_tokens: int | None  # None: the server does not report prompt_tokens_details
    output_tokens: int


class ProgramRecord(msgspec.Struct):
    id: str
    planned_arrival: float
    start: float
    end: float
    turns: list[TurnRecord]
    tool_wait_s: float  # tool time waited in total
    error: str | None = None
    retries: int = 0  # turns sent again after a server failure
    round: int = 0  # which repetition of the replay (`--rounds`); times are from that round's start
    workflow: str = ""  # the root program's id ("" for a program without sub-programs: its own)
    parent: str | None = None  # the program that spawned this one


class _Parent(msgspec.Struct):
    id: str
    sdk_program: object  # the parent's AsyncProgram (None with the openai client)


class Driver:
    def __init__(self, base_url: str, model: str, filler: Filler, client: str = "agentserve",
                 api_key: str = "none", seed: int = 0):
        if client not in CLIENTS:
            raise ValueError(f"client must be one of {CLIENTS}, not {client!r}")
        self.base_url, self.model, self.filler, self.client_kind, self.seed = base_url, model, filler, client, seed
        self.api_key = api_key

    async def run(self, programs: list[PlannedProgram], concurrency: int | None = None,
                  on_done: Callable[[ProgramRecord], None] | None = None) -> list[ProgramRecord]:
        """Every program's record (sub-programs' too, after their workflow's root); `on_done` gets each
        top-level program's record when it ends."""
        from agentserve.sdk import AsyncAgentServe

        self.sdk = AsyncAgentServe(self.base_url, api_key=self.api_key)
        self.t0 = time.perf_counter()
        gate = asyncio.Semaphore(concurrency) if concurrency else None

        async def one(p: PlannedProgram) -> list[ProgramRecord]:
            records: list[ProgramRecord] = []
            if gate is None:
                await asyncio.sleep(max(0.0, p.arrival_s - self.now()))
                rec = await self.program(p, records)
            else:
                async with gate:
                    rec = await self.program(p, records)
            if on_done:
                on_done(rec)
            return [rec, *records]

        try:
            return [rec for recs in await asyncio.gather(*(one(p) for p in programs)) for rec in recs]
        finally:
            await self.sdk.close()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def input_text(self, p: PlannedProgram, k: int, rng: random.Random) -> str:
        """Turn k's new input: the program's own words, after the shared prefix's (the same for every
        program naming it) on its first turn."""
        tokens = p.turns[k].new_tokens
        if k > 0 or p.shared is None:
            return self.filler.text(tokens, rng)
        head = self.filler.text(p.shared.tokens, random.Random(f"{self.seed}/shared/{p.shared.name}"))
        return head + self.filler.text(tokens - p.shared.tokens, rng)

    async def program(self, p: PlannedProgram, sub_records: list[ProgramRecord], parent=None,
                      prefix: tuple[dict, ...] = (), workflow: str | None = None) -> ProgramRecord:
        """Run `p` (with the SDK: a sub-program of `parent`, if given), its conversation after `prefix`;
        records of the sub-programs it spawns go to `sub_records`."""
        rng = random.Random(f"{self.seed}/{p.id}")
        rec = ProgramRecord(p.id, p.arrival_s, self.now(), 0.0, [], 0.0, workflow=workflow or p.id,
                            parent=parent.id if parent is not None else None)
        prog = None
        if self.client_kind == "agentserve":
            prog = (parent.sdk_program.spawn(f"replay-{p.id}") if parent is not None
                    else self.sdk.program(f"replay-{p.id}"))
        messages: list[dict] = list(prefix)
        try:
            for k, turn in enumerate(p.turns):
                messages.append({"role": "user", "content": self.input_text(p, k, rng)})
                last = k == len(p.turns) - 1
                answer = await self.retried_turn(prog, messages, turn, last, rec)
                messages.append({"role": "assistant", "content": answer})
                if turn.spawn and not last:
                    await self.join(prog, p, turn, tuple(messages), sub_records, rec)
                elif not last:
                    await self.wait_tool(prog, turn, rec)
        except Exception as e:  # noqa: BLE001 - a failed program is recorded, the replay goes on
            rec.error = f"{type(e).__name__}: {e}"[:500]
        finally:
            if prog is not None:
                try:
                    await prog.end()
                except Exception as e:  # noqa: BLE001
                    rec.error = rec.error or f"end: {e}"[:500]
        rec.end = self.now()
        return rec

    async def retried_turn(self, prog, messages: list[dict], turn: PlannedTurn, last: bool,
                           rec: ProgramRecord) -> str:
        """A turn, sent again if the server failed it (a replica died mid-stream, a 5xx): the program
        goes on, and the record counts the retry. Client errors (4xx) are not retried."""
        sdk_turn = prog.turn if prog is not None else 0
        for attempt in range(TURN_RETRIES + 1):
            if prog is not None:
                prog.turn = sdk_turn  # the same turn again, not the next one
            try:
                return await self.turn(prog, messages, turn, last, rec)
            except Exception as e:  # noqa: BLE001 - filtered by server_failed
                if attempt == TURN_RETRIES or not server_failed(e):
                    raise
                rec.retries += 1
                await asyncio.sleep(RETRY_BACKOFF_S * (attempt + 1))
        raise AssertionError("unreachable")

    async def turn(self, prog, messages: list[dict], turn: PlannedTurn, last: bool, rec: ProgramRecord) -> str:
        kwargs = dict(model=self.model, messages=messages, max_tokens=turn.output_tokens, temperature=0,
                      stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        sent = self.now()
        if prog is not None:
            stream = await prog.chat(tool=turn.tool, last=last, end=last, **kwargs)
        else:
            stream = await self.sdk.openai.chat.completions.create(**kwargs)
        first, parts, usage = None, [], None
        async for chunk in stream:
            if chunk.choices:
                if first is None:
                    first = self.now()
                parts.append(chunk.choices[0].delta.content or "")
            if chunk.usage is not None:
                usage = chunk.usage
        done = self.now()
        if usage is None:
            raise IncompleteStream("the server sent no usage chunk (stream_options.include_usage)")
        details = getattr(usage, "prompt_tokens_details", None)
        cached = getattr(details, "cached_tokens", None) if details is not None else None
        rec.turns.append(TurnRecord(sent, first if first is not None else done, done, usage.prompt_tokens,
                                    cached, usage.completion_tokens))
        return "".join(parts)

    async def join(self, prog, p: PlannedProgram, turn: PlannedTurn, prefix: tuple[dict, ...],
                   sub_records: list[ProgramRecord], rec: ProgramRecord) -> None:
        """Start the turn's sub-programs and wait for all of them (the parent's tool call: the join)."""
        parent = _Parent(p.id, prog)

        async def child(sub: PlannedProgram) -> None:
            sub_records.append(await self.program(sub, sub_records, parent, prefix, rec.workflow))

        t0 = self.now()
        if prog is None:
            await asyncio.gather(*(child(sub) for sub in turn.spawn))
        else:
            async with prog.tool(turn.tool or "join"):
                await asyncio.gather(*(child(sub) for sub in turn.spawn))
        rec.tool_wait_s += self.now() - t0

    async def wait_tool(self, prog, turn: PlannedTurn, rec: ProgramRecord) -> None:
        rec.tool_wait_s += turn.tool_s
        if prog is None:
            await asyncio.sleep(turn.tool_s)
            return
        async with prog.tool(turn.tool or "tool"):
            await asyncio.sleep(turn.tool_s)
