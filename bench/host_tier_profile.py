"""The host tier's load-back cost against a re-prefill, on one engine: the start-up profiles
(`measure_transfer_profile`, `measure_reload_profile`) of the `bench` model with 8k of device KV and a
64k-token tier, printed side by side (docs/benchmarks.md, "What prefetch would save").

    .venv/bin/python bench/host_tier_profile.py
"""

import asyncio

from agentserve.engine.embedded import start_engine
from agentserve.engine.profiling import measure_reload_profile, measure_transfer_profile
from agentserve.engine.settings import engine_settings_for
from agentserve.options import EngineSettings, ProgramOptions, load


async def main() -> None:
    settings = engine_settings_for(EngineSettings(model="bench", kv_tokens=8192),
                                   load(ProgramOptions, {"host": {"kv_tokens": 65536}}))
    async with start_engine(settings) as engine:
        load_back = await measure_transfer_profile(engine, 4096)
        reload = await measure_reload_profile(engine, 4096)
    for (n, copy), (_, prefill) in zip(load_back.points, reload.points):
        print(f"{n:5d} tokens: load-back {copy * 1e3:6.1f} ms, re-prefill {prefill * 1e3:7.1f} ms")


if __name__ == "__main__":
    asyncio.run(main())
