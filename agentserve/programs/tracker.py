"""The program tracker: each live agent program as a networkx DAG of LLM-call and tool-call nodes.

Nodes: `llm:K` (K-th LLM call) and `tool:K` (the tool call after LLM call K); edges follow time
(llm:K -> tool:K -> llm:K+1). A sub-agent is its own program with an edge parent -> child in the
program forest (`children`); a root and all its descendants form one workflow, named by the root's id,
and each program has its depth in it (the root's is 0). A sub-agent's parent must be a live program
(`lineage_error`): an unknown or ended parent is a 404, a program named as its own parent or given a
second parent a 409, so the forest never has a cycle. Lifecycle: a program begins at its first request and ends on an explicit
end, or when idle longer than `idle_timeout_s` (abandoned); a call naming it after that begins a new
life of the id (`Program.life`), which engines tell from the ended one's late requests. Memory is bounded: an ended program leaves
nothing behind (`programs` holds live programs only).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import networkx as nx

# A program silent this long is abandoned: an agent harness that crashed never says goodbye.
DEFAULT_IDLE_TIMEOUT_S = 600.0


class ProgramError(Exception):
    """A client error about a program (unknown id, tool end with no start, ...): a 4xx."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Program:
    program_id: str
    started_at: float
    parent: str | None = None
    life: int = 0  # this life's serial: the same id begun again after its end is a new life
    workflow: str = ""  # the root's id (its own for a root)
    depth: int = 0
    graph: nx.DiGraph = field(default_factory=nx.DiGraph)
    children: set[str] = field(default_factory=set)
    llm_calls: int = 0
    active_calls: int = 0
    last_activity: float = 0.0
    last_llm_end: float | None = None
    last_node: str | None = None
    last_tool: str | None = None
    open_tool: tuple[str, float] | None = None  # (name, started) of a tool running now
    tool_reported_since_llm: bool = False
    inferred: bool = False  # named by its conversation, not by the client: nobody will end it


