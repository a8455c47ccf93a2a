"""The clairvoyant policy's truth: what the plan says will happen, told to agentserve's own objects
in place of their predictions, so the simulator measures how much better predictions could buy
(the headroom) before anyone builds them.

Told, per call: the true duration of the tool its answer runs (the program's next use, which both
tiers evict by), the TTL that duration calls for (pin for exactly the tool time when the KV's gain
exceeds it, the rule's own trade-off made with certainty), and the program's true remaining tool
time plus its calls left at the observed mean call time (the order's key). A join's length (the
sub-programs' run) is not in the plan, so a spawning call keeps the predictions. Simulator only: a
replay refuses the policy.
"""

from __future__ import annotations

from agentserve.programs.fields import XARG_NEXT_USE, XARG_REMAINING, XARG_TTL
from workloads.plan import PlannedProgram

# A pin must outlast the tool by the time the next call takes to reach the engine, and a step more.
PIN_SLACK_S = 0.05


class Truth:
    def __init__(self, policy, call_s, front_end_s: float):
        self.policy = policy  # the control plane's TTL rule (its gain and cap)
        self.call_s = call_s  # () -> the observed mean LLM call time
        self.slack_s = front_end_s + PIN_SLACK_S

    def amend(self, xargs: dict, plan: PlannedProgram, k: int, context_tokens: int) -> None:
        turns = plan.turns
        xargs[XARG_REMAINING] = float(sum(t.tool_s for t in turns[k:]) + (len(turns) - k) * self.call_s())
        turn = turns[k]
        if k == len(turns) - 1 or turn.spawn:
            return
        xargs[XARG_NEXT_USE] = float(turn.tool_s)
        if XARG_TTL in xargs:  # pins are on
            hold = turn.tool_s + self.slack_s
            worth = self.policy.gain(context_tokens) > hold and hold <= self.policy.max_ttl_s
            xargs[XARG_TTL] = float(hold) if worth else 0.0
