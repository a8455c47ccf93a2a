"""An agent program on agentserve's SDK, the way mini-swe-agent drives an LLM.

Each turn sends the whole conversation so far, gets the model's answer, runs a real shell tool call
and appends its output as the next user message (the observation). The served model here has random
weights, so the agent follows a fixed tool plan instead of parsing commands from the answer; the
traffic (growing prompts, tool pauses between turns) is what a real coding agent sends.

The SDK marks the calls as one program and times each tool call, so the server keeps the program's
KV pinned across the tool call. Prints one row per turn with the prompt size, the tokens served from the prefix cache and the
latency, so you can watch prefix reuse across turns.

    python examples/agent_program.py                      # starts its own server on the tiny model
    python examples/agent_program.py --base-url http://127.0.0.1:8000 --model tiny
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from agentserve.sdk import AgentServe

REPO = Path(__file__).resolve().parent.parent
TOOL_PLAN = [
    "ls",
    "grep -rn 'class ' agentserve | head -20",
    "wc -l agentserve/engine/*.py",
    "sed -n 1,30p pyproject.toml",
    "git log --oneline | head -5 || true",
    "python3 --version",
]
SYSTEM = (
    "You are a software engineering agent. Every answer contains exactly one bash command in a "
    "```bash block. You see the command's output in the next message."
)


def run_tool(cmd: str) -> str:
    proc = subprocess.run(["bash", "-c", cmd], cwd=REPO, capture_output=True, text=True, timeout=60)
    return f"<returncode>{proc.returncode}</returncode>\n<output>\n{(proc.stdout + proc.stderr)[:4000]}</output>"


def run_program(client: AgentServe, model: str, turns: int, max_tokens: int) -> list[dict]:
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Find where the engine settings are defined and summarise them."},
    ]
    rows = []
    with client.program() as program:
        for turn in range(turns):
            cmd = TOOL_PLAN[turn % len(TOOL_PLAN)]
            last = turn == turns - 1
            t0 = time.perf_counter()
            resp = program.chat(model=model, messages=messages, max_tokens=max_tokens, last=last,
                                tool=None if last else "bash")
            latency = time.perf_counter() - t0
            answer = resp.choices[0].message.content or ""
            messages.append({"role": "assistant", "content": f"{answer}\n```bash\n{cmd}\n```"})
            t1 = time.perf_counter()
            with program.tool("bash"):
                observation = run_tool(cmd)
            tool_s = time.perf_counter() - t1
            messages.append({"role": "user", "content": observation})
            rows.append(_row(turn, resp, latency, cmd, tool_s))
    return rows


def _row(turn, resp, latency, cmd, tool_s) -> dict:
    details = resp.usage.prompt_tokens_details
    return {
        "turn": turn,
        "prompt_tokens": resp.usage.prompt_tokens,
        "cached_tokens": (details.cached_tokens or 0) if details else 0,
        "completion_tokens": resp.usage.completion_tokens,
        "llm_s": latency,
        "tool": cmd.split()[0],
        "tool_s": tool_s,
    }


def print_rows(rows: list[dict]) -> None:
    print(f"{'turn':>4} {'prompt':>7} {'cached':>7} {'output':>6} {'llm s':>7} {'tool':>6} {'tool s':>7}")
    for r in rows:
        print(f"{r['turn']:>4} {r['prompt_tokens']:>7} {r['cached_tokens']:>7} {r['completion_tokens']:>6} "
              f"{r['llm_s']:>7.3f} {r['tool']:>6} {r['tool_s']:>7.3f}")
    prompt = sum(r["prompt_tokens"] for r in rows)
    cached = sum(r["cached_tokens"] for r in rows)
    print(f"prefix hit rate {cached / max(prompt, 1):.2f} ({cached}/{prompt} prompt tokens from cache)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", help="an OpenAI-compatible server; default: start agentserve on --model")
    ap.add_argument("--model", default="tiny", help="model name (default: tiny)")
    ap.add_argument("--turns", type=int, default=8, help="LLM calls in the program (default: 8)")
    ap.add_argument("--max-tokens", type=int, default=48, help="output tokens per call (default: 48)")
    ap.add_argument("--kv-tokens", type=int, default=16384, help="KV budget of the server it starts")
    args = ap.parse_args()

    if args.base_url:
        print_rows(run_program(AgentServe(args.base_url), args.model, args.turns, args.max_tokens))
        return 0
    from agentserve.server.process import ServerProcess

    print(f"starting agentserve serve --model {args.model} --kv-tokens {args.kv_tokens} ...", flush=True)
    with ServerProcess(["--model", args.model, "--kv-tokens", str(args.kv_tokens)]) as srv:
        print_rows(run_program(AgentServe(srv.base_url), args.model, args.turns, args.max_tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
