"""A simulated hour of 100,000 services through the compiled engine.

Run: python bench/sim.py [N]

Profile (the same as tests/core/test_simulation.py, whose driver also
checks invariants at every step and runs 10,000 services): a third of the
services have a readiness probe, a seventh a liveness probe (period 30 s,
timeout 1 s, answered 5 ms after they are asked; 5 % of the probed services
fail half their probes, the rest 0.2 %); 50 live processes crash every
simulated minute; restart policies mixed (always, on-failure, never);
up to two dependencies per service onto the 500 before it.

This driver is the lean shell a benchmark wants: replies wait in two FIFO
queues (every probe answers 5 ms later, every signalled process exits 20 ms
later, so each queue stays in time order), and the engine is asked only
what a shell would ask. The figure is the wall time of building the fleet
and running the hour, engine and driver together.
"""

from __future__ import annotations

import random
import sys
import time
from collections import deque

from fastorch._core import Engine, Restart, State

HOUR_MS = 3_600_000
MINUTE_MS = 60_000
PERIOD_MS = 30_000
TIMEOUT_MS = 1_000


def build(n: int, rnd: random.Random) -> tuple[Engine, set[int]]:
    engine = Engine(now=0, seed=7)
    probed = set()
    groups: dict[tuple, list[str]] = {}
    for i in range(n):
        restart = rnd.choice([Restart.ALWAYS, Restart.ON_FAILURE, Restart.NEVER])
        groups.setdefault((restart, i % 3 == 0, i % 7 == 0), []).append(f"svc{i}")
    for (restart, ready, live), names in groups.items():
        opts = dict(
            restart=restart,
            backoff_initial_ms=100,
            backoff_max_ms=5_000,
            start_limit_burst=5,
            start_limit_interval_ms=10_000,
            stop_timeout_ms=2_000,
        )
        if ready:
            opts["readiness"] = (1_000, PERIOD_MS, TIMEOUT_MS, 1, 3)
        if live:
            opts["liveness"] = (2_000, PERIOD_MS, TIMEOUT_MS, 1, 3)
        sids = engine.add_services(names, **opts)
        if ready or live:
            probed.update(sids)
    edges = []
    for sid in range(1, n):
        for on in rnd.sample(
            range(max(0, sid - 500), sid), min(sid, rnd.randint(0, 2))
        ):
            edges.append((sid, on, rnd.choice([0, 0, 1])))
    # sids follow names: svc{i} got sid i only if groups kept order, so map
    by_index = [engine.sid(f"svc{i}") for i in range(n)]
    engine.add_dependencies([(by_index[a], by_index[b], c) for a, b, c in edges])
    return engine, probed


def simulate(n: int) -> dict[str, int]:
    rnd = random.Random(2024)
    engine, probed = build(n, rnd)
    flaky = set(rnd.sample(sorted(probed), len(probed) // 20))
    probes: deque[tuple[int, int, int, int, bool]] = deque()
    exits: deque[tuple[int, int, int]] = deque()
    pid = 1000
    seen = {"probes": 0, "exits": 0, "spawns": 0, "crashes": 0}
    random_ = rnd.random
    spawned = engine.spawned

    def run(actions: list) -> None:
        nonlocal pid
        i = 0
        while i < len(actions):
            a = actions[i]
            i += 1
            kind = a[0]
            if kind == 5:  # TRANSITION
                continue
            if kind == 0:  # SPAWN
                pid += 1
                seen["spawns"] += 1
                actions.extend(spawned(a[1], pid))
            elif kind == 3:  # PROBE
                ok = random_() > (0.5 if a[1] in flaky else 0.002)
                probes.append((engine.now + 5, a[1], a[2], a[3], ok))
            elif kind == 1:  # SIGNAL
                exits.append((engine.now + 20, a[1], -a[2]))

    run(engine.start_all())
    next_minute = MINUTE_MS
    while True:
        at = next_minute
        nd = engine.next_deadline()
        if nd is not None and nd < at:
            at = nd
        if probes and probes[0][0] < at:
            at = probes[0][0]
        if exits and exits[0][0] < at:
            at = exits[0][0]
        if at > HOUR_MS:
            break
        run(engine.advance(max(at, engine.now)))
        now = engine.now
        while probes and probes[0][0] <= now:
            _, sid, probe, seq, ok = probes.popleft()
            seen["probes"] += 1
            run(engine.probe_result(sid, probe, seq, ok))
        while exits and exits[0][0] <= now:
            _, sid, status = exits.popleft()
            if engine.state(sid) == State.STOPPING:
                seen["exits"] += 1
                run(engine.exited(sid, status))
        if now >= next_minute:
            next_minute += MINUTE_MS
            states = engine.states()
            alive = [s for s in range(n) if 3 <= states[s] <= 5]
            for sid in rnd.sample(alive, min(len(alive), 50)):
                seen["crashes"] += 1
                run(engine.exited(sid, rnd.choice([0, 1, 2, -9, -11])))
    engine.check_invariants()
    seen["pending_timers"] = engine.pending_timers()
    return seen


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    t0 = time.perf_counter()
    seen = simulate(n)
    wall = time.perf_counter() - t0
    print(f"{n} services, 1 simulated hour: {wall:.2f} s wall (build included)")
    print(seen)


if __name__ == "__main__":
    main()