class ProgramTracker:
    def __init__(self, idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S, clock: Callable[[], float] = time.monotonic):
        self.idle_timeout_s = idle_timeout_s
        self.clock = clock
        self.programs: dict[str, Program] = {}
        self._lives = itertools.count(1)

    def __len__(self) -> int:
        return len(self.programs)

    def get(self, program_id: str) -> Program:
        p = self.programs.get(program_id)
        if p is None:
            raise ProgramError(404, f"unknown program {program_id!r} (never started, or already ended)")
        return p

    def lineage_error(self, program_id: str, parent: str | None) -> tuple[int, str] | None:
        """(status, message) if `program_id` may not be a sub-agent of `parent` (None: it may)."""
        if parent is None:
            return None
        if parent == program_id:
            return 409, f"program {program_id!r} cannot be its own parent"
        known = self.programs.get(program_id)
        if known is not None:
            if known.parent != parent:
                return 409, (f"program {program_id!r} already runs with parent {known.parent!r}; a program's "
                             f"parent is set by its first call")
            return None
        if parent not in self.programs:
            return 404, f"parent program {parent!r} is unknown (never started, or already ended)"
        return None

    def _touch(self, program_id: str, parent: str | None) -> Program:
        now = self.clock()
        p = self.programs.get(program_id)
        if parent is not None and (problem := self.lineage_error(program_id, parent)) is not None:
            raise ProgramError(*problem)
        if p is None:
            up = self.programs.get(parent) if parent is not None else None
            p = self.programs[program_id] = Program(
                program_id, started_at=now, parent=parent, life=next(self._lives),
                workflow=up.workflow if up else program_id,
                depth=up.depth + 1 if up else 0)
            if up is not None:
                up.children.add(program_id)
        p.last_activity = now
        return p

    def llm_start(self, program_id: str, *, turn: int | None = None, tool: str | None = None,
                  parent: str | None = None, inferred: bool = False) -> tuple[int, float | None, str | None]:
        """Record an LLM call; returns (turn, server-side tool gap since the previous call or None,
        the tool that gap belongs to)."""
        p = self._touch(program_id, parent)
        p.inferred = inferred
        k = p.llm_calls if turn is None else turn
        node = f"llm:{p.llm_calls}"
        p.graph.add_node(node, kind="llm", turn=k, start=p.last_activity, tool=tool)
        if p.last_node is not None:
            p.graph.add_edge(p.last_node, node)
        gap = None
        if p.last_llm_end is not None and p.active_calls == 0 and not p.tool_reported_since_llm:
            gap = max(0.0, p.last_activity - p.last_llm_end)
        gap_tool = p.last_tool
        p.last_node = node
        p.llm_calls += 1
        p.active_calls += 1
        p.tool_reported_since_llm = False
        if tool is not None:
            p.last_tool = tool
        return k, gap, gap_tool

    def llm_end(self, program_id: str, *, context_tokens: int, life: int | None = None) -> None:
        p = self.programs.get(program_id)
        if p is None or (life is not None and p.life != life):
            return  # ended while the call ran (and maybe begun again: the call was of the ended life)
        now = self.clock()
        p.active_calls = max(0, p.active_calls - 1)
        p.last_activity = p.last_llm_end = now
        p.graph.nodes[p.last_node]["end"] = now
        p.graph.nodes[p.last_node]["context_tokens"] = context_tokens

    def tool_start(self, program_id: str, name: str) -> None:
        p = self.get(program_id)
        p.last_activity = now = self.clock()
        p.open_tool = (name, now)
        node = f"tool:{p.llm_calls - 1}:{name}"
        p.graph.add_node(node, kind="tool", name=name, start=now)
        if p.last_node is not None:
            p.graph.add_edge(p.last_node, node)
        p.last_node = node
        p.last_tool = name

    def tool_end(self, program_id: str, name: str, duration_s: float | None = None) -> float:
        """Returns the tool's duration: the client's measurement, else the gap between its start and
        end events (both reported by the client, so either is client-side evidence)."""
        p = self.get(program_id)
        if p.open_tool is None or p.open_tool[0] != name:
            running = p.open_tool[0] if p.open_tool else "none"
            raise ProgramError(409, f"tool {name!r} of program {program_id!r} ended but was not started "
                                    f"(running tool: {running})")
        p.last_activity = now = self.clock()
        started = p.open_tool[1]
        p.open_tool = None
        p.tool_reported_since_llm = True
        if p.last_node is not None:
            p.graph.nodes[p.last_node]["end"] = now
        return duration_s if duration_s is not None else now - started

    def tool_ran(self, program_id: str, name: str, duration_s: float) -> None:
        """A tool call reported once it had run (no start event): its node spans the `duration_s`
        before now, and it stands for the gap since the previous call."""
        p = self.get(program_id)
        p.last_activity = now = self.clock()
        node = f"tool:{p.llm_calls - 1}:{name}:{p.graph.number_of_nodes()}"
        p.graph.add_node(node, kind="tool", name=name, start=now - duration_s, end=now)
        if p.last_node is not None:
            p.graph.add_edge(p.last_node, node)
        p.last_node = node
        p.last_tool = name
        p.tool_reported_since_llm = True

    def end(self, program_id: str) -> Program:
        p = self.programs.pop(program_id, None)
        if p is None:
            raise ProgramError(404, f"unknown program {program_id!r} (never started, or already ended)")
        if p.parent is not None and p.parent in self.programs:
            self.programs[p.parent].children.discard(program_id)
        return p

    def reap(self, idle_s: Callable[[Program], float] | None = None) -> list[Program]:
        """End every program idle longer than the timeout (or than `idle_s(program)`, if shorter), with
        no call in flight."""
        now = self.clock()
        idle = [pid for pid, p in self.programs.items() if p.active_calls == 0 and now - p.last_activity > min(
            self.idle_timeout_s, idle_s(p) if idle_s is not None else self.idle_timeout_s)]
        return [self.end(pid) for pid in idle]
