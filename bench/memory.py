"""Engine memory per running service, measured in a fresh process.

Run: python bench/memory.py [N]     (default 100,000 services)

Every service is started and spawned, so a quarter of them hold a
readiness timer on the wheel; each has two dependencies on earlier
services anywhere in the fleet. Printed: the RSS delta per service (the
process is fresh, so pytest's or anyone's heap is not in it; the driver's
own lists are dropped before measuring) and ``Engine.memory_bytes()``, the
C memory the engine holds, capacity slack included.
"""

from __future__ import annotations

import gc
import random
import sys

import psutil

from fastorch._core import Action, Engine, State


def measure(n: int) -> tuple[float, float]:
    proc = psutil.Process()
    rnd = random.Random(3)
    names = [f"svc-{i}" for i in range(n)]
    edges = [(i, on, 0) for i in range(2, n) for on in rnd.sample(range(i), 2)]
    gc.collect()
    before = proc.memory_info().rss

    engine = Engine()
    probed = engine.add_services(names[: n // 4], readiness=(1000, 10_000, 1000, 1, 3))
    plain = engine.add_services(names[n // 4 :])
    by_index = probed + plain
    engine.add_dependencies([(by_index[a], by_index[b], c) for a, b, c in edges])
    pending = engine.start_all()
    while pending:
        more: list[tuple[int, ...]] = []
        for action in pending:
            if action[0] == Action.SPAWN:
                more += engine.spawned(action[1], 1000 + action[1])
        pending = more
    assert engine.count_by_state()[State.STARTING] == 0
    assert engine.pending_timers() == len(probed)

    # What the driver made (sid lists, action tuples) is not engine state.
    del probed, plain, by_index, pending, more
    gc.collect()
    after = proc.memory_info().rss
    return (after - before) / n, engine.memory_bytes() / n


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    rss, held = measure(n)
    print(
        f"{n} running services: rss {rss:.0f} B/service, "
        f"memory_bytes {held:.0f} B/service (target 200)"
    )


if __name__ == "__main__":
    main()
