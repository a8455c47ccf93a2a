"""The fleet simulator (agentserve/sim/): a hand-computed scenario, determinism, invariants checked
after every simulated step (blocks conserved, every reference owned, no pin outlives its program),
and the policies' effects in the direction they have on the real engine."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentserve.engine.turn_ledger import PARTS
from agentserve.options import ProgramOptions
from agentserve.sim.costs import CostModel
from agentserve.sim.fleet import Fleet, FleetSetup
from agentserve.sim.pool import BlockPool
from workloads.plan import TEMPLATE_TOKENS_PER_TURN, PlannedProgram, PlannedTurn
from workloads.report import summarize

# 1 ms per step, 1 ms per prefill token, nothing else: times are easy to add up by hand
UNIT = CostModel(name="unit", step_s=0.001, prefill_token_s=0.001, decode_seq_s=0.0, kv_read_token_s=0.0)


def program(pid: str, arrival: float, turns: list[tuple[int, int, float]]) -> PlannedProgram:
    """(new tokens, output tokens, tool seconds) per turn; the last turn's tool is dropped."""
    planned = [PlannedTurn(n, o, "bash", t, True) for n, o, t in turns[:-1]]
    n, o, _ = turns[-1]
    return PlannedProgram(pid, "test", arrival, planned + [PlannedTurn(n, o, None, 0.0, True)], False)


def fleet(policy: str = "vllm", **kw) -> Fleet:
    options = kw.pop("options", ProgramOptions(policy=policy if policy != "oracle" else "vllm", fixed_ttl_s=30.0))
    return Fleet(FleetSetup(policy=policy, replicas=kw.pop("replicas", 1), kv_tokens=kw.pop("kv_tokens", 4096),
                            cost=kw.pop("cost", UNIT), check=True, options=options, **kw))


def test_one_program_by_hand():
    """Two turns of one program alone: prefill, decode, the tool call, a prefix hit."""
    f = fleet("vllm", turn_times=True)
    (rec,) = f.run([program("p", 0.0, [(100, 3, 2.0), (20, 2, 0.0)])])
    first, second = rec.turns
    p1 = 100 + TEMPLATE_TOKENS_PER_TURN  # 112 tokens: one prefill step of 1 + 112 ms, then 2 decode steps of 1 ms
    assert first.first_token == pytest.approx(0.113) and first.done == pytest.approx(0.115)
    assert first.cached_tokens == 0 and first.prompt_tokens == p1
    # turn 2 is sent when the tool ends (2 s later); its prompt: the context (112 + 3) + 20 + 12
    assert second.sent == pytest.approx(2.115) and second.prompt_tokens == p1 + 3 + 20 + TEMPLATE_TOKENS_PER_TURN
    # the context's full blocks (3 of 32 tokens: 96) are cached; the other 51 tokens are computed
    assert second.cached_tokens == 96
    assert second.first_token == pytest.approx(2.115 + 0.001 + 0.001 * (147 - 96))
    assert rec.end == second.done and rec.tool_wait_s == 2.0
    # the turn split, as a real engine's --turn-times gives it: each turn's parts by hand
    one, two = sorted(f.turn_times(), key=lambda t: t["prompt_tokens"])
    assert (one["queue"], one["prefill"], one["decode"], one["decode_steps"]) == pytest.approx((0, 0.113, 0.002, 2))
    assert (two["cached_tokens"], two["prefill"], two["decode"]) == pytest.approx((96, 0.052, 0.001))
    assert one["recompute"] == one["load_back"] == two["between_steps"] == 0


def run_mix(policy: str, seed: int = 0, **kw):
    import random

    rng = random.Random(seed)
    programs = [program(f"p{i}", i * 0.3, [(rng.randrange(50, 400), rng.randrange(1, 30), rng.uniform(0.2, 3.0))
                                          for _ in range(rng.randrange(1, 6))]) for i in range(30)]
    f = fleet(policy, **kw)
    records = f.run(programs)
    return f, records


@pytest.mark.parametrize("policy", ["vllm", "fixed", "continuum", "agentserve", "oracle"])
def test_the_same_seed_gives_the_same_results(policy):
    a = summarize(run_mix(policy, replicas=2, router="pow2")[1], {})
    b = summarize(run_mix(policy, replicas=2, router="pow2")[1], {})
    assert a == b


