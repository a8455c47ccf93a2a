"""What the framework examples share: a server to run against, the answer format of the random-weight
test models, and the report of tool times the server learned.

The built-in models have random weights: an example makes their answers well-formed tool calls with
vLLM's structured outputs (a regex over the hermes tool-call format that the server's
`--tool-call-parser hermes` reads). A trained model needs none of this: drop `extra_body`.
"""

from __future__ import annotations

import argparse
import re
from contextlib import contextmanager
from collections.abc import Iterator

import httpx


def tool_call(name: str, arguments: str) -> dict:
    """`extra_body` that makes the answer one call of tool `name` (`arguments`: a regex of its JSON)."""
    regex = '<tool_call>\n\\{"name": "' + name + '", "arguments": ' + arguments + '\\}\n</tool_call>'
    return {"structured_outputs": {"regex": regex}}


def arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    ap.add_argument("--base-url", help="a running `agentserve serve --tool-call-parser hermes`; default: start one")
    ap.add_argument("--model", default="tiny", help="model name (default: tiny)")
    ap.add_argument("--kv-tokens", type=int, default=16384, help="KV budget of the server it starts")
    return ap


@contextmanager
def agentserve(args: argparse.Namespace) -> Iterator[str]:
    """The base URL of the server to use: `--base-url`, or one started here for the example."""
    if args.base_url:
        yield args.base_url.rstrip("/")
        return
    from agentserve.server.process import ServerProcess

    print(f"starting agentserve serve --model {args.model} --tool-call-parser hermes ...", flush=True)
    with ServerProcess(["--model", args.model, "--kv-tokens", str(args.kv_tokens), "--tool-call-parser", "hermes"]) as srv:
        yield srv.base_url


def print_tool_report(base_url: str) -> None:
    """What the server learned of the tools: its predictor per tool (GET /v1/agentserve/stats) and the
    predicted vs actual tool times it exports (/metrics; a prediction needs 20 samples of a tool)."""
    stats = httpx.get(base_url + "/v1/agentserve/stats", timeout=30).json()
    print(f"{'tool':>16} {'samples':>7} {'mean s':>7}  predicts from")
    for name, t in stats["tools"].items():
        print(f"{name:>16} {t['samples']:>7} {t['mean_s']:>7.3f}  {t['predicts_from']}")
    metrics = httpx.get(base_url + "/metrics", timeout=30).text
    for kind in ("actual", "predicted"):
        total = _metric(metrics, f"agentserve_tool_{kind}_seconds_sum")
        count = _metric(metrics, f"agentserve_tool_{kind}_seconds_count")
        mean = f"{total / count:.3f} s mean" if count else "none yet"
        print(f"/metrics agentserve_tool_{kind}_seconds: {count:.0f} reported, {mean}")
    print(f"live programs after the run: {stats['programs']}; pins held: {stats['engine'].get('pins', 0)}")


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def print_turns(rows: list[tuple[str, int, int]]) -> None:
    """(program, prompt tokens, cached tokens) per LLM call."""
    print(f"{'program':>40} {'prompt':>7} {'cached':>7}")
    for program, prompt, cached in rows:
        print(f"{program[-40:]:>40} {prompt:>7} {cached:>7}")
