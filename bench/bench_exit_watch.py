"""Exit detection: a pidfd per child vs one SIGCHLD handler, side by side.

Three ways: ``pidfd``, ``sigchld`` (waitid peek) and ``waitpid``
(``waitpid(-1)``, for a process that owns all its children).

For each way, 1000 `sleep` children are started through ProcessTable, then:

- sequential: SIGKILL one child, time until its on_exit runs (latency of
  one exit on an idle loop; median and p95);
- burst: SIGKILL every child at once, time until the last on_exit, and the
  supervisor's CPU time (user + sys) for the burst.

Also measured: spawning 1000 `sleep` children through ProcessTable.spawn
against a plain os.posix_spawn loop (plus reaping), the spawn target.

Run: python bench/bench_exit_watch.py [-n 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import signal
import statistics
import time

import uvloop

from fastorch.process import ProcessTable

SLEEP = shutil.which("sleep") or "/bin/sleep"


def cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def exit_latency(n: int, watch: str) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    table = ProcessTable(loop, exit_watch=watch)
    try:
        waiters: dict[int, asyncio.Future[float]] = {}

        def on_exit(pid: int, status: int) -> None:
            waiters[pid].set_result(time.perf_counter())

        pids = []
        for _ in range(n):
            pid = table.spawn([SLEEP, "1000"], on_exit=on_exit)
            waiters[pid] = loop.create_future()
            pids.append(pid)

        # Sequential: one exit at a time on an otherwise idle loop.
        half = pids[: n // 2]
        lat = []
        for pid in half:
            t0 = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            lat.append(await waiters[pid] - t0)

        # Burst: the other half at once.
        rest = pids[n // 2 :]
        c0, t0 = cpu(), time.perf_counter()
        for pid in rest:
            os.kill(pid, signal.SIGKILL)
        await asyncio.gather(*(waiters[p] for p in rest))
        burst_s, burst_cpu = time.perf_counter() - t0, cpu() - c0
        lat.sort()
        return {
            "median_us": statistics.median(lat) * 1e6,
            "p95_us": lat[int(len(lat) * 0.95)] * 1e6,
            "burst_ms": burst_s * 1e3,
            "burst_cpu_ms": burst_cpu * 1e3,
        }
    finally:
        table.close()


async def spawn_table(n: int) -> float:
    loop = asyncio.get_running_loop()
    table = ProcessTable(loop)
    try:
        t0 = time.perf_counter()
        pids = [
            table.spawn([SLEEP, "1000"], on_exit=lambda p, s: None) for _ in range(n)
        ]
        elapsed = time.perf_counter() - t0
        for pid in pids:
            table.signal_group(pid, signal.SIGKILL)
        return elapsed
    finally:
        table.close()


def spawn_plain(n: int) -> float:
    t0 = time.perf_counter()
    pids = [os.posix_spawn(SLEEP, [SLEEP, "1000"], os.environ) for _ in range(n)]
    elapsed = time.perf_counter() - t0
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    for pid in pids:
        os.waitpid(pid, 0)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    results: dict[str, list[dict[str, float]]] = {
        "pidfd": [],
        "sigchld": [],
        "waitpid": [],
    }
    spawns: dict[str, list[float]] = {"table": [], "posix_spawn": []}
    for _ in range(args.rounds):
        # Alternate the ways within a round so machine noise hits both.
        for watch in results:
            results[watch].append(uvloop.run(exit_latency(args.n, watch)))
        spawns["posix_spawn"].append(spawn_plain(args.n))
        spawns["table"].append(uvloop.run(spawn_table(args.n)))

    print(f"exit detection, {args.n} children, best of {args.rounds} rounds")
    print(
        f"{'way':8} {'median us':>10} {'p95 us':>8} {'burst ms':>9} {'burst cpu':>10}"
    )
    best = {}
    for watch, rows in results.items():
        best[watch] = {k: min(r[k] for r in rows) for k in rows[0]}
        b = best[watch]
        print(
            f"{watch:8} {b['median_us']:10.0f} {b['p95_us']:8.0f} "
            f"{b['burst_ms']:9.1f} {b['burst_cpu_ms']:10.1f}"
        )
    for way in ("sigchld", "waitpid"):
        for k in best["pidfd"]:
            ratio = best[way][k] / best["pidfd"][k]
            print(f"ratio {way}/pidfd {k}: {ratio:.2f}")
    plain, table = min(spawns["posix_spawn"]), min(spawns["table"])
    print(
        f"spawn {args.n}: posix_spawn loop {plain:.3f} s, ProcessTable {table:.3f} s, "
        f"ratio {table / plain:.2f}"
    )


if __name__ == "__main__":
    main()
