"""Fleet bench: fastorch, supervisord, circus and the posix_spawn limit.

For each N and each supervisor, in one run and on one machine:

- start all: from launching the supervisor to the exec of its N-th service;
- crash to running: SIGKILL one service's process, time to the exec of its
  replacement (median and p95 over ``--kills`` kills);
- stop all: from SIGTERM to the supervisor until it and every service
  have exited;
- supervisor RSS once all services run, and CPU seconds over ``--idle``
  seconds of idling.

Times come from the kernel's proc connector (see procwatch.py): the bench
never polls a supervisor. It stops everything it started, also when
interrupted: supervisors run in their own session, the bench is a child
subreaper, and on the way out it kills its supervisor by process group and
then every orphan that was handed to it.

    python bench/fleet/run.py --n 100 500 1000 --peers all
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from peers import Driver, drivers
from procwatch import ProcWatch, Tree

HERE = Path(__file__).resolve().parent
PR_SET_CHILD_SUBREAPER = 36
LIMIT = "posix_spawn"

# Targets for fastorch at the largest N (the numbers).
TARGETS = {
    "start_x": 1.5,
    "crash_med_ms": 1.0,
    "crash_p95_ms": 2.0,
    "stop_x": 2.0,
    "rss_mib": 40.0,
    "kib_per_svc": 4.0,
    "idle_cpu_s": 0.05,
}


class Interrupted(BaseException):
    """SIGTERM or SIGHUP reached the bench (not an ``Exception``: it must
    get past the per-run error handling)."""


def _on_signal(signo: int, frame: object) -> None:
    raise Interrupted(signal.Signals(signo).name)


def become_subreaper() -> None:
    """Orphans of our supervisors become our children, so we can end them."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def my_children() -> list[int]:
    """Processes whose parent is this one (our own starts and orphans)."""
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The second field (comm) may hold spaces: split after its ")".
        fields = stat[stat.rindex(b")") + 2 :].split()
        if int(fields[1]) == me:
            found.append(int(entry))
    return found


def reap() -> None:
    """Collect every exited child without blocking."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def end_everything(proc: subprocess.Popen[bytes] | None) -> None:
    """Kill the supervisor's process group, then every orphan handed to us."""
    if proc is not None and proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            print(f"warning: pid {proc.pid} survived SIGKILL", file=sys.stderr)
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        reap()
        left = my_children()
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)
    print(f"warning: children left: {my_children()}", file=sys.stderr)


def supervisor_usage(tree: Tree) -> tuple[int, float]:
    """RSS in bytes and CPU seconds of the supervisor's own processes."""
    rss = 0
    cpu = 0.0
    for pid in [tree.root, *tree.helpers()]:
        try:
            p = psutil.Process(pid)
            with p.oneshot():
                rss += p.memory_info().rss
                t = p.cpu_times()
                cpu += t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return rss, cpu


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1), linear between closest ranks."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def run_size(
    watch: ProcWatch,
    chosen: list[Driver],
    n: int,
    args: argparse.Namespace,
    results: list[dict[str, Any]],
) -> None:
    """Measure every chosen supervisor with ``n`` services into ``results``.

    The first round measures everything; each further round (``--repeat``)
    only starts and stops again. Rounds take the supervisors in turn, so
    that a noisy moment on the shared machine does not fall on one of them
    alone. Start and stop report the median round.
    """
    batch = [
        {"peer": d.name, "n": n, "start_samples_s": [], "stop_samples_s": []}
        for d in chosen
    ]
    results += batch  # kept even if a round is interrupted
    for round_ in range(args.repeat):
        for driver, result in zip(chosen, batch, strict=True):
            if "error" in result:
                continue
            print(f"{driver.name} N={n} round {round_ + 1} ...", flush=True)
            result.setdefault("loadavg", os.getloadavg()[0])
            try:
                one_cycle(watch, driver, n, args, result, full=round_ == 0)
            except Exception as exc:
                result["error"] = f"{type(exc).__name__}: {exc}"
                print(f"  {driver.name} N={n}: {result['error']}")
            finally:
                summarize(result)


def summarize(result: dict[str, Any]) -> None:
    """Start and stop of a result: the median of its rounds so far."""
    if result["start_samples_s"]:
        result["start_s"] = statistics.median(result["start_samples_s"])
    if result["stop_samples_s"]:
        result["stop_s"] = statistics.median(result["stop_samples_s"])
    if result.get("stop_services_samples_s"):
        down = result["stop_services_samples_s"]
        result["stop_services_s"] = statistics.median(down)


