"""The timer wheel against the heapq reference, under random sequences.

What is asserted after every step:

- ``advance`` fires exactly the timers the heapq model fires at that step
  (compared as multisets: the docs define no order within one advance), so
  none fires early, none late, none twice, none is lost.
- ``cancel`` answers like the model: ``True`` for a pending timer, ``False``
  for a fired or already cancelled one.
- ``len`` agrees.
- ``next_deadline`` is ``None`` exactly when the model has no timer; else it
  is never later than the model's (rounded) earliest deadline: a
  hierarchical wheel may report the start of a coarse slot. Advancing to
  the reported deadline again and again reaches the true one in a bounded
  number of steps (one per wheel level at most, plus one).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.models.timers import MAX_DURATION_MS, HeapTimers

from fastorch import _core

DAY = 24 * 3600 * 1000

# delays: mostly short, some long, up to the 30 day limit
delays = st.one_of(
    st.integers(0, 100),
    st.integers(0, 10_000),
    st.integers(0, 10 * DAY),
    st.integers(MAX_DURATION_MS - 1000, MAX_DURATION_MS),
)
steps = st.one_of(
    st.integers(0, 70),
    st.integers(0, 5000),
    st.integers(0, 400_000),
    st.integers(0, 40 * DAY),
)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("schedule"), delays),
        st.tuples(st.just("cancel"), st.integers(0, 1 << 30)),
        st.tuples(st.just("advance"), steps),
        st.tuples(st.just("jump"), st.just(0)),
    ),
    max_size=120,
)


def _check_deadline(wheel, model) -> None:
    true = model.next_deadline()
    got = wheel.next_deadline()
    if true is None:
        assert got is None
    else:
        assert got is not None and got <= true, (got, true)


def _run(tick_ms: int, start: int, program) -> None:
    wheel = _core.TimerWheel(now=start, tick_ms=tick_ms)
    model = HeapTimers(now=start, tick_ms=tick_ms)
    handles: list[tuple[int, int]] = []  # (wheel handle, model handle)
    now = start
    for op, arg in program:
        if op == "schedule":
            mh = model.schedule(now + arg, payload=len(handles))
            wh = wheel.schedule(now + arg, payload=len(handles))
            handles.append((wh, mh))
        elif op == "cancel" and handles:
            wh, mh = handles[arg % len(handles)]
            assert wheel.cancel(wh) == model.cancel(mh)
        elif op == "advance":
            now += arg
            assert sorted(wheel.advance(now)) == sorted(model.advance(now))
        elif op == "jump":
            _jump_to_true_deadline(wheel, model)
            now = model.now
        assert len(wheel) == len(model)
        _check_deadline(wheel, model)


def _jump_to_true_deadline(wheel, model) -> None:
    """Follow ``next_deadline`` until the earliest timer fires."""
    true = model.next_deadline()
    if true is None:
        return
    for _ in range(8):
        got = wheel.next_deadline()
        assert got is not None and got <= true
        at = max(got, model.now)
        fired = sorted(wheel.advance(at))
        assert fired == sorted(model.advance(at))
        if fired:
            assert at == true
            return
    raise AssertionError(f"next_deadline never reached {true}")


@settings(max_examples=300, deadline=None)
@given(start=st.integers(0, 10 * DAY), program=ops)
def test_wheel_fires_like_heapq_tick_1ms(start, program):
    _run(1, start, program)


@pytest.mark.parametrize("tick_ms", [4, 10])
@settings(max_examples=100, deadline=None)
@given(program=ops)
def test_wheel_fires_like_heapq_coarse_tick(tick_ms, program):
    _run(tick_ms, 0, program)


def test_cancel_of_fired_and_cancelled_handles_is_false():
    wheel = _core.TimerWheel()
    fired = wheel.schedule(5, payload=1)
    cancelled = wheel.schedule(7, payload=2)
    assert wheel.cancel(cancelled) is True
    assert wheel.cancel(cancelled) is False
    assert wheel.advance(10) == [1]
    assert wheel.cancel(fired) is False
    # a new timer may reuse the slot of a fired one; the old handle stays dead
    again = wheel.schedule(20, payload=3)
    assert wheel.cancel(fired) is False
    assert wheel.advance(20) == [3]
    assert wheel.cancel(again) is False
    assert len(wheel) == 0


def test_many_timers_at_far_deadlines_fire_exactly_once():
    wheel = _core.TimerWheel()
    model = HeapTimers()
    for i in range(2000):
        d = (i * 7_919_993) % MAX_DURATION_MS + 1
        wheel.schedule(d, payload=i)
        model.schedule(d, payload=i)
    now = 0
    seen: list[int] = []
    while model.next_deadline() is not None:
        now += 3 * 3600 * 1000 + 17
        got = wheel.advance(now)
        assert sorted(got) == sorted(model.advance(now))
        seen.extend(got)
    assert sorted(seen) == list(range(2000))
    assert wheel.next_deadline() is None