def test_pins_keep_contexts_across_tool_calls_and_none_outlives_its_program():
    stock, stock_records = run_mix("vllm", kv_tokens=2560)
    pinned, pinned_records = run_mix("fixed", kv_tokens=2560)
    hit = lambda records: summarize(records, {}).prefix_hit_rate  # noqa: E731
    assert hit(pinned_records) > hit(stock_records)
    stats = pinned.server_stats()
    assert stats["pins_created"] > 0 and stats["pins_outstanding"] == 0
    for engine in pinned.engines:
        assert engine.pool.num_free() == engine.pool.num_blocks  # every program ended: every block free


def test_the_oracle_never_evicts():
    f, records = run_mix("oracle", kv_tokens=2560)
    assert all(e.pool.evictions == 0 for e in f.engines)
    assert summarize(records, {}).prefix_hit_rate >= summarize(run_mix("vllm", kv_tokens=2560)[1], {}).prefix_hit_rate


def test_a_turn_larger_than_a_replica_is_refused_not_stalled():
    with pytest.raises(ValueError, match="more than a replica"):
        fleet("vllm", kv_tokens=256).run([program("big", 0.0, [(400, 4, 0.0)])])


def test_affinity_keeps_a_program_on_one_replica_and_pow2_does_not():
    def homes(router: str) -> float:
        f, records = run_mix("fixed", replicas=4, router=router, kv_tokens=8192)
        return summarize(records, {}).prefix_hit_rate

    assert homes("affinity") > homes("pow2")


@settings(max_examples=60, deadline=None)
@given(kv_blocks=st.integers(8, 80), programs=st.lists(
    st.lists(st.tuples(st.integers(1, 300), st.integers(1, 20), st.floats(0, 2)), min_size=1, max_size=5),
    min_size=1, max_size=12), policy=st.sampled_from(["vllm", "fixed", "agentserve"]),
    replicas=st.integers(1, 3), max_wait=st.sampled_from([0.0, 0.5]), host_blocks=st.sampled_from([0, 4, 64]))
def test_invariants_hold_on_random_traffic(kv_blocks, programs, policy, replicas, max_wait, host_blocks):
    """check=True asserts after every step: blocks conserved, references owned, the host tier within its
    size; at the end no pin."""
    from agentserve.options import HostTierOptions

    planned = [program(f"p{i}", i * 0.1, turns) for i, turns in enumerate(programs)]
    kv_tokens = kv_blocks * 32
    longest = max(sum(n + o + TEMPLATE_TOKENS_PER_TURN for n, o, _ in turns) for turns in programs)
    if longest + 32 > kv_tokens:  # the plan cuts programs to the context: no program bigger than the KV
        kv_tokens = longest + 64
    f = fleet(policy, kv_tokens=kv_tokens, replicas=replicas, turn_times=True,
              options=ProgramOptions(policy=policy, fixed_ttl_s=1.0, max_wait_s=max_wait,
                                     host=HostTierOptions(kv_tokens=32 * host_blocks)))
    records = f.run(planned)
    assert all(r.end >= r.start for r in records) and len(records) == len(planned)
    assert all(len(r.turns) == len(p.turns) for r, p in zip(records, planned))
    assert f.server_stats()["pins_outstanding"] == 0
    # every call's time, sent to done, is split into parts and nothing is missing
    split = sorted(sum(t[part] for part in PARTS) for t in f.turn_times())
    assert split == pytest.approx(sorted(t.done - t.sent for r in records for t in r.turns), abs=1e-9)


def test_block_pool_evicts_the_oldest_free_block_and_tails_first():
    pool = BlockPool(4)
    assert pool.take(2)
    pool.fill(("a", 0))
    pool.fill(("a", 1))
    pool.release([("a", 0), ("a", 1)])  # freed tail first: a1 is the older free block
    assert pool.take(3)  # 2 empty + the oldest cached (a1)
    assert ("a", 1) not in pool.ref and ("a", 0) in pool.ref
    assert not pool.take(2)
    pool.check()


