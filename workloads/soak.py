"""A soak: random agent traffic against one served engine with the host KV tier, for minutes, checking
what must not grow.

    python -m workloads.soak --minutes 30 --out soak-out [-- SERVE FLAGS]     (make soak MINUTES=30)

The load mixes every way a client reaches agentserve, a few at a time (`--clients`), each picking its
next job at random:
- sdk: an SDK program (2-5 turns, timed tool calls, sometimes a sub-agent), ended by its last call;
- plain: a plain OpenAI loop naming nothing (the server infers the program from the conversation);
- session: a loop naming its program with `X-Session-ID` (it ends by idle expiry);
- stream_disconnect: a streamed program call whose client goes away after a few chunks;
- abort: a program call whose client times out before the answer (a disconnect mid-request).

Every `--sample` seconds and at the end it records: live programs, pins, host-tier chunks (held and
in use), the front end's open engine streams, and the RSS of each of the server's processes. The host
pool commits memory as it fills, so the RSS is also given less the tier's fill (chunks held x bytes a
chunk). At the end the load stops and the server is given the programs' idle expiry to settle; what is
left then is a leak. Writes OUT/soak.json, OUT/soak.md (the table) and OUT/soak.png (RSS and live
programs over time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

MODEL = "tiny"
WORDS = ("tool output line", "the test failed at", "patch applied to", "reading file", "grep found", "ok")
JOBS = {"sdk": 4, "plain": 3, "session": 2, "stream_disconnect": 1, "abort": 1}  # relative frequency
SETTLE_MARGIN_S = 30.0  # after the idle expiry, how long the end state may take to settle
GROWTH_AFTER_S = 300.0  # RSS growth is measured from the first sample past this (warm-up excluded)


@dataclass
class SoakConfig:
    minutes: float = 30.0
    clients: int = 4
    kv_tokens: int = 2048
    host_kv_tokens: int = 8192
    idle_timeout_s: float = 20.0  # session programs end by idle expiry: short, so the end state settles
    sample_s: float = 60.0
    seed: int = 0
    serve_args: tuple[str, ...] = ()  # more `agentserve serve` flags, e.g. ("--policy", "fixed") to pin every turn


@dataclass
class Sample:
    t_s: float
    programs: int
    pins: int
    host_chunks: int
    host_chunks_in_use: int
    streams_open: int
    rss_mb: dict[str, float]
    tier_fill_mb: float

    @property
    def rss_less_fill_mb(self) -> float:
        return sum(self.rss_mb.values()) - self.tier_fill_mb


@dataclass
class Tally:
    jobs: dict[str, int] = field(default_factory=dict)
    calls: int = 0
    status: dict[str, int] = field(default_factory=dict)  # HTTP status of every answered request
    client_gone: int = 0  # calls whose client went away on purpose (stream_disconnect, abort)
    errors: list[str] = field(default_factory=list)  # anything else that failed (first few kept)

    def answered(self, status: int) -> None:
        self.status[str(status)] = self.status.get(str(status), 0) + 1

    @property
    def server_errors(self) -> int:
        return sum(n for s, n in self.status.items() if s.startswith("5"))


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


class Load:
    """The clients: each runs jobs until the deadline."""

    def __init__(self, base_url: str, rng: random.Random, tally: Tally):
        from openai import AsyncOpenAI

        from agentserve.sdk import AsyncAgentServe

        self.base_url, self.rng, self.tally = base_url, rng, tally
        self.agentserve = AsyncAgentServe(base_url)
        self.openai = AsyncOpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0)
        self.http = httpx.AsyncClient(base_url=base_url, timeout=120)

    async def close(self) -> None:
        await self.agentserve.close()
        await self.openai.close()
        await self.http.aclose()

    async def client(self, deadline: float) -> None:
        kinds, weights = list(JOBS), list(JOBS.values())
        while time.monotonic() < deadline:
            kind = self.rng.choices(kinds, weights)[0]
            self.tally.jobs[kind] = self.tally.jobs.get(kind, 0) + 1
            try:
                await getattr(self, kind)()
            except Exception as e:  # noqa: BLE001 - counted and reported, the soak goes on
                status = getattr(e, "status_code", None) or getattr(getattr(e, "response", None), "status_code", None)
                if status is not None:
                    self.tally.answered(status)
                if len(self.tally.errors) < 20:
                    self.tally.errors.append(f"{kind}: {type(e).__name__}: {str(e)[:200]}")

    def _prompt(self) -> list[dict]:
        return [{"role": "system", "content": "You are a coding agent. " + _text(self.rng, 40)},
                {"role": "user", "content": "Fix the issue: " + _text(self.rng, self.rng.randint(20, 120))}]

    async def _tool(self) -> float:
        seconds = self.rng.uniform(0.05, 1.5)
        await asyncio.sleep(seconds)
        return seconds

    async def sdk(self, parent=None) -> None:
        prog = parent.spawn() if parent is not None else self.agentserve.program()
        messages, turns = self._prompt(), self.rng.randint(2, 5)
        for turn in range(turns):
            last = turn == turns - 1
            r = await prog.chat(model=MODEL, messages=messages, max_tokens=self.rng.randint(8, 32), tool="bash",
                                last=last, end=last)
            self.tally.calls += 1
            self.tally.answered(200)
            if last:
                return
            async with prog.tool("bash"):
                await self._tool()
            if parent is None and turn == 0 and self.rng.random() < 0.3:
                await self.sdk(parent=prog)  # a sub-agent, between its parent's turns
            messages += [{"role": "assistant", "content": r.choices[0].message.content or ""},
                         {"role": "user", "content": _text(self.rng, self.rng.randint(10, 60))}]

    async def plain(self, headers: dict | None = None) -> None:
        messages = self._prompt()
        for _ in range(self.rng.randint(2, 4)):
            r = await self.openai.chat.completions.create(model=MODEL, messages=messages, extra_headers=headers,
                                                          max_tokens=self.rng.randint(8, 32))
            self.tally.calls += 1
            self.tally.answered(200)
            await self._tool()
            messages += [{"role": "assistant", "content": r.choices[0].message.content or ""},
                         {"role": "user", "content": _text(self.rng, self.rng.randint(10, 60))}]

    async def session(self) -> None:
        await self.plain({"X-Session-ID": f"soak-{self.rng.getrandbits(48):x}"})

    async def stream_disconnect(self) -> None:
        body = {"model": MODEL, "messages": self._prompt(), "max_tokens": 64, "stream": True,
                "agentserve": {"program_id": f"soak-stream-{self.rng.getrandbits(48):x}"}}
        async with self.http.stream("POST", "/v1/chat/completions", json=body) as r:
            self.tally.answered(r.status_code)
            chunks, keep = 0, self.rng.randint(1, 4)
            async for _ in r.aiter_lines():
                chunks += 1
                if chunks >= keep:
                    break  # leaving the block closes the connection: the client is gone
        self.tally.calls += 1
        self.tally.client_gone += 1

    async def abort(self) -> None:
        body = {"model": MODEL, "messages": self._prompt(), "max_tokens": 64,
                "agentserve": {"program_id": f"soak-abort-{self.rng.getrandbits(48):x}"}}
        try:
            r = await self.http.post("/v1/chat/completions", json=body, timeout=self.rng.uniform(0.05, 0.5))
            self.tally.answered(r.status_code)  # answered before the client gave up
        except httpx.TimeoutException:
            self.tally.client_gone += 1
        self.tally.calls += 1


class Probe:
    """What the server holds now: its stats route, its metrics, its processes' RSS."""

    def __init__(self, base_url: str, pid: int, bytes_per_chunk: float):
        self.base_url, self.pid, self.bytes_per_chunk = base_url, pid, bytes_per_chunk
        self.t0 = time.monotonic()

    def sample(self) -> Sample:
        import psutil

        stats = httpx.get(self.base_url + "/v1/agentserve/stats", timeout=30).json()
        metrics = httpx.get(self.base_url + "/metrics", timeout=30).text
        engine, tier = stats.get("engine", {}), stats.get("engine", {}).get("host_tier") or {}
        streams = re.search(r"^agentserve_engine_streams_open (\S+)$", metrics, re.M)
        root = psutil.Process(self.pid)
        rss: dict[str, float] = {}
        for proc in [root, *root.children(recursive=True)]:
            try:
                name = f"{proc.name()}[{proc.pid}]"
                rss[name] = proc.memory_info().rss / 2**20
            except psutil.NoSuchProcess:
                continue
        chunks = int(tier.get("chunks", 0))
        return Sample(round(time.monotonic() - self.t0, 1), int(stats.get("programs", 0)), int(engine.get("pins", 0)),
                      chunks, int(tier.get("in_use", 0)), int(float(streams.group(1))) if streams else -1, rss,
                      chunks * self.bytes_per_chunk / 2**20)

    def capacity(self) -> int:
        stats = httpx.get(self.base_url + "/v1/agentserve/stats", timeout=30).json()
        return int((stats.get("engine", {}).get("host_tier") or {}).get("capacity", 0))