def one_cycle(
    watch: ProcWatch,
    driver: Driver,
    n: int,
    args: argparse.Namespace,
    result: dict[str, Any],
    full: bool,
) -> None:
    """Start the supervisor, measure, stop it; add the figures to ``result``."""
    tmp = Path(tempfile.mkdtemp(prefix=f"fleet-{driver.name}-{n}-"))
    launch = driver.launch(n, tmp)
    proc = None
    try:
        with open(launch.log, "wb") as log:
            t0 = time.monotonic_ns()
            proc = subprocess.Popen(
                launch.argv,
                env=launch.env,
                cwd=tmp,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        tree = watch.tree(proc.pid)

        # Start all: the N-th service exec'd.
        started = watch.wait(
            lambda: len(tree.running) >= n or tree.root_exit_ns is not None,
            timeout=args.start_timeout,
        )
        if not started or len(tree.running) < n:
            raise RuntimeError(
                f"{len(tree.running)} of {n} services running after "
                f"{args.start_timeout} s (log: {launch.log})"
            )
        result["start_samples_s"].append((max(tree.running.values()) - t0) / 1e9)

        # Let the supervisor finish what follows its spawns before looking.
        time.sleep(args.settle)
        watch.check()
        if full:
            measure_idle(watch, driver, tree, n, args, result)

        stop_s = stop_all(watch, driver, proc, tree, args, result)
        result["stop_samples_s"].append(stop_s)
        proc.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)
    except Exception as exc:
        raise RuntimeError(f"{exc} (files kept in {tmp})") from exc
    finally:
        end_everything(proc)
        if proc is not None:
            watch.forget(proc.pid)


def measure_idle(
    watch: ProcWatch,
    driver: Driver,
    tree: Tree,
    n: int,
    args: argparse.Namespace,
    result: dict[str, Any],
) -> None:
    """RSS, CPU over the idle window, then the crash samples."""
    result["rss_bytes"], cpu0 = supervisor_usage(tree)
    execs0 = len(tree.execs)
    time.sleep(args.idle)
    _, cpu1 = supervisor_usage(tree)
    result["idle_cpu_s"] = (cpu1 - cpu0) * 20.0 / args.idle
    if len(tree.execs) != execs0:
        result["note"] = "services restarted while idle"

    result.update(crash_latencies(watch, driver, tree, n, args))

    # circus 0.19 never exits if SIGTERM lands while it is respawning.
    time.sleep(args.settle)


def crash_latencies(
    watch: ProcWatch, driver: Driver, tree: Tree, n: int, args: argparse.Namespace
) -> dict[str, Any]:
    """SIGKILL one service at a time; time until a replacement exec'd."""
    kills = args.slow_kills if driver.slow else args.kills
    samples: list[float] = []
    forked: list[float] = []
    for _ in range(kills):
        # A random phase against the supervisor's own poll, if it has one.
        time.sleep(0.01 + random.uniform(0.0, driver.poll_period_s or 0.02))
        if not watch.wait(lambda: len(tree.running) >= n, timeout=5.0):
            raise RuntimeError(f"fleet did not return to {n} services")
        with watch.lock:
            victim = random.choice(list(tree.running))
            before = len(tree.execs)
        t_kill = time.monotonic_ns()
        os.kill(victim, signal.SIGKILL)
        if not watch.wait(lambda b=before: len(tree.execs) > b, args.kill_timeout):
            raise RuntimeError(f"no respawn within {args.kill_timeout} s")
        exec_ns, pid = tree.execs[before]
        samples.append((exec_ns - t_kill) / 1e6)
        # Where the time went: noticing the exit (up to the fork) or spawning.
        forked.append((tree.forks.get(pid, exec_ns) - t_kill) / 1e6)
    if not samples:
        return {}
    return {
        "crash_ms": samples,
        "crash_fork_ms": forked,
        "crash_fork_med_ms": statistics.median(forked),
        "crash_med_ms": statistics.median(samples),
        "crash_p95_ms": percentile(samples, 0.95),
    }


def stop_all(
    watch: ProcWatch,
    driver: Driver,
    proc: subprocess.Popen[bytes],
    tree: Tree,
    args: argparse.Namespace,
    stats: dict[str, Any],
) -> float:
    """SIGTERM the supervisor; seconds until it and all services exited."""
    with watch.lock:
        services = list(tree.running)
    t_stop = time.monotonic_ns()
    driver.stop(proc.pid)
    done = watch.wait(
        lambda: (
            tree.root_exit_ns is not None and all(p in tree.exits for p in services)
        ),
        timeout=args.stop_timeout,
    )
    if not done:
        raise RuntimeError(f"not stopped within {args.stop_timeout} s")
    last_service = max(tree.exits[p] for p in services)
    end = max(tree.root_exit_ns or 0, last_service)
    # How much of it is the supervisor's own exit after the last service.
    stats.setdefault("stop_services_samples_s", []).append(
        (last_service - t_stop) / 1e9
    )
    return (end - t_stop) / 1e9


def ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "-"
    return f"{value / base:.1f}x"


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(results: list[dict[str, Any]]) -> str:
    """Markdown table, each row with its ratios against the limit."""
    by_key = {(r["peer"], r["n"]): r for r in results}
    sizes = sorted({r["n"] for r in results})
    small = sizes[0]
    head = (
        "| N | supervisor | start all s | vs limit | crash->running "
        "median ms | p95 ms | vs limit | of it, kill->fork ms | stop all s "
        "| vs limit | of it, services down s | RSS MiB | KiB/service "
        "| CPU s / 20 s idle | load |"
    )
    rows = [head, "|" + "---|" * 15]
    for r in results:
        base = by_key.get((LIMIT, r["n"]), {})
        first = by_key.get((r["peer"], small), {})
        per_svc = None
        if r["n"] > small and "rss_bytes" in r and "rss_bytes" in first:
            per_svc = (r["rss_bytes"] - first["rss_bytes"]) / 1024 / (r["n"] - small)
        rss = r.get("rss_bytes")
        cells = [
            str(r["n"]),
            r["peer"],
            fmt(r.get("start_s"), ".2f"),
            ratio(r.get("start_s"), base.get("start_s")),
            fmt(r.get("crash_med_ms"), ".2f"),
            fmt(r.get("crash_p95_ms"), ".2f"),
            ratio(r.get("crash_med_ms"), base.get("crash_med_ms")),
            fmt(r.get("crash_fork_med_ms"), ".2f"),
            fmt(r.get("stop_s"), ".2f"),
            ratio(r.get("stop_s"), base.get("stop_s")),
            fmt(r.get("stop_services_s"), ".2f"),
            fmt(None if rss is None else rss / 2**20, ".1f"),
            fmt(per_svc, ".1f"),
            fmt(r.get("idle_cpu_s"), ".3f"),
            fmt(r.get("loadavg"), ".1f"),
        ]
        if "error" in r:
            cells[-1] += f" (error: {r['error'][:60]})"
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def target_check(results: list[dict[str, Any]]) -> list[str]:
    """fastorch against its targets at the largest N measured."""
    sizes = sorted({r["n"] for r in results if r["peer"] == "fastorch"})
    if not sizes:
        return []
    by_key = {(r["peer"], r["n"]): r for r in results}
    big, small = sizes[-1], sizes[0]
    f, lim = by_key[("fastorch", big)], by_key.get((LIMIT, big), {})
    if "error" in f:
        return [f"fastorch N={big}: {f['error']}"]
    checks = [
        ("start all", f["start_s"] / lim.get("start_s", float("nan")), "start_x"),
        ("crash median ms", f["crash_med_ms"], "crash_med_ms"),
        ("crash p95 ms", f["crash_p95_ms"], "crash_p95_ms"),
        ("stop all", f["stop_s"] / lim.get("stop_s", float("nan")), "stop_x"),
        ("RSS MiB", f["rss_bytes"] / 2**20, "rss_mib"),
        ("CPU s / 20 s idle", f["idle_cpu_s"], "idle_cpu_s"),
    ]
    first = by_key[("fastorch", small)]
    if big > small and "rss_bytes" in first:
        per = (f["rss_bytes"] - first["rss_bytes"]) / 1024 / (big - small)
        checks.append(("KiB per added service", per, "kib_per_svc"))
    lines = [f"fastorch targets at N={big}:"]
    for label, value, key in checks:
        verdict = "ok" if value <= TARGETS[key] else "MISSED"
        lines.append(f"  {label}: {value:.3f} (target <= {TARGETS[key]}) {verdict}")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[100, 500, 1000])
    p.add_argument(
        "--peers",
        nargs="+",
        default=["all"],
        help="all, or any of: posix_spawn fastorch supervisord circus",
    )
    p.add_argument("--kills", type=int, default=50, help="crash samples")
    p.add_argument(
        "--slow-kills",
        type=int,
        default=20,
        help="crash samples for supervisord (~1 s per respawn)",
    )
    p.add_argument("--repeat", type=int, default=3, help="start/stop cycles (median)")
    p.add_argument("--idle", type=float, default=20.0, help="idle window, s")
    p.add_argument("--settle", type=float, default=2.0, help="pause after start")
    p.add_argument("--circus-check-delay", type=float, default=0.1)
    p.add_argument("--start-timeout", type=float, default=120.0)
    p.add_argument("--kill-timeout", type=float, default=10.0)
    p.add_argument("--stop-timeout", type=float, default=120.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", type=Path, default=HERE / "results" / "latest.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the bench; print the table; write the JSON results."""
    args = parse_args(argv)
    random.seed(args.seed)
    known = drivers(args.circus_check_delay)
    names = list(known) if "all" in args.peers else args.peers
    for name in names:
        if name not in known:
            print(f"unknown peer {name!r}; known: {', '.join(known)}")
            return 2
    if LIMIT not in names:
        names.insert(0, LIMIT)  # every ratio needs the limit
    chosen = []
    for name in names:
        why = known[name].available()
        if why is None:
            chosen.append(known[name])
        else:
            print(f"skipping {name}: {why}")

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    become_subreaper()
    try:
        watch = ProcWatch()
    except OSError as exc:
        print(f"cannot listen to the proc connector (needs root): {exc}")
        return 1
    results: list[dict[str, Any]] = []
    try:
        for n in sorted(args.n):
            run_size(watch, chosen, n, args, results)
    except (KeyboardInterrupt, Interrupted) as exc:
        print(f"interrupted ({exc!r}); stopping what was started")
    finally:
        end_everything(None)
        watch.close()

    meta = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpus": os.cpu_count(),
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "args": {k: str(v) for k, v in vars(args).items() if k != "json"},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print()
    print(table(results))
    for line in target_check(results):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