def test_a_context_evicted_on_the_device_is_loaded_back_from_the_host_tier():
    """A's context is evicted by B during A's tool call; with a host tier A's next turn loads its
    three full blocks back (at the load price) instead of recomputing them."""
    from agentserve.options import HostTierOptions

    cost = CostModel(name="unit+load", step_s=0.001, prefill_token_s=0.001, decode_seq_s=0.0, kv_read_token_s=0.0,
                     host_load_token_s=0.0001)
    a = program("a", 0.0, [(100, 3, 2.0), (20, 2, 0.0)])
    b = program("b", 0.5, [(150, 1, 0.0)])  # 162 tokens: all 6 blocks of the device

    def second_turn(host_tokens: int):
        options = ProgramOptions(policy="vllm", host=HostTierOptions(kv_tokens=host_tokens))
        f = fleet("vllm", kv_tokens=192, cost=cost, options=options, turn_times=True)
        records = {r.id: r for r in f.run([a, b])}
        return records["a"].turns[1], f.server_stats() | {"split": max(f.turn_times(), key=lambda t: t["load_back"])}

    stock, stats = second_turn(0)
    assert stock.cached_tokens == 0 and "host_hit_tokens" not in stats
    tiered, stats = second_turn(4096)
    assert tiered.cached_tokens == 96 and stats["host_hit_tokens"] == 96
    assert tiered.first_token - tiered.sent == pytest.approx(0.001 + 0.001 * (147 - 96) + 0.0001 * 96)
    # as vLLM's connector does, the turn waits out the step that loads it, then prefills the rest
    assert (stats["split"]["load_back"], stats["split"]["prefill"]) == pytest.approx((0.0001 * 96, 0.001 + 0.051))


def test_concurrency_starts_a_program_when_one_ends():
    programs = [program(f"p{i}", 100.0 * i, [(50, 2, 0.5), (10, 2, 0.0)]) for i in range(4)]
    records = fleet("vllm").run(programs, concurrency=2)
    start = {r.id: r.start for r in records}
    end = {r.id: r.end for r in records}
    assert start["p0"] == start["p1"] == 0.0  # planned arrivals do not count
    assert sorted([start["p2"], start["p3"]]) == sorted(end[p] for p in ("p0", "p1"))


def test_profiles_named_roofline_and_from_a_file(tmp_path):
    import msgspec

    from agentserve.sim.costs import DEVICES, SHAPES, load_profile, roofline

    fitted = load_profile("cpu-bench")
    assert fitted.prefill_token_s > 0 and fitted.prefill_pair_s > 0 and fitted.host_load_token_s > 0
    assert "fit_costs" in fitted.source
    gpu = load_profile("roofline:llama-3.1-8b@h100")
    h100 = DEVICES["h100"]
    assert gpu == roofline(SHAPES["llama-3.1-8b"], h100)
    # a decode step of one sequence streams 16 GB of weights; a prefill token is 2 x 8B FLOPs
    assert gpu.step_s == pytest.approx(h100.step_overhead_s + 2 * 8.03e9 / (3.35e12 * 0.72))
    assert gpu.prefill_token_s == pytest.approx(2 * 8.03e9 / (989.5e12 * h100.prefill_mfu))
    assert gpu.prefill_pair_s == pytest.approx(4 * 32 * 32 * 128 / (989.5e12 * h100.prefill_mfu))
    # a prefill's attention grows with the context it extends: a 4k re-prefill costs more than 4 x 1k
    assert gpu.prefill_s(4096) > 4 * gpu.prefill_s(1024) - 3 * gpu.step_s
    assert gpu.kv_read_token_s * 3.35e12 * 0.72 == pytest.approx(2 * 32 * 8 * 128 * 2)
    tp4 = load_profile("roofline:llama-3.1-70b@h100x4")
    assert tp4.prefill_token_s == pytest.approx(2 * 70.6e9 / (4 * 989.5e12 * h100.prefill_mfu))
    path = tmp_path / "p.json"
    path.write_bytes(msgspec.json.encode(gpu))
    assert load_profile(str(path)) == gpu
    for bad in ("nope", "roofline:llama-3.1-8b@tpu", "roofline:llama-3.1-8b@h100xq"):
        with pytest.raises(ValueError, match="profile"):
            load_profile(bad)
    path.write_text("{}")
    with pytest.raises(ValueError, match="p.json"):
        load_profile(str(path))