def leaks(end: Sample) -> dict[str, int]:
    """What is still held once the load has stopped and the programs' idle expiry has passed."""
    return {"programs": end.programs, "pins": end.pins, "host_chunks_in_use": end.host_chunks_in_use,
            "streams_open": end.streams_open}


def rss_growth(samples: list[Sample]) -> float | None:
    """RSS less the tier's fill, from the first sample past the warm-up to the last, as a share of the
    first; None if the soak was too short to have a sample past the warm-up."""
    warm = [s for s in samples if s.t_s >= GROWTH_AFTER_S]
    if len(warm) < 2:
        return None
    return warm[-1].rss_less_fill_mb / warm[0].rss_less_fill_mb - 1.0


async def _run_load(base_url: str, config: SoakConfig, probe: Probe, samples: list[Sample], tally: Tally) -> None:
    rng = random.Random(config.seed)
    load = Load(base_url, rng, tally)
    deadline = time.monotonic() + config.minutes * 60

    async def sampler() -> None:
        while time.monotonic() < deadline:
            await asyncio.sleep(min(config.sample_s, max(0.0, deadline - time.monotonic())))
            samples.append(await asyncio.to_thread(probe.sample))

    try:
        await asyncio.gather(sampler(), *(load.client(deadline) for _ in range(config.clients)))
    finally:
        await load.close()


