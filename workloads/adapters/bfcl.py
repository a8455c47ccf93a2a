"""BFCL v4 multi-turn programs, read from the data files of the `bfcl-eval` package (installed with
--no-deps; only `bfcl_eval/data/` is read, nothing of the package is imported).

A BFCL entry is a conversation of user turns; its ground truth (`possible_answer/`) lists, per user
turn, the function calls a correct model makes, one after another. Each call is one LLM call whose
answer runs that function (the tool); after the last call of a user turn one more LLM call answers
the user. The first call's prompt is the function docs of the entry's classes (minus its excluded
functions) plus the first user message; a later call's new input is the previous call's function
result (or the next user message). BFCL has no texts for results or answers and no tool timings:
results count `OBSERVATION_TOKENS`, answers `ANSWER_TOKENS`, tool durations come from the tool-time
model (Continuum's BFCL figure), and the scripted next user message arrives at once (tool `user`, 0 s).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from workloads.adapters.common import close_last, read_json_lines
from workloads.schema import Program, TraceError, Turn, tokens_of_chars

CATEGORIES = ("base", "long_context", "miss_func", "miss_param")
# BFCL's class -> function-doc file (bfcl_eval/constants/executable_backend_config.py).
FUNC_DOCS = {
    "GorillaFileSystem": "gorilla_file_system.json", "MathAPI": "math_api.json",
    "MessageAPI": "message_api.json", "TwitterAPI": "posting_api.json", "TicketAPI": "ticket_api.json",
    "TradingBot": "trading_bot.json", "TravelAPI": "travel_booking.json",
    "VehicleControlAPI": "vehicle_control.json",
}
OBSERVATION_TOKENS = 48  # a function result: a short JSON object (BFCL's simulated APIs)
ANSWER_TOKENS = 40  # the model's reply to the user after its calls
CALL_OVERHEAD_CHARS = 40  # tool-call JSON wrapping around the call expression
USER_TOOL = "user"
CALL_NAME = re.compile(r"\s*([A-Za-z_][\w.]*)\s*\(")


def data_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("bfcl_eval")
    if spec is None or not spec.submodule_search_locations:
        raise TraceError("bfcl", "the bfcl-eval package is not installed "
                                 "(pip install --no-deps bfcl-eval==2026.3.23; `make install` does)")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def category_file(category: str) -> Path:
    if category not in CATEGORIES:
        raise TraceError("bfcl", f"unknown BFCL multi-turn category {category!r}; one of {', '.join(CATEGORIES)}")
    return data_dir() / f"BFCL_v4_multi_turn_{category}.json"


def detect(path: Path) -> bool:
    return path.name.startswith("BFCL_v4_multi_turn_") and path.suffix == ".json"


def load(path: Path) -> list[Program]:
    answers_path = path.parent / "possible_answer" / path.name
    if not answers_path.exists():
        raise TraceError(path, f"no ground truth next to it ({answers_path})")
    answers = {obj.get("id"): obj.get("ground_truth") for _, obj in read_json_lines(answers_path)}
    docs = _func_docs(path.parent / "multi_turn_func_doc")
    return [_program(path, n, entry, answers, docs) for n, entry in read_json_lines(path)]


def _func_docs(folder: Path) -> dict[str, list[dict]]:
    out = {}
    for cls, name in FUNC_DOCS.items():
        file = folder / name
        if file.exists():
            out[cls] = [obj for _, obj in read_json_lines(file)]
    return out


def _program(path: Path, n: int, entry: dict, answers: dict, docs: dict) -> Program:
    pid = entry.get("id")
    truth = answers.get(pid)
    questions = entry.get("question")
    if truth is None or not isinstance(questions, list):
        raise TraceError(path, f"entry {pid!r} has no question list or no ground truth", n)
    excluded = set(entry.get("excluded_function") or [])
    doc_chars = 0
    for cls in entry.get("involved_classes") or []:
        if cls not in docs:
            raise TraceError(path, f"unknown BFCL class {cls!r} (no function docs)", n)
        doc_chars += sum(len(json.dumps(d)) for d in docs[cls] if d.get("name") not in excluded)
    turns: list[Turn] = []
    pending = tokens_of_chars(doc_chars)  # input not yet sent: docs first, then results and user messages
    for u, messages in enumerate(questions):
        pending += tokens_of_chars(sum(len(str(m.get("content", ""))) for m in messages))
        calls = truth[u] if u < len(truth) else []
        for call in calls:
            m = CALL_NAME.match(call)
            turns.append(Turn(new_tokens=pending, output_tokens=tokens_of_chars(len(call) + CALL_OVERHEAD_CHARS),
                              tool=(m.group(1).split(".")[-1] if m else "call")))
            pending = OBSERVATION_TOKENS
        turns.append(Turn(new_tokens=pending, output_tokens=ANSWER_TOKENS, tool=USER_TOOL, tool_s=0.0))
        pending = 0
    return Program(id=str(pid), source="bfcl", turns=close_last(turns))
