"""Fork/join workflows built from a single-agent trace (`--trace fanout:K:<trace>`, or
`fanout:KxW:<trace>` for W waves).

The traces we have are single-agent, so multi-agent programs are built from them, the shape of a
planner / workers / reviewer pipeline:

    planner turn  ->  K worker programs, run concurrently  ->  reviewer turn (the join)

With W waves the planner fans out W times in a row (plan, implement, test, ...): after each wave's
join it reads the wave's answers in a turn that spawns the next wave, and the reviewer turn reads the
last wave's. A later wave starts long after its workflow arrived, which is where ranking a sub-agent
as a new program (no DAG awareness) and by its workflow differ most.

- The K workers are K consecutive programs of the base trace (file order, so the grouping is fixed by
  the trace; the replay's seed then samples workflows); a workflow takes K x W of them. A trailing
  group of fewer is dropped.
- The planner's prompt is the task the workers share: `TASK_SHARE` of the smallest worker's initial
  prompt. Every worker's conversation starts with the planner's prompt and plan (its prompt's prefix,
  so the workers can hit the planner's KV), then its own initial prompt minus that shared task.
- The planner writes `PLAN_TOKENS` (also after each wave but the last); a turn after a wave reads each
  worker's final answer plus `HANDOFF_TOKENS` of framing per worker; the reviewer writes
  `REVIEW_TOKENS`.
- Workers keep their own turns, tools and tool times (so their source stays theirs); the planner's
  only tool call is the join: its duration is the workers' run, not a sample.

Token figures are in the base trace's units (before `--token-scale`).
"""

from __future__ import annotations

from agentserve.programs.fields import JOIN_TOOL
from workloads.schema import Program, Trace, TraceError, Turn

TASK_SHARE = 0.5  # of the smallest worker's initial prompt: the task the planner states
PLAN_TOKENS = 400
REVIEW_TOKENS = 400
HANDOFF_TOKENS = 60


def fanout(base: Trace, width: int, waves: int = 1) -> Trace:
    """Workflows of `waves` waves of `width` workers each, from consecutive programs of `base`."""
    if width < 1 or waves < 1:
        raise TraceError(base.name, f"fan-out and waves must be at least 1, not {width} and {waves}")
    size = width * waves
    flat = [p for p in base.programs if not p.subprograms]
    if len(flat) < size:
        raise TraceError(base.name, f"fan-out {width} x {waves} waves needs at least {size} single-agent "
                                    f"programs, the trace has {len(flat)}")
    workflows = [_workflow(i, flat[i * size:(i + 1) * size], width) for i in range(len(flat) // size)]
    name = f"fanout{width}" + (f"x{waves}" if waves > 1 else "")
    return Trace(name=f"{name}-{base.name}", programs=workflows)


def _workflow(index: int, workers: list[Program], width: int) -> Program:
    task = max(1, int(TASK_SHARE * min(w.turns[0].new_tokens for w in workers)))
    wid = f"wf{index}"
    subs = [_worker(wid, k, w, task) for k, w in enumerate(workers)]
    waves = [subs[i:i + width] for i in range(0, len(subs), width)]
    turns = [Turn(new_tokens=task, output_tokens=PLAN_TOKENS, tool=JOIN_TOOL, spawn=[s.id for s in waves[0]])]
    for done, nxt in zip(waves, waves[1:]):
        turns.append(Turn(new_tokens=_answers(done), output_tokens=PLAN_TOKENS, tool=JOIN_TOOL,
                          spawn=[s.id for s in nxt]))
    turns.append(Turn(new_tokens=_answers(waves[-1]), output_tokens=REVIEW_TOKENS))
    return Program(id=wid, turns=turns, source="fanout", subprograms=subs)


def _answers(wave: list[Program]) -> int:
    """What the planner reads after a wave: each worker's final answer, framed."""
    return sum(w.turns[-1].output_tokens for w in wave) + HANDOFF_TOKENS * len(wave)


def _worker(workflow: str, k: int, program: Program, task: int) -> Program:
    first, *rest = program.turns
    own = Turn(new_tokens=max(1, first.new_tokens - task), output_tokens=first.output_tokens, tool=first.tool,
               tool_s=first.tool_s)
    return Program(id=f"{workflow}.w{k}-{program.id}", turns=[own, *rest], source=program.source)