def settle(probe: Probe, config: SoakConfig) -> Sample:
    """Wait for the end state: nothing held, or the idle expiry plus a margin passed."""
    deadline = time.monotonic() + config.idle_timeout_s + SETTLE_MARGIN_S
    while True:
        end = probe.sample()
        if not any(leaks(end).values()) or time.monotonic() > deadline:
            return end
        time.sleep(2.0)


def soak(config: SoakConfig, out: Path) -> dict:
    from agentserve.engine.settings import kv_bytes_per_token, resolve_model
    from agentserve.server.process import ServerProcess

    out.mkdir(parents=True, exist_ok=True)
    args = ["--model", MODEL, "--kv-tokens", str(config.kv_tokens), "--host-kv-tokens", str(config.host_kv_tokens),
            "--idle-timeout", str(config.idle_timeout_s), "--infer-programs", *config.serve_args]
    tally, samples = Tally(), []
    with ServerProcess(args, log_path=str(out / "server.log")) as server:
        model_dir, _ = resolve_model(MODEL)
        probe = Probe(server.base_url, server.proc.pid, 0.0)
        capacity = probe.capacity()
        probe.bytes_per_chunk = config.host_kv_tokens * kv_bytes_per_token(model_dir, "float32") / max(1, capacity)
        samples.append(probe.sample())
        asyncio.run(_run_load(server.base_url, config, probe, samples, tally))
        samples.append(probe.sample())  # the load's end
        end = settle(probe, config)
        alive = server.alive()
    result = {"config": asdict(config), "tally": {**asdict(tally), "server_errors": tally.server_errors},
              "samples": [{**asdict(s), "rss_less_fill_mb": s.rss_less_fill_mb} for s in samples],
              "end": {**asdict(end), "rss_less_fill_mb": end.rss_less_fill_mb}, "leaks": leaks(end),
              "rss_growth_after_warmup": rss_growth(samples), "server_alive": alive}
    (out / "soak.json").write_text(json.dumps(result, indent=1))
    (out / "soak.md").write_text(table(result))
    plot(samples, out / "soak.png")
    return result


