"""PinTable invariants over random event sequences (hypothesis), plus the release order."""

from hypothesis import given, settings
from hypothesis import strategies as st

from agentserve.ttl.pins import RELEASE_REASONS, Pin, PinTable


def pin(program, n, rank, t=0.0, ttl=1.0):
    return Pin(program, [object() for _ in range(n)], n * 32, rank, t, t + ttl)


programs = st.sampled_from([f"p{i}" for i in range(6)])
ops = st.lists(st.one_of(
    st.tuples(st.just("add"), programs, st.integers(0, 12), st.floats(0, 5)),
    st.tuples(st.just("end"), programs, st.just(0), st.just(0.0)),
    st.tuples(st.just("tick"), programs, st.just(0), st.floats(0, 1)),
    st.tuples(st.just("pressure"), programs, st.just(0), st.just(0.0)),
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(ops=ops, cap=st.integers(0, 30))
def test_invariants_hold_over_any_event_sequence(ops, cap):
    table = PinTable(cap_blocks=cap)
    ranks = {f"p{i}": i for i in range(6)}
    now, ended, live_blocks = 0.0, set(), {}
    for op, program, n, x in ops:
        if op == "add":
            ended.discard(program)
            _, releases = table.add(pin(program, n, ranks[program], now, x))
        elif op == "end":
            r = table.release(program, "program_end")
            releases = [r] if r else []
            ended.add(program)
        elif op == "tick":
            now += x
            releases = table.expire(now)
        else:
            r = table.release_for_pressure()
            releases = [r] if r else []
        for r in releases:
            assert r.reason in RELEASE_REASONS
            assert table.get(r.pin.program_id) is not r.pin  # released means gone
        # Invariants after every event:
        assert table.pinned_blocks == sum(p.num_blocks for p in table.pins.values())
        assert table.pinned_blocks <= cap
        assert not (ended & set(table.pins)), "a pin survived its program"
        assert all(p.num_blocks > 0 for p in table.pins.values())
    leftover = len(table)
    assert len(table.release_all("program_end")) == leftover
    assert table.pinned_blocks == 0 and len(table) == 0


def test_one_pin_per_program_a_new_turn_replaces_the_old():
    t = PinTable(cap_blocks=100)
    t.add(pin("a", 3, 0))
    inserted, releases = t.add(pin("a", 5, 0))
    assert inserted and [r.reason for r in releases] == ["replaced"]
    assert t.pinned_blocks == 5


def test_cap_evicts_later_programs_first_and_refuses_when_only_earlier_ones_hold_it():
    t = PinTable(cap_blocks=10)
    t.add(pin("early", 4, rank=0))
    t.add(pin("late", 4, rank=5))
    inserted, releases = t.add(pin("middle", 4, rank=2))
    assert inserted and [(r.pin.program_id, r.reason) for r in releases] == [("late", "cap")]
    inserted, releases = t.add(pin("latest", 4, rank=9))
    assert not inserted and releases == []
    assert set(t.pins) == {"early", "middle"}


def test_pressure_releases_latest_program_first():
    t = PinTable(cap_blocks=100)
    for name, rank in [("a", 0), ("c", 2), ("b", 1)]:
        t.add(pin(name, 2, rank))
    order = [t.release_for_pressure().pin.program_id for _ in range(3)]
    assert order == ["c", "b", "a"]
    assert t.release_for_pressure() is None


def test_pressure_spares_the_requesting_programs_pin_until_last():
    t = PinTable(cap_blocks=100)
    t.add(pin("early", 2, 0))
    t.add(pin("asking", 2, 5))
    assert t.release_for_pressure(spare="asking").pin.program_id == "early"
    assert t.release_for_pressure(spare="asking").pin.program_id == "asking"


def test_expiry_skips_programs_with_a_waiting_request():
    t = PinTable(cap_blocks=100)
    t.add(pin("busy", 2, 0, t=0, ttl=1))
    t.add(pin("idle", 2, 1, t=0, ttl=1))
    assert t.expire(0.5) == []
    assert [r.pin.program_id for r in t.expire(2.0, busy_programs={"busy"})] == ["idle"]
    assert "busy" in t


def test_empty_pin_is_not_inserted():
    t = PinTable(cap_blocks=10)
    assert t.add(pin("a", 0, 0)) == (False, [])


def test_release_for_pressure_junior_to_spares_earlier_programs():
    t = PinTable(cap_blocks=100)
    for rank, name in enumerate("abc"):
        t.add(Pin(name, [object()] * 10, 320, rank, 0.0, 10.0))
    assert t.release_for_pressure(spare="b", junior_to=1).pin.program_id == "c"  # later than b: may go
    assert t.release_for_pressure(spare="b", junior_to=1) is None  # only a (earlier) and b's own are left
    assert len(t) == 2


@settings(max_examples=200, deadline=None)
@given(adds=st.lists(st.tuples(st.integers(0, 5), st.integers(1, 8)), max_size=40),
       caps=st.tuples(st.integers(0, 20), st.integers(0, 20)), total=st.integers(0, 40))
def test_a_tenants_pins_stay_under_its_own_cap(adds, caps, total):
    from agentserve.programs.ids import tenant_of

    table = PinTable(cap_blocks=total, group_caps={"a": caps[0], "b": caps[1]}, group_of=tenant_of)
    for i, n in adds:
        program = f"{'ab'[i % 2]}:p{i}"
        table.add(pin(program, n, i))
        assert table.group_blocks("a") <= caps[0] and table.group_blocks("b") <= caps[1]
        assert table.pinned_blocks <= total


def test_a_tenant_over_its_cap_evicts_its_own_later_pins_not_others():
    from agentserve.programs.ids import tenant_of

    t = PinTable(cap_blocks=100, group_caps={"a": 6}, group_of=tenant_of)
    assert t.add(pin("b:x", 50, 5))[0]
    assert t.add(pin("a:late", 4, 3))[0]
    inserted, releases = t.add(pin("a:early", 4, 1))
    assert inserted and [(r.pin.program_id, r.reason) for r in releases] == [("a:late", "cap")]
    assert not t.add(pin("a:later", 4, 2))[0]  # only an earlier program of a holds a's cap
    assert "b:x" in t and t.group_blocks("a") == 4
