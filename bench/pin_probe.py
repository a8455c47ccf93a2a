"""Pin probe: does a program's KV survive its tool call on this device, with agentserve and not with
stock vLLM? One line of output per server, then PASS or FAIL.

A program's first turn, then other traffic that together needs more than the KV budget (LRU evicts the
idle program's blocks on stock vLLM), then its second turn with the whole history. With agentserve the
first turn's blocks are pinned (fixed TTL, so the probe does not depend on the tool-time predictor)
and the second turn finds them cached. Prompts are token ids, so any model's tokenizer works.

    python bench/pin_probe.py --model /models/Qwen2.5-0.5B-Instruct --kv-tokens 8192
    python bench/pin_probe.py --model tiny --kv-tokens 2048          # on this CPU
"""

from __future__ import annotations

import argparse
import random
import sys

import httpx

FLOOD_REQUESTS = 5


def complete(url: str, model: str, ids: list[int], program: str | None = None, max_tokens: int = 8) -> dict:
    body = {"model": model, "prompt": ids, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
    if program:
        body["agentserve"] = {"program_id": program}
    r = httpx.post(url + "/v1/completions", json=body, timeout=300)
    r.raise_for_status()
    return r.json()


def probe(url: str, model: str, kv_tokens: int, seed: int = 0) -> tuple[int, int]:
    """(turn 1's prompt tokens, tokens turn 2 found cached)."""
    rng = random.Random(seed)
    ids = lambda n: [rng.randrange(10, 1000) for _ in range(n)]  # noqa: E731 (ids any vocabulary has)
    context = ids(int(kv_tokens * 0.3))
    first = complete(url, model, context, program="probe")
    for _ in range(FLOOD_REQUESTS):  # other programs' traffic: 2x the KV budget in all
        complete(url, model, ids(int(kv_tokens * 0.4)), max_tokens=4)
    second = complete(url, model, context + ids(8) + ids(20), program="probe")
    httpx.post(f"{url}/v1/programs/probe/end", timeout=30)
    return first["usage"]["prompt_tokens"], second["usage"]["prompt_tokens_details"]["cached_tokens"] or 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a model directory, or a built-in model name")
    ap.add_argument("--kv-tokens", type=int, default=8192)
    ap.add_argument("--ttl", type=float, default=60.0, help="the pin's TTL (fixed policy)")
    args = ap.parse_args()
    from agentserve.server.process import ServerProcess

    engine = ["--model", args.model, "--kv-tokens", str(args.kv_tokens), "--max-model-len", str(args.kv_tokens)]
    cached, scheduler = {}, None
    for policy, extra in (("agentserve", ["--policy", "fixed", "--fixed-ttl", str(args.ttl)]),
                          ("vllm", ["--policy", "vllm"])):
        with ServerProcess(engine + extra) as srv:
            model = httpx.get(srv.base_url + "/v1/models", timeout=30).json()["data"][0]["id"]
            prompt, cached[policy] = probe(srv.base_url, model, args.kv_tokens)
            if policy == "agentserve":
                scheduler = httpx.get(srv.base_url + "/v1/agentserve/stats", timeout=30).json()["engine"]["scheduler"]
        print(f"{policy}: turn 2 found {cached[policy]} of turn 1's {prompt} prompt tokens cached")
    ok = cached["agentserve"] >= 0.9 * prompt and cached["vllm"] < 0.5 * prompt
    print(f"pin probe: {'PASS' if ok else 'FAIL'}: kept {cached['agentserve']}/{prompt} tokens across the tool call "
          f"(stock vLLM {cached['vllm']}), scheduler {scheduler}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