def table(result: dict) -> str:
    rows = ["| t (s) | programs | pins | host chunks (in use) | streams open | RSS MB (each process) | RSS less tier fill MB |",
            "|---|---|---|---|---|---|---|"]
    for s in [*result["samples"], {**result["end"], "t_s": "end"}]:
        each = " + ".join(f"{v:.0f}" for v in s["rss_mb"].values())
        rows.append(f"| {s['t_s']} | {s['programs']} | {s['pins']} | {s['host_chunks']} ({s['host_chunks_in_use']}) "
                    f"| {s['streams_open']} | {each} | {s['rss_less_fill_mb']:.0f} |")
    tally, growth = result["tally"], result["rss_growth_after_warmup"]
    rows += ["", f"Jobs {tally['jobs']}, calls {tally['calls']}, HTTP status {tally['status']}, "
             f"clients gone on purpose {tally['client_gone']}, 5xx {tally['server_errors']}, "
             f"other errors {len(tally['errors'])}.",
             f"Leaks at the end: {result['leaks']}. RSS growth less the tier's fill after {GROWTH_AFTER_S:.0f} s: "
             + ("n/a (shorter soak)" if growth is None else f"{100 * growth:+.1f} %") + "."]
    return "\n".join(rows) + "\n"


def plot(samples: list[Sample], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.t_s / 60 for s in samples]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(t, [sum(s.rss_mb.values()) for s in samples], label="RSS, all processes")
    ax.plot(t, [s.rss_less_fill_mb for s in samples], label="RSS less the tier's fill")
    ax.set_xlabel("minutes")
    ax.set_ylabel("MB")
    right = ax.twinx()
    right.plot(t, [s.programs for s in samples], color="tab:green", linestyle="--", label="live programs")
    right.set_ylabel("live programs")
    fig.legend(loc="lower right", bbox_to_anchor=(0.88, 0.18))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = SoakConfig()
    p.add_argument("--minutes", type=float, default=defaults.minutes)
    p.add_argument("--clients", type=int, default=defaults.clients)
    p.add_argument("--sample", type=float, default=defaults.sample_s, help="seconds between samples")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("serve_args", nargs=argparse.REMAINDER,
                   help="after --: more `agentserve serve` flags (e.g. -- --policy fixed)")
    p.add_argument("--out", default="soak-out")
    a = p.parse_args(argv)
    if a.minutes <= 0 or a.clients < 1 or a.sample <= 0:
        p.error("--minutes and --sample must be > 0, --clients >= 1")
    serve_args = tuple(a.serve_args[1:] if a.serve_args[:1] == ["--"] else a.serve_args)
    result = soak(SoakConfig(minutes=a.minutes, clients=a.clients, sample_s=a.sample, seed=a.seed,
                             serve_args=serve_args), Path(a.out))
    print((Path(a.out) / "soak.md").read_text())
    ok = result["server_alive"] and not result["tally"]["server_errors"] and not any(result["leaks"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
