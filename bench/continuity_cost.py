"""What inferring programs from continuity costs a request that is not an agent's: the middleware's time
per request with the conversation index on and off, on one-off chats and on long human chats, plain
and streamed, with an engine stand-in that answers at once (so only the front end's work is timed).

    python bench/continuity_cost.py [--requests 400]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agentserve.programs.continuity import Conversations  # noqa: E402
from agentserve.server.middleware import AgentFieldsMiddleware  # noqa: E402

ANSWER_TOKENS = 256  # a streamed answer's chunks (one per token, as vLLM sends them)


class Engine:
    """An ASGI app answering every chat completion at once with a fixed answer."""

    def __init__(self, answer_words: list[str]):
        self.words = answer_words

    async def __call__(self, scope, receive, send):
        body = json.loads((await receive())["body"])
        if body.get("stream"):
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
            for w in self.words:
                event = {"id": "x", "choices": [{"index": 0, "delta": {"content": " " + w}}]}
                await send({"type": "http.response.body", "body": f"data: {json.dumps(event)}\n\n".encode(),
                            "more_body": True})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
            return
        answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(self.words)}}]}
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(answer).encode()})


async def post(app, body: bytes) -> None:
    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        pass

    await app({"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [], "raw_path": b""},
              receive, send)


def text(rng: random.Random, words: int) -> str:
    return " ".join(f"w{rng.randrange(100000)}" for _ in range(words))


def workloads(rng: random.Random, n: int) -> dict[str, list[bytes]]:
    """One-off chats (a prompt of 200 or 4,000 words) and a human chat's later turns (40 messages)."""
    out: dict[str, list[bytes]] = {}
    for words in (200, 4000):
        out[f"one-off, {words} words"] = [json.dumps({"model": "m", "messages": [
            {"role": "system", "content": "You are helpful."}, {"role": "user", "content": text(rng, words)}]}).encode()
            for _ in range(n)]
    chat = [{"role": "system", "content": "You are helpful."}]
    for _ in range(20):
        chat += [{"role": "user", "content": text(rng, 60)}, {"role": "assistant", "content": text(rng, 120)}]
    out["human chat, 40 messages"] = [json.dumps({"model": "m", "messages": chat + [
        {"role": "user", "content": text(rng, 60)}]}).encode() for _ in range(n)]
    return out


async def timed(app, bodies: list[bytes], stream: bool) -> list[float]:
    times = []
    for body in bodies:
        if stream:
            body = body[:-1] + b', "stream": true}'
        t0 = time.perf_counter()
        await post(app, body)
        times.append(time.perf_counter() - t0)
    return times


async def main(requests: int) -> None:
    rng = random.Random(0)
    engine = Engine([f"w{rng.randrange(100000)}" for _ in range(ANSWER_TOKENS)])
    print(f"| request | answer | index off (ms) | index on (ms) | added (ms) |\n|---|---|---|---|---|")
    for name, bodies in workloads(rng, requests).items():
        for stream in (False, True):
            medians = []
            for app in (AgentFieldsMiddleware(engine), AgentFieldsMiddleware(engine, conversations=Conversations())):
                await timed(app, bodies[:20], stream)  # warm
                medians.append(statistics.median(await timed(app, bodies, stream)) * 1000)
            print(f"| {name} | {'streamed' if stream else 'plain'}, {ANSWER_TOKENS} tokens | {medians[0]:.3f} | "
                  f"{medians[1]:.3f} | {medians[1] - medians[0]:+.3f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    asyncio.run(main(parser.parse_args().requests))
