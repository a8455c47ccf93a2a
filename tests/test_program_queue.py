"""ProgramQueue order and liveness: preempted first, then pinned programs, then program FCFS; under
any finite arrival sequence every request is eventually scheduled."""

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from agentserve.engine.program_queue import ProgramQueue


@dataclass(eq=False)
class Req:
    program: str
    priority: int  # program arrival rank
    arrival_time: float
    num_preemptions: int = 0


def make_queue(pinned: set[str]) -> ProgramQueue:
    def key(r):
        cls = 0 if r.num_preemptions else (1 if r.program in pinned else 2)
        return (cls, r.priority, r.arrival_time)
    return ProgramQueue(key)


def test_order_preempted_then_pinned_then_program_fcfs():
    pinned: set[str] = set()
    q = make_queue(pinned)
    early, late, pinned_prog, pre = Req("a", 0, 5.0), Req("b", 1, 1.0), Req("c", 2, 2.0), Req("d", 3, 9.0, 1)
    for r in (early, late, pinned_prog, pre):
        q.add_request(r)
    pinned.add("c")
    q.reorder()
    assert list(q) == [pre, pinned_prog, early, late]
    assert [q.pop_request() for _ in range(4)] == [pre, pinned_prog, early, late]


def test_remove_and_prepend():
    q = make_queue(set())
    a, b = Req("a", 0, 0.0), Req("b", 1, 0.0)
    q.add_request(a)
    q.add_request(b)
    q.remove_request(a)
    assert len(q) == 1 and q.peek_request() is b
    q.prepend_requests([a])
    assert q.peek_request() is a


def test_requests_vllm_skips_keep_their_order_among_equals():
    """vLLM pops each request it skips in a step, keeps them newest first and hands them back at the
    step's end (`prepend_requests`); requests of equal key (one program's, arrived in one step) keep
    their order step after step, as they would in vLLM's FCFS queue."""
    from collections import deque

    q = make_queue(set())
    reqs = [Req("a", 0, 1.0) for _ in range(3)]
    for r in reqs:
        q.add_request(r)
    for _ in range(3):  # three steps in which every request is skipped
        skipped: deque = deque()
        while q:
            skipped.appendleft(q.pop_request())
        q.prepend_requests(skipped)
        assert list(q) == reqs


@settings(max_examples=200, deadline=None)
@given(arrivals=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3)), max_size=80),
       pin_flips=st.lists(st.integers(0, 5), max_size=20))
def test_every_request_is_eventually_scheduled(arrivals, pin_flips):
    """One request is served per step while new ones keep arriving (each arrival step adds one)."""
    pinned: set[str] = set()
    q = make_queue(pinned)
    pending = list(enumerate(arrivals))
    served = []
    step = 0
    while pending or q:
        if pending:
            i, (prog, _) = pending.pop(0)
            q.add_request(Req(f"p{prog}", prog, float(i)))
        if pin_flips and step % 3 == 0:
            pinned.symmetric_difference_update({f"p{pin_flips[step % len(pin_flips)]}"})
            q.reorder()
        if step % 2 == 1 and q:  # the server is slower than arrivals: a queue builds up
            served.append(q.pop_request())
        step += 1
        assert step < 10 * (len(arrivals) + 1), "a request starved"
    assert len(served) == len(arrivals)
