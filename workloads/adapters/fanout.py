"""Fork/join workflows built from a single-agent trace (`--trace fanout:K:<trace>`).

The traces we have are single-agent, so multi-agent programs are built from them, the shape of a
planner / workers / reviewer pipeline:

    planner turn  ->  K worker programs, run concurrently  ->  reviewer turn (the join)

- The K workers are K consecutive programs of the base trace (file order, so the grouping is fixed by
  the trace; the replay's seed then samples workflows). A trailing group of fewer than K is dropped.
- The planner's prompt is the task the workers share: `TASK_SHARE` of the smallest worker's initial
  prompt. Every worker's conversation starts with the planner's prompt and plan (its prompt's prefix,
  so the workers can hit the planner's KV), then its own initial prompt minus that shared task.
- The planner writes `PLAN_TOKENS`; the reviewer's input is each worker's final answer plus
  `HANDOFF_TOKENS` of framing per worker, and it writes `REVIEW_TOKENS`.
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


def fanout(base: Trace, width: int) -> Trace:
    """Workflows of `width` workers each, from consecutive programs of `base`."""
    if width < 1:
        raise TraceError(base.name, f"fan-out must be at least 1, not {width}")
    flat = [p for p in base.programs if not p.subprograms]
    if len(flat) < width:
        raise TraceError(base.name, f"fan-out {width} needs at least {width} single-agent programs, "
                                    f"the trace has {len(flat)}")
    workflows = [_workflow(i, flat[i * width:(i + 1) * width]) for i in range(len(flat) // width)]
    return Trace(name=f"fanout{width}-{base.name}", programs=workflows)


def _workflow(index: int, workers: list[Program]) -> Program:
    task = max(1, int(TASK_SHARE * min(w.turns[0].new_tokens for w in workers)))
    wid = f"wf{index}"
    subs = [_worker(wid, k, w, task) for k, w in enumerate(workers)]
    review = sum(w.turns[-1].output_tokens for w in workers) + HANDOFF_TOKENS * len(workers)
    turns = [Turn(new_tokens=task, output_tokens=PLAN_TOKENS, tool=JOIN_TOOL, spawn=[s.id for s in subs]),
             Turn(new_tokens=review, output_tokens=REVIEW_TOKENS)]
    return Program(id=wid, turns=turns, source="fanout", subprograms=subs)


def _worker(workflow: str, k: int, program: Program, task: int) -> Program:
    first, *rest = program.turns
    own = Turn(new_tokens=max(1, first.new_tokens - task), output_tokens=first.output_tokens, tool=first.tool,
               tool_s=first.tool_s)
    return Program(id=f"{workflow}.w{k}-{program.id}", turns=[own, *rest], source=program.source)
