"""The host tier's load-back cost against a re-prefill, on one engine: the start-up profiles
(`measure_transfer_profile`, `measure_reload_profile`) of the `bench` model with 8k of device KV and a
64k-token tier, printed side by side (docs/benchmarks.md, "What prefetch would save" and the
throttled-copy run), optionally with every copy made `--copy-throttle` times slower.

    .venv/bin/python bench/host_tier_profile.py [--copy-throttle 8]
"""

import argparse
import asyncio

from agentserve.engine.embedded import start_engine
from agentserve.engine.profiling import measure_reload_profile, measure_transfer_profile
from agentserve.engine.settings import engine_settings_for
from agentserve.options import EngineSettings, ProgramOptions, load


async def main(throttle: float) -> None:
    settings = engine_settings_for(EngineSettings(model="bench", kv_tokens=8192),
                                   load(ProgramOptions, {"host": {"kv_tokens": 65536, "copy_throttle": throttle}}))
    async with start_engine(settings) as engine:
        load_back = await measure_transfer_profile(engine, 4096)
        reload = await measure_reload_profile(engine, 4096)
    for (n, copy), (_, prefill) in zip(load_back.points, reload.points):
        ratio = f"{prefill / copy:5.1f}x" if copy > 0 else "  inf"
        print(f"{n:5d} tokens: load-back {copy * 1e3:6.1f} ms, re-prefill {prefill * 1e3:7.1f} ms ({ratio})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--copy-throttle", type=float, default=1.0, help="each copy this many times slower")
    asyncio.run(main(parser.parse_args().copy_throttle))
