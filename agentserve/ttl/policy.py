"""TTL policies: how long to pin a program's KV after a turn, given the tool it calls and its context.

One small interface, one class per policy (as vLLM's request queues):
- `FixedTTL`: always the same TTL (a baseline).
- `ContinuumDemoTTL` (`continuum`): Continuum's published behaviour: 2 s when the tool's mean duration
  is at most 2 s (or the tool is unseen), else no pin.
- `CostBenefitTTL` (`--policy agentserve`, the default): the Continuum paper's rule
      tau* = argmax_tau  P(tau, tool) * (T * eta + reload(ctx)) - tau
  over tau in {0} U {observed durations of the tool}, where P is the tool's empirical CDF, reload(ctx)
  the measured re-prefill time of the context, T the mean queueing delay suffered by requests whose KV
  was evicted and eta = -Corr(turns served, turns left) over finished programs (both learned online).
  Before a distribution exists it assumes Exp(mean=mu) tool times, mu the caller's expectation (a
  join's: its children's predicted remaining work) or DEFAULT_TOOL_MEAN_S, whose optimum is
  tau = mu * ln(B / mu) for B > mu, else 0.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import deque

from agentserve.options import ProgramOptions
from agentserve.ttl.predictor import Distribution, ToolDurationPredictor
from agentserve.ttl.reload import ReloadProfile

# Continuum demo: pin for 2 s if the tool is short (mean <= 2 s) or unseen.
CONTINUUM_TTL_S = 2.0
CONTINUUM_SHORT_TOOL_S = 2.0
# Cold-start model of tool time: Exp with this mean (SWE bash tools are ~0.5-1 s).
DEFAULT_TOOL_MEAN_S = 1.0
MIN_TOOL_MEAN_S = 0.001  # a tool said to take 0 s is modelled as taking this long (the rule divides by it)
# Sliding windows for the online estimates of T and eta.
QUEUE_DELAY_WINDOW = 256
ETA_WINDOW = 256
# eta before ETA_MIN_PROGRAMS programs have finished: the paper's fixed-turn-count value. Only non-final
# turns are pinned, so the program is known to continue; starting at 0 would silence T (the queueing
# cost of an eviction) for the whole first wave of programs, exactly when the cache is coldest.
ETA_PRIOR = 1.0
ETA_MIN_PROGRAMS = 8
DEFAULT_MAX_TTL_S = ProgramOptions().max_ttl_s


class TTLPolicy(ABC):
    name: str
    max_ttl_s: float = DEFAULT_MAX_TTL_S  # no policy pins longer (the operator's bound)
    predictive = False  # the rule reads tool-time estimates and the context size (programs/hints.py asks)

    def ttl(self, tool: str | None, context_tokens: int, expected_s: float | None = None, *,
            told: bool = False) -> float:
        """Seconds to keep the program's KV pinned after this turn (0 = do not pin), at most max_ttl_s.
        `expected_s`: the tool's expected duration where the caller knows better than a cold start;
        `told`: the client said so for this very call (a hint), which beats the tool's history too."""
        return min(self.max_ttl_s, self.choose(tool, context_tokens, expected_s, told=told))

    @abstractmethod
    def choose(self, tool: str | None, context_tokens: int, expected_s: float | None = None, *,
               told: bool = False) -> float:
        """The policy's own TTL for this turn, before the bound."""

    @classmethod
    @abstractmethod
    def build(cls, *, predictor: ToolDurationPredictor, reload: ReloadProfile | None,
              benefit: OnlineBenefit | None = None, fixed_ttl_s: float = CONTINUUM_TTL_S,
              max_ttl_s: float = DEFAULT_MAX_TTL_S, host: ReloadProfile | None = None,
              host_tokens: int = 0) -> TTLPolicy:
        """The rule from what a control plane has (each takes what it needs; agentserve/policies.py
        names the rule of each policy)."""


class FixedTTL(TTLPolicy):
    name = "fixed"

    @classmethod
    def build(cls, *, fixed_ttl_s: float = CONTINUUM_TTL_S, max_ttl_s: float = DEFAULT_MAX_TTL_S, **_) -> FixedTTL:
        return cls(fixed_ttl_s, max_ttl_s)

    def __init__(self, ttl_s: float, max_ttl_s: float = DEFAULT_MAX_TTL_S):
        if ttl_s < 0:
            raise ValueError(f"fixed TTL must be >= 0 s, got {ttl_s}")
        self.ttl_s = ttl_s
        self.max_ttl_s = max_ttl_s

    def choose(self, tool: str | None, context_tokens: int, expected_s: float | None = None, *,
               told: bool = False) -> float:
        return self.ttl_s


class ContinuumDemoTTL(TTLPolicy):
    name = "continuum"

    @classmethod
    def build(cls, *, predictor: ToolDurationPredictor, max_ttl_s: float = DEFAULT_MAX_TTL_S, **_) -> ContinuumDemoTTL:
        return cls(predictor, max_ttl_s)

    def __init__(self, predictor: ToolDurationPredictor, max_ttl_s: float = DEFAULT_MAX_TTL_S):
        self.predictor = predictor
        self.max_ttl_s = max_ttl_s

    def choose(self, tool: str | None, context_tokens: int, expected_s: float | None = None, *,
               told: bool = False) -> float:
        mean = self.predictor.predict_mean(tool)
        return CONTINUUM_TTL_S if mean is None or mean <= CONTINUUM_SHORT_TOOL_S else 0.0


