"""Trace formats: name -> adapter, detection, and `load_trace(path, fmt)`.

`auto` asks each adapter whether it recognises the file (by name and first record) and fails with
the list of formats when none does. A directory loads every recognised file in it (sorted), so a
folder of `.traj` files is one trace. `bfcl:<category>` loads a BFCL multi-turn category from the
installed bfcl-eval package. `coding:<N>[:<seed>]` generates N coding-agent sessions from published
distributions (`coding_agent.py`). `fanout:<K>[x<W>]:<trace>` builds fork/join workflows of K workers each (W waves of them) from
any of these (`adapters/fanout.py`). `agentserve` is this project's own schema as JSON (`schema.Trace`), so any
other source can be converted once and replayed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import msgspec

from workloads import coding_agent
from workloads.adapters import bfcl, continuum, fanout, minisweagent, openhands, sweagent, tracelab
from workloads.schema import Program, Trace, TraceError


def _detect_native(path: Path) -> bool:
    if path.suffix != ".json":
        return False
    try:
        head = path.open().read(256)
    except (OSError, UnicodeDecodeError):
        return False
    return head.lstrip().startswith("{") and '"programs"' in head


def _load_native(path: Path) -> list[Program]:
    try:
        return msgspec.json.decode(path.read_bytes(), type=Trace).programs
    except msgspec.ValidationError as e:
        raise TraceError(path, f"not an agentserve trace: {e}") from None
    except msgspec.DecodeError as e:
        raise TraceError(path, f"not valid JSON: {e}") from None


# name -> (detect, load); detection order matters only for files two adapters could claim.
FORMATS: dict[str, tuple[Callable[[Path], bool], Callable[[Path], list[Program]]]] = {
    "agentserve": (_detect_native, _load_native),
    "minisweagent": (minisweagent.detect_per_turn, minisweagent.load_per_turn),
    "minisweagent-traj": (minisweagent.detect_traj, minisweagent.load_traj),
    "continuum": (continuum.detect, continuum.load),
    "openhands": (openhands.detect, openhands.load),
    "sweagent": (sweagent.detect, sweagent.load),
    "bfcl": (bfcl.detect, bfcl.load),
    "tracelab": (tracelab.detect, tracelab.load),
}


def detect(path: Path) -> str | None:
    return next((name for name, (found, _) in FORMATS.items() if found(path)), None)


def load_trace(source: str | Path, fmt: str = "auto") -> Trace:
    """Load a trace file, a directory of trace files, `bfcl:<category>`, `coding:<N>[:<seed>]` or
    `fanout:<K>[x<W>]:<any of these>`."""
    text = str(source)
    if text.startswith("coding:"):
        sessions, _, seed = text[len("coding:"):].partition(":")
        if not sessions.isdigit() or int(sessions) < 1 or (seed and not seed.lstrip("-").isdigit()):
            raise TraceError(text, "want coding:<N>[:<seed>], N >= 1 sessions (e.g. coding:64, coding:64:1)")
        trace = coding_agent.generate(int(sessions), int(seed or 0))
        _check_unique(Path(text), trace.programs)
        return trace
    if text.startswith("fanout:"):
        shape, sep, base = text[len("fanout:"):].partition(":")
        width, x, waves = shape.partition("x")
        if not sep or not width.isdigit() or (x and not waves.isdigit()) or not base:
            raise TraceError(text, "want fanout:<K>:<trace> or fanout:<K>x<W>:<trace>, K the workers per wave, "
                                   "W the waves per workflow (e.g. fanout:4:bfcl:base, fanout:4x2:bfcl:base)")
        return fanout.fanout(load_trace(base, fmt), int(width), int(waves) if x else 1)
    if text.startswith("bfcl:"):
        path, fmt = bfcl.category_file(text.split(":", 1)[1]), "bfcl"
    else:
        path = Path(source)
    if not path.exists():
        raise TraceError(path, "no such file or directory")
    if fmt != "auto" and fmt not in FORMATS:
        raise TraceError(path, f"unknown format {fmt!r}; one of auto, {', '.join(FORMATS)}")
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    programs: list[Program] = []
    for file in files:
        name = fmt if fmt != "auto" else detect(file)
        if name is None:
            if path.is_dir():
                continue  # a README or results file next to the traces
            raise TraceError(file, f"unrecognised trace format; pass --format (one of {', '.join(FORMATS)})")
        programs += FORMATS[name][1](file)
    if not programs:
        raise TraceError(path, "no programs found")
    _check_unique(path, programs)
    return Trace(name=path.name, programs=programs)


def _check_unique(path: Path, programs: list[Program]) -> None:
    seen: set[str] = set()
    for root in programs:
        if (problem := root.check()) is not None:
            raise TraceError(path, problem)
        for p in root.walk():
            if not p.turns:
                raise TraceError(path, f"program {p.id!r} has no turns")
            if p.id in seen:
                raise TraceError(path, f"program id {p.id!r} appears twice")
            seen.add(p.id)
