"""Core benchmarks: the compiled engine beside the plain-Python models.

Run: python -m pytest -p no:schemathesis bench/bench_core.py
     --benchmark-columns=min,median,mean --benchmark-group-by=group
"""

from __future__ import annotations

import graphlib
import os
import pathlib
import random
import subprocess
import sys

import pytest

from fastorch import _core

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tests.models.timers import HeapTimers  # noqa: E402

N_TIMERS = 1_000_000


def _timer_mix(cls, **kw):
    rnd = random.Random(1)
    deadlines = [rnd.randint(1, 600_000) for _ in range(N_TIMERS)]

    def run():
        q = cls(**kw)
        sched = q.schedule
        handles = [sched(d, i) for i, d in enumerate(deadlines)]
        cancel = q.cancel
        for h in handles[::3]:
            cancel(h)
        fired = 0
        adv = q.advance
        for now in range(1000, 600_001, 1000):
            fired += len(adv(now))
        return fired

    return run


@pytest.mark.benchmark(group="timers 1M: schedule, cancel 1/3, advance")
@pytest.mark.parametrize("tick_ms", [1, 4, 10])
def test_wheel(benchmark, tick_ms):
    fired = benchmark.pedantic(
        _timer_mix(_core.TimerWheel, tick_ms=tick_ms), rounds=3, iterations=1
    )
    assert fired == N_TIMERS - len(range(0, N_TIMERS, 3))


@pytest.mark.benchmark(group="timers 1M: schedule, cancel 1/3, advance")
def test_heapq(benchmark):
    fired = benchmark.pedantic(_timer_mix(HeapTimers), rounds=3, iterations=1)
    assert fired == N_TIMERS - len(range(0, N_TIMERS, 3))


N_NODES = 10_000
N_EDGES = 50_000


def _edges():
    rnd = random.Random(2)
    edges = set()
    while len(edges) < N_EDGES:
        a = rnd.randrange(1, N_NODES)
        edges.add((a, rnd.randrange(0, a)))
    return sorted(edges)


EDGES = _edges()
TRIPLES = [(a, b, 0) for a, b in EDGES]  # the engine's input form
NAMES = [f"s{i}" for i in range(N_NODES)]


def _engine_graph():
    # The bulk calls are what a config load uses: one spec for the
    # services, one cycle check (a topological sort) for all the edges,
    # as graphlib checks once in prepare().
    e = _core.Engine()
    e.add_services(NAMES)
    e.add_dependencies(TRIPLES)
    return e


def _engine_graph_incremental():
    # Live reconfiguration adds one edge at a time, each checked for a
    # cycle by a search from the new dependency.
    e = _core.Engine()
    for i in range(N_NODES):
        e.add_service(f"s{i}")
    for a, b in EDGES:
        e.add_dependency(a, b)
    return e


def _engine_all():
    e = _engine_graph()
    return len(e.levels()), len(e.startable())


def _graphlib_all():
    deps = {i: [] for i in range(N_NODES)}
    for a, b in EDGES:
        deps[a].append(b)
    ts = graphlib.TopologicalSorter(deps)
    ts.prepare()
    levels = 0
    while ts.is_active():
        batch = ts.get_ready()
        ts.done(*batch)
        levels += 1
    startable = [i for i, d in deps.items() if not d]
    return levels, len(startable)


@pytest.mark.benchmark(group="graph 10k/50k: build + levels + startable")
def test_graph_engine(benchmark):
    got = benchmark.pedantic(_engine_all, rounds=3, iterations=1)
    assert got == _graphlib_all()


@pytest.mark.benchmark(group="graph 10k/50k: build + levels + startable")
def test_graph_graphlib(benchmark):
    benchmark.pedantic(_graphlib_all, rounds=3, iterations=1)


@pytest.mark.benchmark(group="graph 10k/50k: one edge at a time")
def test_graph_engine_incremental(benchmark):
    benchmark.pedantic(_engine_graph_incremental, rounds=1, iterations=1)


@pytest.mark.benchmark(group="graph 10k/50k: levels only")
def test_levels_engine(benchmark):
    e = _engine_graph()
    benchmark(e.levels)


@pytest.mark.benchmark(group="graph 10k/50k: startable only")
def test_startable_engine(benchmark):
    e = _engine_graph()
    benchmark(e.startable)


N_EV = 1000


def _running_engine(n=N_EV, **opts):
    e = _core.Engine()
    for i in range(n):
        e.add_service(f"s{i}", **opts)
    for a in e.start_all():
        if a[0] == _core.Action.SPAWN:
            e.spawned(a[1], 100 + a[1])
    return e


@pytest.mark.benchmark(group="events")
def test_events_notify_watchdog(benchmark):
    e = _running_engine(watchdog_ms=10_000)
    nw = e.notify_watchdog

    def run():
        for sid in range(N_EV):
            nw(sid)

    benchmark(run)
    benchmark.extra_info["events"] = N_EV


@pytest.mark.benchmark(group="events")
def test_events_probe_result(benchmark):
    e = _running_engine(readiness=(1, 10, 5, 1, 3))
    now = [1]

    def run():
        now[0] += 10
        acts = e.advance(now[0])
        pr = e.probe_result
        for a in acts:
            pr(a[1], a[2], a[3], True)

    benchmark(run)
    benchmark.extra_info["events"] = 2 * N_EV


@pytest.mark.benchmark(group="events")
def test_events_exit_spawn_cycle(benchmark):
    e = _running_engine(
        restart=_core.Restart.ALWAYS,
        backoff_initial_ms=0,
        backoff_max_ms=0,
        start_limit_burst=0,
    )

    def run():
        ex, sp = e.exited, e.spawned
        for sid in range(N_EV):
            ex(sid, 1)
            sp(sid, 5000 + sid)

    benchmark(run)
    benchmark.extra_info["events"] = 2 * N_EV


def test_memory_per_service():
    """RSS delta and memory_bytes for 100,000 running services, measured by
    bench/memory.py in a fresh process (this one's heap is pytest's)."""
    script = pathlib.Path(__file__).with_name("memory.py")
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, check=True
    )
    print("\n" + done.stdout.strip())
    assert "B/service" in done.stdout