class OnlineBenefit:
    """T (queueing delay of evicted requests) and eta (turn-count predictability), learned online.

    T is fed with the delay a returning turn whose KV was gone suffered beyond re-prefilling it on an
    idle engine: its time to first token minus reload(recomputed tokens). In a continuous-batching
    engine an eviction costs less in waiting-queue time than in prefill contention, so the scheduler's
    queue time alone would read ~0 while everyone's first tokens slow down."""

    def __init__(self):
        self._delays: deque[float] = deque(maxlen=QUEUE_DELAY_WINDOW)
        self._turns: deque[tuple[int, int]] = deque(maxlen=ETA_WINDOW)  # (served k, left N-k)
        self.finished_programs = 0

    def observe_evicted_queue_delay(self, seconds: float) -> None:
        self._delays.append(max(0.0, seconds))

    def observe_evicted_turn(self, ttft_s: float, recomputed_tokens: int, reload: ReloadProfile | None) -> None:
        idle = reload.seconds(recomputed_tokens) if reload is not None else 0.0
        self.observe_evicted_queue_delay(ttft_s - idle)

    def observe_finished_program(self, num_turns: int) -> None:
        self.finished_programs += 1
        self._turns.extend((k, num_turns - k) for k in range(1, num_turns + 1))

    @property
    def T(self) -> float:
        return sum(self._delays) / len(self._delays) if self._delays else 0.0

    @property
    def eta(self) -> float:
        if self.finished_programs < ETA_MIN_PROGRAMS:
            return ETA_PRIOR
        if len(self._turns) < 2:
            return 0.0
        ks = [k for k, _ in self._turns]
        ls = [left for _, left in self._turns]
        mk, ml = sum(ks) / len(ks), sum(ls) / len(ls)
        cov = sum((k - mk) * (v - ml) for k, v in zip(ks, ls))
        vk = sum((k - mk) ** 2 for k in ks)
        vl = sum((v - ml) ** 2 for v in ls)
        if vk == 0 or vl == 0:
            return 0.0
        return max(0.0, min(1.0, -cov / math.sqrt(vk * vl)))


class CostBenefitTTL(TTLPolicy):
    """With a host tier (`host`: its measured load-back curve, `host_tokens`: its size), a context the
    tier can hold costs its load-back on a device miss, not its re-prefill: the rule then pins on the
    device only where even that copy is worth the hold, and otherwise leaves the KV to the tier
    (`decide`: device, host or drop)."""

    name = "agentserve"
    predictive = True

    @classmethod
    def build(cls, *, predictor: ToolDurationPredictor, reload: ReloadProfile | None,
              benefit: OnlineBenefit | None = None, max_ttl_s: float = DEFAULT_MAX_TTL_S,
              host: ReloadProfile | None = None, host_tokens: int = 0, **_) -> CostBenefitTTL:
        if reload is None:
            raise ValueError("the agentserve policy needs a reload profile measured on the engine")
        return cls(predictor, reload, benefit or OnlineBenefit(), max_ttl_s, host, host_tokens)

    def __init__(self, predictor: ToolDurationPredictor, reload: ReloadProfile, benefit: OnlineBenefit,
                 max_ttl_s: float = DEFAULT_MAX_TTL_S, host: ReloadProfile | None = None, host_tokens: int = 0):
        self.predictor = predictor
        self.reload = reload
        self.benefit = benefit
        self.max_ttl_s = max_ttl_s
        self.host = host
        self.host_tokens = host_tokens

    def in_host(self, context_tokens: int) -> bool:
        return self.host is not None and context_tokens <= self.host_tokens

    def miss_cost(self, context_tokens: int) -> float:
        """Seconds a device miss adds to the next turn: the load-back from the tier, else the re-prefill."""
        curve = self.host if self.in_host(context_tokens) else self.reload
        return curve.seconds(context_tokens)

    def gain(self, context_tokens: int) -> float:
        """B = T * eta + reload(ctx): seconds a device hit saves the program's next turn. T * eta is the
        queueing a re-prefill causes (its contention); a context the host tier holds is copied back, not
        recomputed, so its miss costs the copy alone."""
        if self.in_host(context_tokens):
            return self.miss_cost(context_tokens)
        return self.benefit.T * self.benefit.eta + self.miss_cost(context_tokens)

    def choose(self, tool: str | None, context_tokens: int, expected_s: float | None = None, *,
               told: bool = False) -> float:
        b = self.gain(context_tokens)
        dist = self.predictor.distribution(tool)
        if self.predictor.trusts(tool, expected_s, told=told):
            dist = Distribution([], "none")
        if not len(dist):
            mu = max(MIN_TOOL_MEAN_S, expected_s or 0.0) if told or expected_s else DEFAULT_TOOL_MEAN_S
            return min(self.max_ttl_s, mu * math.log(b / mu)) if b > mu else 0.0
        best_tau, best = 0.0, 0.0
        for tau in dist.values:  # sorted; duplicates are harmless
            if tau > self.max_ttl_s:
                break
            value = dist.cdf(tau) * b - tau
            if value > best:
                best_tau, best = tau, value
        return best_tau


def decide(policy: TTLPolicy | None, ttl_s: float, context_tokens: int, is_last: bool) -> str:
    """Where a finished turn's KV waits for the next turn: "device" (pinned for ttl_s), "host" (left to
    the host tier, which keeps it by the program's next use) or "drop" (not needed again, or no tier)."""
    if ttl_s > 0:
        return "device"
    if not is_last and isinstance(policy, CostBenefitTTL) and policy.in_host(context_tokens):
        return "host"
    return "drop"
