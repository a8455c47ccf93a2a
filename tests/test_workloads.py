"""Trace adapters, the tool-time model and the replay plan: no engine needed."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import msgspec
import pytest

from workloads import DEFAULT_TRACE
from workloads.adapters import bfcl
from workloads.formats import FORMATS, detect, load_trace
from workloads.plan import TEMPLATE_TOKENS_PER_TURN, ReplayConfig, plan
from workloads.schema import Trace, TraceError
from workloads.tool_times import MODEL_PATH, ToolTimeModel, fit

FIXTURES = Path(__file__).parent / "data" / "traces"
SHARED = next((p for p in (Path(os.environ.get("AGENTSERVE_SHARED_TRACES", "/nonexistent")),
                           Path(__file__).resolve().parents[2] / "shared" / "traces",
                           Path("/work/shared/traces")) if p.is_dir()), None)


def shared(rel: str) -> Path:
    if SHARED is None or not (SHARED / rel).exists():
        pytest.skip(f"shared trace {rel} not on this machine")
    return SHARED / rel


def sample_files(fixture: str, shared_glob: str) -> list[Path]:
    """The in-repo fixture, plus the full shared files where this machine has them."""
    files = [FIXTURES / fixture]
    if SHARED is not None:
        files += sorted(SHARED.glob(shared_glob))
    return files


def single(path: Path, fmt: str):
    """(raw JSON, the one program) of a one-program trace file, checking its format is detected."""
    data = json.loads(path.read_text())
    (program,) = load_trace(path).programs
    assert detect(path) == fmt
    return data, program


def by_name(path: Path) -> str:
    return path.name


def assistant_count(messages) -> int:
    return sum(m.get("role") == "assistant" for m in messages)


# ---- each adapter: programs and turns as counted in the file -------------------------------------

def check_per_turn(path: Path) -> None:
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    trace = load_trace(path)
    assert detect(path) == "minisweagent"
    assert [p.id for p in trace.programs] == [x["instance_id"] for x in lines]
    assert [len(p.turns) for p in trace.programs] == [x["n_turns"] for x in lines]
    for p, x in zip(trace.programs, lines):
        raw = x["turns"]
        assert p.turns[0].new_tokens == raw[0]["prompt_tokens"]
        for k in range(1, len(raw)):  # new input = the prompt's growth minus the visible previous answer
            visible = raw[k - 1]["completion_tokens"] - (raw[k - 1]["reasoning_tokens"] or 0)
            assert p.turns[k].new_tokens == max(0, raw[k]["prompt_tokens"] - raw[k - 1]["prompt_tokens"] - visible)
        assert [t.output_tokens for t in p.turns] == [max(1, t["completion_tokens"]) for t in raw]
        assert p.turns[-1].tool is None and all(t.tool == "bash" for t in p.turns[:-1])


def test_minisweagent_per_turn_embedded():
    check_per_turn(DEFAULT_TRACE)


def test_minisweagent_per_turn_shared():
    check_per_turn(shared("swe/minisweagent_gemini3pro/per_turn_400.jsonl"))


TRAJS = sample_files("astropy__astropy-7336.traj.json", "swe/minisweagent_gemini3pro/trajs/*.traj.json")


@pytest.mark.parametrize("path", TRAJS, ids=by_name)
def test_minisweagent_traj(path):
    data, program = single(path, "minisweagent-traj")
    assert len(program.turns) == assistant_count(data["messages"])
    first = next(m for m in data["messages"] if m["role"] == "assistant")
    assert program.turns[0].new_tokens == first["extra"]["response"]["usage"]["prompt_tokens"]


@pytest.mark.parametrize("path", sample_files("continuum_2.json", "swe/continuum_trace/test.json"), ids=by_name)
def test_continuum(path):
    data = json.loads(path.read_text())
    trace = load_trace(path)
    assert detect(path) == "continuum"
    assert len(trace.programs) == len(data)
    for p, entry in zip(trace.programs, data):
        assert len(p.turns) == assistant_count(json.loads(entry["messages"]))
        timed = [t for t in p.turns[:-1] if t.tool_s is not None]
        assert timed and all(t.tool in ("bash", "str_replace_editor", "submit") for t in timed)
    # execution_time_seconds of the file, summed, survive (up to the last call, which runs no tool)
    raw = sum(float(x) for x in re.findall(r"execution_time_seconds\\?['\"]: ([0-9.]+)",
                                           "".join(e["messages"] for e in data)))
    got = sum(t.tool_s or 0 for p in trace.programs for t in p.turns)
    assert 0 < got <= raw + 1e-6


@pytest.mark.parametrize("path", sample_files("openhands_1.output.jsonl", "swe/openhands/*.jsonl"), ids=by_name)
def test_openhands(path):
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    trace = load_trace(path)
    assert detect(path) == "openhands"
    assert len(trace.programs) == len(lines)
    for p, x in zip(trace.programs, lines):
        responses = {(a.get("tool_call_metadata") or {}).get("model_response", {}).get("id")
                     for a in x["history"] if a.get("action") and a.get("tool_call_metadata")}
        assert len(p.turns) == len(responses)
        assert sum(t.tool_s is not None for t in p.turns[:-1]) >= len(p.turns) // 2  # observations timed
        assert all(t.tool_s is None or 0 <= t.tool_s < 3600 for t in p.turns)


SWEAGENT = sample_files("test-repo_6e44b9__sweagenttestrepo-1c2844.traj", "swe/sweagent_demos/*.traj")


@pytest.mark.parametrize("path", SWEAGENT, ids=by_name)
def test_sweagent(path):
    data, program = single(path, "sweagent")
    assert len(program.turns) == len(data["trajectory"])
    for turn, step in zip(program.turns[:-1], data["trajectory"]):
        assert turn.tool_s == pytest.approx(float(step["execution_time"]))
        assert turn.tool == step["action"].split()[0]


def test_directory_loads_every_recognised_file():
    trace = load_trace(FIXTURES)  # the README in it is skipped
    sources = {p.source for p in trace.programs}
    assert sources == {"minisweagent-traj", "continuum", "openhands", "sweagent"}


@pytest.mark.parametrize("category", bfcl.CATEGORIES)
def test_bfcl(category):
    path = bfcl.category_file(category)
    entries = [json.loads(x) for x in path.read_text().splitlines()]
    truth = {json.loads(x)["id"]: json.loads(x)["ground_truth"]
             for x in (path.parent / "possible_answer" / path.name).read_text().splitlines()}
    trace = load_trace(f"bfcl:{category}")
    assert len(trace.programs) == len(entries) == 200
    for p, e in zip(trace.programs, entries):
        # one LLM call per ground-truth function call, plus one answer per user turn
        assert len(p.turns) == sum(len(c) for c in truth[e["id"]]) + len(e["question"])
        assert p.turns[0].new_tokens > 100  # the function docs are in the first prompt
        assert p.source == "bfcl" and p.turns[-1].tool is None


def test_native_format_round_trip(tmp_path):
    trace = load_trace(DEFAULT_TRACE)
    out = tmp_path / "mine.json"
    out.write_bytes(msgspec.json.encode(trace))
    again = load_trace(out)
    assert detect(out) == "agentserve" and again.programs == trace.programs


# ---- bad input: a clear error naming the file (and line) ----------------------------------------

def test_bad_json_line_names_file_and_line(tmp_path):
    good = DEFAULT_TRACE.read_text().splitlines()[0]
    bad = tmp_path / "t.jsonl"
    bad.write_text(good + "\n" + good[:50] + "\n")
    with pytest.raises(TraceError, match=r"t\.jsonl:2: not valid JSON"):
        load_trace(bad, "minisweagent")


def test_missing_field_names_line(tmp_path):
    bad = tmp_path / "t.jsonl"
    bad.write_text(json.dumps({"instance_id": "a", "turns": [{"prompt_tokens": 5}]}) + "\n")
    with pytest.raises(TraceError, match=r"t\.jsonl:1: .*completion_tokens"):
        load_trace(bad)


def test_unknown_format_and_missing_file(tmp_path):
    junk = tmp_path / "junk.txt"
    junk.write_text("hello\n")
    with pytest.raises(TraceError, match="unrecognised trace format"):
        load_trace(junk)
    with pytest.raises(TraceError, match="no such file"):
        load_trace(tmp_path / "nope.jsonl")
    with pytest.raises(TraceError, match="unknown format"):
        load_trace(junk, "csv")
    with pytest.raises(TraceError, match="unknown BFCL"):
        load_trace("bfcl:web")


def test_native_validation_error(tmp_path):
    bad = tmp_path / "t.json"
    bad.write_text(json.dumps({"name": "x", "programs": [{"id": "p", "turns": [{"new_tokens": -1,
                                                                                 "output_tokens": 3}]}]}))
    with pytest.raises(TraceError, match=r"t\.json: not an agentserve trace.*new_tokens"):
        load_trace(bad)


# ---- tool-time model --------------------------------------------------------------------------

def test_shipped_tool_model_matches_a_refit():
    s = shared("swe")
    programs = [p for src in ("continuum_trace/test.json", "openhands", "sweagent_demos")
                for p in load_trace(s / src).programs]
    assert msgspec.json.encode(fit(programs)) == msgspec.json.encode(ToolTimeModel.load(MODEL_PATH))


def test_tool_model_sampling_is_deterministic_and_shaped():
    m = ToolTimeModel.load()
    a = [m.sample("minisweagent", "bash", f"p/{i}", 0) for i in range(2000)]
    assert a == [m.sample("minisweagent", "bash", f"p/{i}", 0) for i in range(2000)]
    assert a != [m.sample("minisweagent", "bash", f"p/{i}", 1) for i in range(2000)]
    a.sort()
    assert 0.3 < a[1000] < 1.2 and a[1980] > 3 * a[1000]  # SWE shell: p50 ~0.5-0.7 s, heavy tail
    b = [m.sample("bfcl", "ls", f"p/{i}", 0) for i in range(4000)]
    assert 1.5 < sum(b) / len(b) < 2.4  # Continuum's BFCL mean, 1.92 s
    assert m.dist("openhands", "execute_bash") == m.dist("minisweagent", "bash")  # one shell tool


# ---- plan ----------------------------------------------------------------------------------------

def test_plan_is_deterministic_and_scaled():
    trace = load_trace(DEFAULT_TRACE)
    cfg = ReplayConfig(programs=5, rate=0.5, token_scale=0.25, max_turns=4, seed=3)
    a = plan(trace, cfg, ToolTimeModel.load(), 4096)
    assert a == plan(trace, cfg, ToolTimeModel.load(), 4096)
    assert len(a) == 5 and len({p.id for p in a}) == 5
    assert [p.arrival_s for p in a] == sorted(p.arrival_s for p in a) and a[0].arrival_s == 0
    by_id = {p.id: p for p in trace.programs}
    for p in a:
        src = by_id[p.id]
        assert len(p.turns) <= 4 and p.turns[-1].tool is None and p.turns[-1].tool_s == 0
        assert p.turns[0].new_tokens == round(src.turns[0].new_tokens * 0.25)
        assert all(t.tool_s > 0 for t in p.turns[:-1])


def test_plan_cuts_turns_that_do_not_fit():
    trace = load_trace(DEFAULT_TRACE)
    for p in plan(trace, ReplayConfig(programs=16, rate=1.0, token_scale=1.0, max_turns=None),
                  ToolTimeModel.load(), 2048):
        context = sum(t.new_tokens + t.output_tokens for t in p.turns)
        assert context + TEMPLATE_TOKENS_PER_TURN * len(p.turns) <= 2048 or len(p.turns) == 1
        assert p.cut_for_context or len(p.turns) == len(next(q for q in trace.programs if q.id == p.id).turns)


def test_plan_concurrency_mode_and_more_programs_than_the_trace():
    trace = Trace(name="t", programs=load_trace(DEFAULT_TRACE).programs[:2])
    got = plan(trace, ReplayConfig(programs=5, rate=None, concurrency=2), ToolTimeModel.load(), 8192)
    assert len(got) == 5 and len({p.id for p in got}) == 5 and all(p.arrival_s == 0 for p in got)


def test_replay_config_rejects_nonsense():
    for bad in (dict(rate=None), dict(rate=1.0, concurrency=2), dict(programs=0), dict(token_scale=0),
                dict(rate=-1.0), dict(max_turns=0)):
        with pytest.raises(ValueError):
            ReplayConfig(**bad)


def test_every_format_is_registered_once():
    assert len(FORMATS) == len(set(FORMATS)) and "agentserve" in FORMATS


def test_policy_specs():
    from workloads.replay import EngineSetup, policy_spec

    assert policy_spec("agentserve") == ("agentserve", [])
    assert policy_spec("agentserve+pin-mode=ordered+max-wait=0") == (
        "agentserve", ["--pin-mode", "ordered", "--max-wait", "0"])
    from agentserve.cli import build_parser
    from agentserve.options import AdmissionOptions, EngineSettings, ProgramOptions, from_flags

    args = EngineSetup(engine=EngineSettings(kv_tokens=4096)).serve_args("oracle", programs=4)
    assert args[args.index("--kv-tokens") + 1] == "131072" and args[args.index("--policy") + 1] == "vllm"
    args = EngineSetup().serve_args("continuum+pin-cap=0.9", programs=4)
    assert args[-2:] == ["--pin-cap", "0.9"] and args[args.index("--policy") + 1] == "continuum"
    # what a replay passes on is what `agentserve serve` reads back, for every option the setup holds
    setup = EngineSetup(engine=EngineSettings(kv_tokens=4096, block_size=64, dtype="bfloat16"),
                        program=ProgramOptions(max_wait_s=0.0, pin_mode="ordered",
                                               admission=AdmissionOptions(mode="on", share=0.8, max_hold_s=5.0)))
    parsed = build_parser().parse_args(["serve", *setup.serve_args("fixed+fixed-ttl=3", programs=4)])
    assert from_flags(EngineSettings, parsed) == EngineSettings(kv_tokens=4096, block_size=64, dtype="bfloat16",
                                                                max_model_len=4096)
    assert from_flags(ProgramOptions, parsed) == ProgramOptions(
        policy="fixed", fixed_ttl_s=3.0, max_wait_s=0.0, pin_mode="ordered",
        admission=AdmissionOptions(mode="on", share=0.8, max_hold_s=5.0))
    assert policy_spec("agentserve+replicas=2+router=prefix") == (
        "agentserve", ["--replicas", "2", "--router", "prefix"])
    assert policy_spec("vllm+replicas=2") == ("vllm", ["--replicas", "2"])  # stock vLLM on Ray Serve
    assert policy_spec("agentserve+admission-share=1.0+admission-max-hold=30") == (
        "agentserve", ["--admission-share", "1.0", "--admission-max-hold", "30"])
    assert policy_spec("agentserve+admission-pause=false+admission-mode=on") == (
        "agentserve", ["--no-admission-pause", "--admission-mode", "on"])  # a switch is true or false
    with pytest.raises(ValueError, match="true or false"):
        policy_spec("agentserve+admission-pause=maybe")
    # the replay's client: the policy's own unless the spec names one (it is no serve option)
    from workloads.replay import client_of

    assert policy_spec("agentserve+client=openai+infer-programs=true") == ("agentserve", ["--infer-programs"])
    assert [client_of(s) for s in ("agentserve", "vllm+offload", "agentserve+client=openai",
                                   "vllm+client=agentserve")] == ["agentserve", "openai", "openai", "agentserve"]
    with pytest.raises(ValueError, match="client is one of"):
        policy_spec("agentserve+client=curl")
    # what each policy implies (host tier, plugin, the oracle's budget): tests/test_policies.py
    assert policy_spec("vllm+offload") == ("vllm+offload", [])  # a row of its own, served as vllm
    for bad in ("magic", "agentserve+x", "agentserve+colour=red", "oracle+max-wait=1", "vllm+pin-cap=1",
                "oracle+replicas=2", "agentserve+offload", "oracle+offload"):
        with pytest.raises(ValueError):
            policy_spec(bad)