def test_policy_specs_are_the_replays_with_its_host_tier_sizes():
    from agentserve.sim.cli import policy_options

    base = ProgramOptions()
    assert policy_options("vllm+offload", base, 8192)[1].host.kv_tokens == 4 * 8192  # the replay's default size
    name, options, fleet_options = policy_options("agentserve+max-wait=0+replicas=2+router=pow2", base, 8192)
    assert (name, options.policy, options.max_wait_s, options.host.kv_tokens) == ("agentserve", "agentserve", 0.0,
                                                                                   4 * 8192)
    assert fleet_options == {"replicas": 2, "router": "pow2"}
    assert policy_options("agentserve+host-kv-tokens=1024", base, 8192)[1].host.kv_tokens == 1024
    for bad in ("nope", "oracle+max-wait=1", "agentserve+offload", "agentserve+zzz=1"):
        with pytest.raises(ValueError):
            policy_options(bad, base, 8192)


def test_a_request_preempted_after_it_was_scheduled_leaves_the_step():
    """vLLM pops the lowest-priority running request even if this step already scheduled it: its
    tokens leave the batch and go back to the budget, and no waiting request is admitted."""
    from agentserve.sim.engine import SimEngine, SimRequest, Stream

    engine = SimEngine("r", num_blocks=3, block_size=4, max_num_seqs=8, max_batched_tokens=64, cost=UNIT)
    decoding = []
    for name, arrival in (("b", 1.0), ("a", 0.0)):  # b runs first (a was preempted and readmitted once)
        r = SimRequest(name, None, Stream(name, 4), prompt_tokens=4, output_tokens=9, arrival_time=arrival)
        assert engine.pool.take(1)
        engine.pool.fill((name, 0))
        r.held, r.computed, r.generated = [(name, 0)], 4, 1  # the next token needs a second block
        decoding.append(r)
    engine.running = list(decoding)
    b, a = decoding
    engine.add(SimRequest("c", None, Stream("c", 4), prompt_tokens=2, output_tokens=1, arrival_time=2.0))
    engine.schedule(0.0)
    assert engine.batch == [a] and b.scheduled == 0 and b.num_preemptions == 1
    assert {r.request_id for _, _, r in engine.waiting} == {"b", "c"}
    engine.complete(0.1)
    engine.check()


def test_the_fit_recovers_a_known_cost_model_and_keeps_terms_non_negative():
    import random

    from agentserve.step_shape import prefill_pairs
    from agentserve.sim.fit import TERMS, fit

    true = {"step_s": 0.005, "prefill_token_s": 2e-4, "decode_seq_s": 3e-4, "kv_read_token_s": 2e-6,
            "prefill_pair_s": 1e-7}
    rng = random.Random(0)
    steps = []
    for _ in range(400):
        prefill = rng.choice([0, rng.randint(1, 4096)])
        decodes = rng.randint(0 if prefill else 1, 32)
        shape = (prefill, decodes, decodes * rng.randint(64, 4096), prefill_pairs(rng.randint(0, 2048), prefill))
        seconds = true["step_s"] + sum(true[t] * x for t, x in zip(TERMS[1:], shape))
        steps.append((shape, seconds + rng.uniform(-2e-4, 2e-4)))  # timer noise
    terms, error = fit(steps)
    for name, value in true.items():
        assert terms[name] == pytest.approx(value, rel=0.1), name
    assert error["r2"] > 0.99 and abs(error["total_time_error"]) < 0.01
    # a term with no cost behind it is fitted at zero or dropped, never negative
    noisy = [((p, d, kv, pairs), t - true["prefill_pair_s"] * pairs) for (p, d, kv, pairs), t in steps]
    terms, _ = fit(noisy)
    assert all(v >= 0 for v in terms.values()) and terms["prefill_pair_s"] < 1e-8


def test_validation_reports_errors_and_only_the_orders_the_real_run_resolves():
    from agentserve.sim.validate import compare, report
    from workloads.report import PolicyResult, Results

    def result(jct: float, hit: float) -> PolicyResult:
        return PolicyResult(jct_mean=jct, jct_p50=jct, jct_p95=jct, jct_p99=jct, ttft_p50=0.1, ttft_p99=1.0,
                            prefix_hit_rate=hit, preemptions=0, pins_created=0, pins_outstanding_at_end=0,
                            makespan=1.0, programs_completed=1, programs_failed=0, throughput=1.0, llm_calls=1)

    real = Results(config={}, policies={"a": result(100, 0.5), "b": result(105, 0.5), "c": result(200, 0.2)})
    # a and b are within 10 % on the real side: their order is not required; c is clearly last
    sim = Results(config={}, policies={"a": result(110, 0.6), "b": result(100, 0.5), "c": result(190, 0.3),
                                       "extra": result(1, 1)})
    v = compare(sim, real)
    assert v.same_ranking and [p.policy for p in v.policies] == ["a", "b", "c"]
    a = v.policies[0]
    assert a.error["jct_mean"] == pytest.approx(0.10) and a.error["prefix_hit_rate"] == pytest.approx(0.1)
    assert "the same order" in report(v)
    sim.policies["c"] = result(90, 0.3)  # now c before a: an order the real run resolves, reversed
    v = compare(sim, real)
    assert not v.same_ranking and ("a", "c") in v.discordant and "discordant: a/c" in report(v)
    with pytest.raises(ValueError, match="no policy in common"):
        compare(Results(config={}, policies={"z": result(1, 0)}), real)


