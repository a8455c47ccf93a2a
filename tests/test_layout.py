"""The package's import structure: no cycle between agentserve's files (imports inside functions
count: a lazy import is still a dependency), and the engine's code does not import the simulator."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent / "agentserve"


def module_of(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def import_graph() -> nx.DiGraph:
    """agentserve's modules and, for each, the agentserve modules it imports anywhere in its file."""
    modules = {module_of(p): p for p in ROOT.rglob("*.py")}
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
                # `from package import module` names a module; `from module import name` the module itself
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph.add_edge(name, target)
    return graph


def test_no_import_cycle_between_files():
    cycles = list(nx.simple_cycles(import_graph()))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c + [c[0]]) for c in cycles[:5])


def test_the_engine_code_does_not_import_the_simulator():
    graph = import_graph()
    engine = [m for m in graph if m.startswith("agentserve.engine.")]
    assert engine
    bad = [(m, t) for m in engine for t in graph.successors(m) if t.startswith("agentserve.sim.")]
    assert not bad, bad


def test_the_graph_sees_lazy_imports():
    """The check above would pass on a blind graph: the known lazy import in the engine's offline
    scheduler builder (settings, inside a function) must be an edge."""
    graph = import_graph()
    assert graph.has_edge("agentserve.engine.offline", "agentserve.engine.settings")
    assert graph.has_edge("agentserve.engine.scheduler", "agentserve.programs.core")
