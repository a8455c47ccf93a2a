"""The Ray Serve app on the tiny model: 2 vLLM-CPU replicas running the scheduler plugin behind the
program-affinity router, one shared control plane. A program's turns stay on one replica and find
their pinned KV there, new programs spread, every response names its replica, program routes work
through the ingress, and a replica killed mid-replay costs retries, not programs or pins."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from agentserve.engine.settings import EngineSettings
from agentserve.engine.settings import SCHEDULER_CLS
from agentserve.options import ProgramOptions

pytestmark = pytest.mark.slow

PORT = 8123
BASE = f"http://127.0.0.1:{PORT}"
SETTINGS = EngineSettings(model="tiny", kv_tokens=4096, max_model_len=2048)
OPTIONS = ProgramOptions(policy="fixed", fixed_ttl_s=30.0, infer_programs=True)
BLOCK = 32


def test_engine_kwargs_carry_the_plugin_the_exact_kv_budget_and_cached_token_usage():
    from agentserve.rayserve.app import engine_kwargs
    from agentserve.engine.settings import engine_settings_for

    source, kw = engine_kwargs(engine_settings_for(SETTINGS, OPTIONS))
    assert (Path(source) / "config.json").exists()  # the locally built model directory
    assert kw["scheduler_cls"] == SCHEDULER_CLS and kw["scheduling_policy"] == "priority"
    assert kw["num_gpu_blocks_override"] == SETTINGS.for_device("cpu").num_blocks and kw["kv_cache_memory_bytes"] > 0
    assert kw["additional_config"]["agentserve"]["pin_cap_share"] == 0.5
    assert kw["enable_prompt_tokens_details"] is True
    assert not {"model", "served_model_name", "host", "port"} & set(kw)


@pytest.fixture(scope="module")
def ray_app():
    from tests.conftest import serve_app

    with serve_app(SETTINGS, OPTIONS, PORT):
        yield


def post(path: str, body: dict | None) -> tuple[int, dict, dict]:
    data = json.dumps(body).encode() if body is not None else b""
    req = urllib.request.Request(BASE + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def get(path: str) -> dict:
    with urllib.request.urlopen(BASE + path, timeout=60) as r:
        return json.loads(r.read())


def chat(program: str, turn: int, history: str) -> tuple[str, dict]:
    status, headers, body = post("/v1/chat/completions", {
        "model": "tiny", "max_tokens": 4, "temperature": 0,
        "messages": [{"role": "user", "content": history}],
        "agentserve": {"program_id": program, "turn": turn}})
    assert status == 200, body
    return headers["x-agentserve-replica"], body["usage"]


def engine_stats_when(predicate, timeout_s: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = get("/v1/agentserve/stats")
        if predicate(stats) or time.monotonic() > deadline:
            return stats
        time.sleep(0.2)


def test_program_turns_stay_on_their_replica_and_new_programs_spread(ray_app):
    def program(i: int) -> list[tuple[str, dict]]:
        history = " ".join(f"p{i}w{j}" for j in range(150))
        seen = []
        for turn in range(3):
            seen.append(chat(f"spread-{i}", turn, history))
            history += " " + " ".join(f"t{turn}x{j}" for j in range(40))
        return seen

    with ThreadPoolExecutor(6) as pool:
        runs = list(pool.map(program, range(6)))
    homes = set()
    for seen in runs:
        replicas = {r for r, _ in seen}
        assert len(replicas) == 1, f"a program's turns went to {replicas}"
        homes |= replicas
        for (_, before), (_, usage) in zip(seen, seen[1:]):  # the previous turn's KV, pinned there
            assert usage["prompt_tokens_details"]["cached_tokens"] >= (before["prompt_tokens"] // BLOCK) * BLOCK
    assert len(homes) == 2, "six concurrent new programs all landed on one replica"
    for i in range(6):
        assert post(f"/v1/programs/spread-{i}/end", None)[0] == 200
    # Stats taken after the replicas carried out the ends: a replica's last report may predate the
    # ends (even the last turns' pins), and a pin the next test makes must not meet these programs' pins.
    stats = engine_stats_when(lambda s: s["engine"]["commands_pending"] == 0 and s["engine"]["pinned_blocks"] == 0)
    assert stats["engine"]["pinned_blocks"] == 0 and stats["programs"] == 0 and len(stats["replicas"]) == 2, stats


def test_program_routes_and_wire_contract_through_the_ingress(ray_app):
    replica, _ = chat("routes-1", 0, "hello " * 100)
    try:
        status, _, body = post("/v1/programs/routes-1/tool", {"name": "bash", "event": "start"})
        assert status == 200, body
        status, _, body = post("/v1/programs/routes-1/tool", {"name": "bash", "event": "end", "duration_s": 0.5})
        assert status == 200 and body["duration_s"] == 0.5
        described = get("/v1/programs/routes-1")
        assert described["llm_calls"] == 1 and described["last_tool"] == "bash"
        stats = engine_stats_when(lambda s: s["replicas"].get(replica, {}).get("pins") == 1)
        assert stats["replicas"][replica]["pins"] == 1, stats  # the turn's pin lives on the replica that served it
    finally:  # a failure here leaves no program behind for the next tests to count
        assert post("/v1/programs/routes-1/end", None)[0] == 200
    assert engine_stats_when(lambda s: s["engine"]["pins"] == 0)["engine"]["pins"] == 0
    status, _, body = post("/v1/programs/nope/end", None)
    assert status == 404 and body["error"]["param"] == "program_id"
    status, _, body = post("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                                    "agentserve": {"program_id": "p", "turn": "one"}})
    assert status == 400 and body["error"]["param"] == "agentserve.turn"
    status, headers, body = post("/v1/chat/completions", {"model": "tiny", "max_tokens": 2,
                                                          "messages": [{"role": "user", "content": "plain"}]})
    assert status == 200 and headers["x-agentserve-replica"]  # requests without a program: served as usual
    assert get("/health") == {}  # every replica started
    # request hints are judged at the ingress as on the embedded server (programs/hints.py)
    status, headers, body = post("/v1/chat/completions", {
        "model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hinted"}],
        "agent_hint": {"session_id": "hinted-1", "cache_control": {"type": "ephemeral", "ttl": 600}}})
    assert status == 200 and headers["x-agentserve-hints"] == f"agent_hint.cache_control.ttl=clipped:{OPTIONS.max_ttl_s:g}"
    assert post("/v1/programs/hinted-1/end", None)[0] == 200


def test_a_session_header_names_a_program_that_stays_on_its_replica_and_ends_by_header(ray_app):
    """Ray Serve LLM's session convention (`x-session-id`) through the same ingress middleware."""
    def call(extra_headers: dict) -> str:
        body = json.dumps({"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "s " * 80}]})
        req = urllib.request.Request(BASE + "/v1/chat/completions", data=body.encode(),
                                     headers={"Content-Type": "application/json", "x-session-id": "sess/1", **extra_headers})
        with urllib.request.urlopen(req, timeout=120) as r:
            return dict(r.headers)["x-agentserve-replica"]

    assert call({}) == call({})  # one program, one home
    assert get("/v1/programs/sess%2F1")["llm_calls"] == 2
    call({"x-agentserve-end-program": "true"})
    assert engine_stats_when(lambda s: s["programs"] == 0)["programs"] == 0


def test_conversations_that_name_no_program_stay_on_their_replica_from_their_first_turn(ray_app):
    """A plain client's loop: the ingress infers its program from the second turn on, and the router
    places the first turn as that program, so every turn lands where its KV is."""
    def conversation(i: int) -> list[tuple[str, str | None, dict]]:
        messages = [{"role": "user", "content": " ".join(f"c{i}w{j}" for j in range(150))}]
        seen = []
        for turn in range(3):
            status, headers, body = post("/v1/chat/completions", {"model": "tiny", "max_tokens": 4, "temperature": 0,
                                                                  "messages": messages})
            assert status == 200, body
            seen.append((headers["x-agentserve-replica"], headers.get("x-agentserve-program"), body["usage"]))
            messages += [body["choices"][0]["message"], {"role": "user", "content": f"result {turn} " * 30}]
        return seen

    with ThreadPoolExecutor(6) as pool:
        runs = list(pool.map(conversation, range(6)))
    homes = set()
    for seen in runs:
        assert len({r for r, _, _ in seen}) == 1, f"a conversation's turns went to {[r for r, _, _ in seen]}"
        homes.add(seen[0][0])
        programs = [p for _, p, _ in seen]
        assert programs[0] is None and programs[1] == programs[2] is not None  # a program from its second turn
        for (_, _, before), (_, _, usage) in zip(seen, seen[1:]):
            assert usage["prompt_tokens_details"]["cached_tokens"] >= (before["prompt_tokens"] // BLOCK) * BLOCK
        assert post(f"/v1/programs/{programs[1]}/end", None)[0] == 200
    assert len(homes) == 2, "six concurrent conversations all landed on one replica"
    stats = engine_stats_when(lambda s: s["engine"]["commands_pending"] == 0 and s["engine"]["pinned_blocks"] == 0)
    assert stats["engine"]["pinned_blocks"] == 0 and stats["programs"] == 0, stats


def test_killing_a_replica_mid_replay_loses_no_program_and_no_pin(ray_app):
    """Runs last (it kills a replica of the module's app)."""
    import ray

    from agentserve.models.build import ensure_model
    from workloads.driver import Driver
    from workloads.filler import Filler, single_token_words
    from workloads import DEFAULT_TRACE
    from workloads.formats import load_trace
    from workloads.plan import ReplayConfig, plan
    from workloads.tool_times import ToolTimeModel

    cfg = ReplayConfig(programs=6, rate=4.0, token_scale=0.1, time_scale=0.5, max_turns=5, seed=1)
    programs = plan(load_trace(str(DEFAULT_TRACE)), cfg, ToolTimeModel.load(), 2048)
    filler = Filler(single_token_words(ensure_model("tiny")))
    driver = Driver(BASE, "tiny", filler, client="agentserve", seed=1)

    def kill_a_replica() -> tuple[str, float]:
        time.sleep(4.0)  # programs are mid-flight on both replicas
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if "ProgramLLMServer" in a["name"]]
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
        return names[0].rpartition("#")[2], time.perf_counter()

    with ThreadPoolExecutor(1) as pool:
        killed = pool.submit(kill_a_replica)
        records = asyncio.run(driver.run(programs))
        killed_id, killed_at = killed.result()
    assert killed_at - driver.t0 < max(r.end for r in records) - 1.0  # it died mid-replay
    assert [r.error for r in records] == [None] * len(programs)
    assert all(len(r.turns) == len(p.turns) for r, p in zip(records, programs))
    stats = engine_stats_when(lambda s: killed_id not in s["replicas"] and s["engine"]["pins"] == 0, 30.0)
    assert killed_id not in stats["replicas"] and stats["replicas"], stats["replicas"]
    assert stats["engine"]["pins"] == 0 and stats["engine"]["pinned_blocks"] == 0 and stats["programs"] == 0
