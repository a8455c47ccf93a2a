"""mini-swe-agent on agentserve: SWE-bench-style instances, each one program, its commands timed.

mini-swe-agent's own SWE-bench config (its agent templates, observation format) and agent loop run
each instance in a local environment (a scratch directory), with agentserve's model class chosen by
the config, as a `mini-extra swebench` batch run chooses it:

    model:
      model_class: agentserve.integrations.minisweagent.AgentServeModel
      model_name: hosted_vllm/tiny

The batch runner builds one model per instance, so each instance is one program; the commands the
environment runs are reported as tool calls, and the program ends when the instance's model is
dropped. Prints each call's prompt and cached tokens, then the tool times the server learned.

    python examples/minisweagent_swebench.py                 # starts its own server on the tiny model
    python examples/minisweagent_swebench.py --base-url http://127.0.0.1:8000 --instances 8
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
from pathlib import Path

import httpx

from framework_common import agentserve, arguments, print_tool_report, print_turns, tool_call

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm's price list from its package
os.environ.setdefault("MSWEA_SILENT_STARTUP", "1")
# What the random-weight model "decides": a short command, so a step's tool time is real and small.
COMMANDS = '\\{"command": "(sleep 0\\.(2|3)|ls -la|pwd)"\\}'


def swebench_config() -> dict:
    import yaml
    from minisweagent.config import builtin_config_dir

    return yaml.safe_load((Path(builtin_config_dir) / "benchmarks" / "swebench.yaml").read_text())


def run_instance(base_url: str, model: str, instance: str, workdir: str, steps: int, tool: str = "bash",
                 commands: str = COMMANDS) -> dict:
    """One instance as mini-swe-agent runs it; returns its program id, exit status, the program's DAG
    (read before the program ends) and each call's (prompt, cached) tokens."""
    from minisweagent.agents.default import DefaultAgent
    from minisweagent.environments.local import LocalEnvironment
    from minisweagent.models import get_model

    config = swebench_config()
    llm = get_model(config={**config["model"], "model_class": "agentserve.integrations.minisweagent.AgentServeModel",
                            "model_name": f"hosted_vllm/{model}", "tool": tool,
                            "model_kwargs": {"api_base": base_url + "/v1", "max_tokens": 64,
                                             "extra_body": tool_call("bash", commands)}})
    agent = DefaultAgent(llm, LocalEnvironment(cwd=workdir), **{**config["agent"], "step_limit": steps})
    info = agent.run(f"Fix the failing test of {instance}.")
    program_id = llm.program.program_id
    described = httpx.get(f"{base_url}/v1/programs/{program_id}", timeout=30).json()
    usages = [(m["extra"]["response"]["usage"]["prompt_tokens"],
               m["extra"]["response"]["usage"]["prompt_tokens_details"]["cached_tokens"])
              for m in agent.messages if "response" in m.get("extra", {})]
    del agent, llm  # as the batch runner drops an instance's model: its program ends
    gc.collect()
    return {"program_id": program_id, "exit_status": info["exit_status"], "described": described, "usages": usages}


def main() -> int:
    ap = arguments(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    ap.add_argument("--instances", type=int, default=6, help="instances to run (default: 6)")
    ap.add_argument("--steps", type=int, default=5, help="agent steps per instance (default: 5)")
    args = ap.parse_args()
    with agentserve(args) as base_url, tempfile.TemporaryDirectory() as workdir:
        rows = []
        for i in range(args.instances):
            result = run_instance(base_url, args.model, f"demo__repo-{i}", workdir, args.steps)
            rows += [(result["program_id"], p, c) for p, c in result["usages"]]
        print_turns(rows)
        print_tool_report(base_url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