@pytest.mark.parametrize("one_off_blocks, moved", [("evict-first", True), ("lru", False)])
def test_the_ablation_switches_drive_the_simulator_as_the_plugin(monkeypatch, one_off_blocks, moved):
    """`--one-off-blocks lru` leaves the pool's LRU order (no block is moved to the front), and
    `--vllm-scheduling fcfs` preempts by arrival as vLLM's FCFS does, not by program rank."""
    from agentserve.sim.engine import SimEngine

    calls = []
    monkeypatch.setattr(BlockPool, "evict_first", lambda self, keys: calls.append(len(keys)) or 0)
    options = ProgramOptions(policy="fixed", fixed_ttl_s=30.0, one_off_blocks=one_off_blocks,
                             vllm_scheduling="fcfs" if moved else "priority")
    f = fleet("fixed", options=options)
    f.run([program("p", 0.0, [(200, 8, 0.5), (100, 8, 0.0)])])
    assert bool(calls) is moved
    assert f.engines[0].priority_preemption is not moved
    engine = SimEngine("r", num_blocks=3, block_size=4, max_num_seqs=8, max_batched_tokens=64, cost=UNIT)
    assert engine.priority_preemption is False  # without the plugin: stock vLLM's FCFS


def test_tools_ride_on_the_next_call_and_the_last_call_ends_the_program():
    """As the SDK does: no call of its own between turns (the tool is reported with the next turn,
    client-measured) and none after the last (the program ends with it); a parent's next turn goes out
    the moment its sub-agent's last call ends."""
    import msgspec

    child = program("c", 0.0, [(50, 4, 0.0)])
    parent = program("p", 0.0, [(200, 8, 0.0), (100, 8, 0.75), (100, 8, 0.0)])
    spawning = msgspec.structs.replace(parent.turns[0], spawn=(child,), tool=None)
    parent = msgspec.structs.replace(parent, turns=[spawning, *parent.turns[1:]])
    f = fleet("fixed")
    records = {r.id: r for r in f.run([parent])}
    assert records["p"].turns[1].sent == records["c"].end == records["c"].turns[-1].done
    assert records["p"].turns[2].sent == pytest.approx(records["p"].turns[1].done + 0.75)
    tools = f.control.predictor.summary()
    assert tools["bash"]["measured_by"] == "client" and tools["bash"]["mean_s"] == pytest.approx(0.75)
    assert tools["join"]["mean_s"] == pytest.approx(records["c"].end - records["p"].turns[0].done)
    assert len(f.control.tracker) == 0  # every program ended with its last call


def test_the_front_end_delays_each_call_and_a_cost_scale_slows_every_term():
    import msgspec

    f = fleet("vllm", cost=msgspec.structs.replace(UNIT, call_s=0.5), turn_times=True)
    (rec,) = f.run([program("p", 0.0, [(100, 3, 2.0), (20, 2, 0.0)])])
    first, second = rec.turns
    assert first.first_token == pytest.approx(0.5 + 0.113) and first.done == pytest.approx(0.5 + 0.115)
    assert second.sent == pytest.approx(2.615) and second.first_token - second.sent == pytest.approx(0.5 + 0.052)
    # the engine's split does not hold the front end's time: the client's does
    assert sum(t["queue"] for t in f.turn_times()) == 0
    slow = msgspec.structs.replace(UNIT, call_s=0.5, host_load_token_s=0.0001).scaled(2.0)
    assert (slow.step(100, 2, 50, 10, 7), slow.call_s) == pytest.approx((2 * UNIT.step(100, 2, 50, 0, 7) + 0.002, 1.0))
    with pytest.raises(ValueError, match="> 0"):
        UNIT.scaled(0)
