"""The `tracelab` trace format (TraceLab's normalized round rows) on the shipped example."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workloads.formats import detect, load_trace
from workloads.schema import TraceError

EXAMPLE = Path(__file__).parent.parent / "workloads" / "data" / "tracelab_example.jsonl"


def test_the_example_is_detected_and_every_session_becomes_programs():
    assert detect(EXAMPLE) == "tracelab"
    programs = {p.id: p for p in load_trace(EXAMPLE).programs}
    assert sorted(programs) == ["cc-1", "cx-1", "cx-1/c1"]  # the Codex session was compacted once
    assert all(p.source == "tracelab" for p in programs.values())


def test_claude_session_turns_from_prompt_growth_and_tool_spans():
    cc = next(p for p in load_trace(EXAMPLE).programs if p.id == "cc-1")
    # new input = prompt_k - prompt_{k-1} - output_{k-1}: the observation the next round reads
    assert [t.new_tokens for t in cc.turns] == [14200, 15600 - 14200 - 180, 15950 - 15600 - 240, 17200 - 15950 - 120]
    assert [t.output_tokens for t in cc.turns] == [180, 240, 120, 90]
    # parallel Read + Grep: the span from the first emit to the last result (0.32 s), not their sum
    assert cc.turns[0].tool == "Read" and cc.turns[0].tool_s == pytest.approx(0.32)
    assert cc.turns[2].tool == "Bash" and cc.turns[2].tool_s == pytest.approx(14.5)  # wall time, not internal
    assert cc.turns[-1].tool is None and cc.turns[-1].tool_s is None  # the last round ends the program


def test_codex_session_reasoning_latencies_and_compaction():
    programs = {p.id: p for p in load_trace(EXAMPLE).programs}
    cx, after = programs["cx-1"], programs["cx-1/c1"]
    # reasoning is not in the next prompt: 11500 - 9000 - (400 - 300)
    assert [t.new_tokens for t in cx.turns] == [9000, 2400]
    assert cx.turns[0].tool_s == pytest.approx(2.1)  # no timestamps: the wall latency
    # the compacted prompt (4200 < half of 11500) starts a new program from its own prompt
    assert [t.new_tokens for t in after.turns] == [4200, 5000 - 4200 - (260 - 100)]
    assert after.turns[0].tool == "shell" and after.turns[0].tool_s == pytest.approx(0.9)


def test_rounds_are_ordered_by_index_whatever_the_file_order(tmp_path):
    rows = [json.loads(line) for line in EXAMPLE.read_text().splitlines()]
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))
    assert load_trace(shuffled).programs == sorted(load_trace(EXAMPLE).programs, key=lambda p: ["cx-1", "cx-1/c1", "cc-1"].index(p.id))


def test_bad_rows_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"session_id": "s", "round_index": 0, "input_tokens_total": 10, "output_tokens": 3}) + "\n"
                   + json.dumps({"session_id": "s", "round_index": 1, "input_tokens_total": -5, "output_tokens": 3}) + "\n")
    with pytest.raises(TraceError, match=r"bad.jsonl:2: input_tokens_total must be a count"):
        load_trace(bad)
    bad.write_text(json.dumps({"session_id": "s", "round_index": "0", "input_tokens_total": 10}) + "\n")
    with pytest.raises(TraceError, match="round_index must be an integer"):
        load_trace(bad, "tracelab")
