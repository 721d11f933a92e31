"""The engine's dependency graph against the graphlib reference."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from tests.models.graph import RefGraph

from fastorch import _core
from fastorch.errors import CycleError


@st.composite
def graphs(draw):
    n = draw(st.integers(1, 30))
    pairs = st.tuples(st.integers(0, n - 1), st.integers(0, n - 1))
    ops = draw(
        st.lists(
            st.one_of(
                st.tuples(st.just("add"), pairs, st.integers(0, 2)),
                st.tuples(st.just("remove"), pairs, st.just(0)),
            ),
            max_size=4 * n,
        )
    )
    return n, ops


def _build(n, ops):
    engine = _core.Engine()
    ref = RefGraph()
    for i in range(n):
        sid = engine.add_service(f"s{i}")
        ref.add_node(sid, f"s{i}")
    sids = engine.sids()
    for op, (a, b), cond in ops:
        a, b = sids[a], sids[b]
        if op == "remove":
            assert engine.remove_dependency(a, b) == ref.remove_dependency(a, b)
            continue
        if b in ref.deps[a]:
            # re-adding an edge is not what this test is about
            continue
        try:
            ref.add_dependency(a, b, cond)
        except CycleError:
            before = _edges(engine)
            try:
                engine.add_dependency(a, b, cond)
            except CycleError as exc:
                assert ref.is_cycle(exc.cycle, extra=(a, b)), exc.cycle
            else:
                raise AssertionError(f"edge {a}->{b} closes a cycle, not refused")
            assert _edges(engine) == before, "a refused edge changed the graph"
        else:
            engine.add_dependency(a, b, cond)
    return engine, ref


def _edges(engine):
    return {
        s: sorted((d, int(c)) for d, c in engine.dependencies(s)) for s in engine.sids()
    }


@settings(max_examples=200, deadline=None)
@given(graphs(), st.data())
def test_graph_agrees_with_graphlib(spec, data):
    engine, ref = _build(*spec)
    sids = engine.sids()

    assert _edges(engine) == {s: sorted(ref.deps[s].items()) for s in sids}
    for s in sids:
        got = sorted((d, int(c)) for d, c in engine.dependents(s))
        assert got == sorted(ref.rdeps[s].items())
    assert engine.find_cycle() is None
    assert engine.levels() == ref.levels()

    # every service is STOPPED, so no condition holds yet
    holds = engine.condition_holds
    assert engine.startable() == ref.startable(sids, holds)
    assert engine.startable() == [s for s in sids if not ref.deps[s]]

    assert ref.is_stop_order(engine.stop_order(), set(sids))
    assert ref.is_stop_order(engine.stop_order(None), set(sids))
    chosen = data.draw(st.sets(st.sampled_from(sids), max_size=5))
    order = engine.stop_order(sorted(chosen))
    assert ref.is_stop_order(order, ref.dependents_closure(chosen)), order
    one = data.draw(st.sampled_from(sids))
    got = engine.affected(one)
    assert ref.is_stop_order(got, ref.dependents_closure([one]) - {one}), got


def test_self_dependency_is_a_cycle():
    engine = _core.Engine()
    a = engine.add_service("a")
    try:
        engine.add_dependency(a, a)
    except CycleError as exc:
        assert exc.cycle == ["a", "a"]
    else:
        raise AssertionError("a self edge was accepted")
    assert engine.dependencies(a) == []


def test_cycle_names_follow_the_edges():
    engine = _core.Engine()
    a, b, c = (engine.add_service(n) for n in "abc")
    engine.add_dependency(a, b)
    engine.add_dependency(b, c)
    try:
        engine.add_dependency(c, a)
    except CycleError as exc:
        cycle = exc.cycle
    else:
        raise AssertionError("c -> a closes a cycle")
    assert cycle[0] == cycle[-1] and sorted(cycle[:-1]) == ["a", "b", "c"]
    assert engine.find_cycle() is None
    assert engine.levels() == [[c], [b], [a]]
