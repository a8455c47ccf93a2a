"""The Grafana dashboard (deploy/grafana/agentserve.json): every query names a metric the server
exports, and every agentserve metric is on some panel. The served side is checked against a real
server in tests/test_server.py::test_metrics_are_documented (docs/metrics.md lists what it serves)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "agentserve.json"
METRIC = re.compile(r"\b(agentserve_\w+|vllm:[\w:]+)")
SERIES_SUFFIXES = ("_bucket", "_sum", "_count")  # a histogram's series, named by its family


def panels() -> list[dict]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def families(names: set[str]) -> set[str]:
    """The metric families a set of queried names are series of (as `# HELP` names them)."""
    out = set()
    for name in names:
        for suffix in SERIES_SUFFIXES:
            if name.endswith(suffix) and not name.endswith("_total"):
                name = name[: -len(suffix)]
                break
        out.add(name)
    return out


def queried() -> set[str]:
    """Every metric family the dashboard's queries name."""
    return families({m for p in panels() for t in p["targets"] for m in METRIC.findall(t["expr"])})


def documented() -> set[str]:
    return set(re.findall(r"^\| `([^`]+)` \|", (ROOT / "docs" / "metrics.md").read_text(), re.M))


def agentserve_metrics() -> set[str]:
    """The agentserve metric families this process registers (the server's, by construction)."""
    from prometheus_client import REGISTRY
    from prometheus_client.exposition import generate_latest

    import agentserve.server.metrics  # noqa: F401 - registers them

    text = generate_latest(REGISTRY).decode()
    return {n for n in re.findall(r"^# HELP (agentserve_\S+) ", text, re.M) if not n.endswith("_created")}


def test_the_dashboard_is_well_formed():
    board = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    assert {v["name"] for v in board["templating"]["list"]} >= {"datasource"}
    for p in panels():
        assert p["targets"] and p["datasource"]["uid"] == "${datasource}", p["title"]
        assert all(t["expr"].count("(") == t["expr"].count(")") for t in p["targets"]), p["title"]
        assert 0 <= p["gridPos"]["x"] and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]


def test_every_query_names_a_served_metric():
    unknown = queried() - documented()
    assert not unknown, f"the dashboard queries metrics no server exports: {sorted(unknown)}"
    mine = {n for n in queried() if n.startswith("agentserve_")}
    assert mine <= agentserve_metrics(), sorted(mine - agentserve_metrics())


def test_every_agentserve_metric_is_on_a_panel():
    served = agentserve_metrics()
    assert len(served) > 30
    missing = served - queried()
    assert not missing, f"agentserve metrics on no panel: {sorted(missing)}"


def test_the_check_would_catch_a_misspelt_or_missing_metric(tmp_path, monkeypatch):
    board = json.loads(DASHBOARD.read_text())
    target = next(p for p in board["panels"] if p["type"] != "row")["targets"][0]
    target["expr"] = "sum(vllm:num_requests_runing)"  # misspelt: and vllm:num_requests_running is on no other panel
    changed = tmp_path / "agentserve.json"
    changed.write_text(json.dumps(board))
    monkeypatch.setattr(sys.modules[__name__], "DASHBOARD", changed)
    assert "vllm:num_requests_runing" in queried() - documented()
