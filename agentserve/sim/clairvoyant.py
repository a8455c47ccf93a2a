"""The clairvoyant policy's truth: what the plan says will happen, told to agentserve's own objects
in place of their predictions, so the simulator measures how much better predictions could buy
(the headroom) before anyone builds them.

Told, per call: the true duration of the tool its answer runs (the program's next use, which both
tiers evict by), the TTL that duration calls for (pin for exactly the tool time when the KV's gain
exceeds it, the rule's own trade-off made with certainty), and the program's true remaining tool
time plus its calls left at the observed mean call time (the order's key). A join's length (the
sub-programs' run) is not in the plan, so a spawning call keeps the predictions. With admission on
(`+admission-mode=on`), the gate knows each program's true peak context (`TruthGate`) instead of
expecting the mean peak of programs that ended. Simulator only: a replay refuses the policy.
"""

from __future__ import annotations

from agentserve.programs.admission import AdmissionGate
from agentserve.programs.fields import XARG_NEXT_USE, XARG_REMAINING, XARG_TTL
from workloads.plan import TEMPLATE_TOKENS_PER_TURN, PlannedProgram

# A pin must outlast the tool by the time the next call takes to reach the engine, and a step more.
PIN_SLACK_S = 0.05


def peak_tokens(plan: PlannedProgram, prefix_tokens: int) -> int:
    """The KV the program's last call holds at its end: its prompt (after `prefix_tokens`, a sub-program's
    parent context) and its output."""
    return prefix_tokens + sum(t.new_tokens + t.output_tokens + TEMPLATE_TOKENS_PER_TURN for t in plan.turns)


class TruthGate(AdmissionGate):
    """The admission gate with each program's true peak as its footprint from its first request on."""

    expected_peak = 0  # nothing to expect: every footprint is known

    def __init__(self, gate: AdmissionGate, peaks: dict[str, int]):
        self.__dict__.update(vars(gate))
        self.peaks = peaks

    def admits(self, program: str, tokens: int, waited_s: float, now: float, weight: float = 1.0) -> bool:
        return super().admits(program, max(tokens, self.peaks.get(program, 0)), waited_s, now, weight)

    def join(self, program: str, tokens: int, now: float) -> None:
        super().join(program, max(tokens, self.peaks.get(program, 0)), now)


class Truth:
    def __init__(self, policy, call_s, front_end_s: float):
        self.policy = policy  # the control plane's TTL rule (its gain and cap)
        self.call_s = call_s  # () -> the observed mean LLM call time
        self.slack_s = front_end_s + PIN_SLACK_S
        self.peaks: dict[str, int] = {}  # program -> its true peak KV (the admission gate's footprint)

    def started(self, plan: PlannedProgram, prefix_tokens: int) -> None:
        self.peaks[plan.id] = peak_tokens(plan, prefix_tokens)

    def gate(self, gate: AdmissionGate | None) -> AdmissionGate | None:
        return TruthGate(gate, self.peaks) if gate is not None else None

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
