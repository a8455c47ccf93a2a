"""Agent workloads: trace adapters into a neutral schema, the tool-time model, and the replay driver.

    from workloads.formats import load_trace      # any supported trace format -> schema.Trace
    agentserve replay --trace PATH --policies vllm,continuum,agentserve,oracle
"""

from pathlib import Path

DEFAULT_TRACE = Path(__file__).parent / "data" / "swe_minisweagent_16.jsonl"
