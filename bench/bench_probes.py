"""Probe cost: 1000 services probed each second, and three HTTP clients.

Run: ``python bench/bench_probes.py --duration 60`` (default 10 s per run).

Part 1 (``--part fleet``): the compiled engine schedules a readiness probe
per service every second (start times spread over the first second), and
``ProbeRunner`` carries them out against real listeners on loopback, one
port per service, served by a separate process so that only the
supervisor side is measured. Reports CPU % of one core, CPU per probe,
scheduling delay (p50/p99/max: how late ``run()`` is called after the
deadline the loop timer was armed for), RSS.

Part 1b (``--part tcp``): the tcp fleet again, once per way of running a
tcp probe, side by side:
``before`` (a ``socket.socket``, the connect's end awaited through
``add_writer``, closed with a FIN), ``sync`` (the connect's outcome asked
for again at once, see ``_SocketRun._connect``), ``sync+reset`` (and closed
with a reset: SO_LINGER 0), ``sync+reset+raw`` (and the C socket type, no
Python wrapper: what ``ProbeRunner`` does), and with ``--slack 4,10`` the
same again with the loop timer armed at the engine's deadline rounded up
to that many ms (several probes per wake-up). One fleet, the variants
taking turns in ``--slice``-second slices, so that the machine's other
load falls on all alike. Adds TIME_WAIT sockets left per second.

Part 1c (``--part runner``): ``ProbeRunner``'s own cost per tcp probe,
before and after, 50 probes per loop turn so that no timer wake-up is
counted, beside the bare syscalls of one probe (socket, connect twice,
SO_LINGER, close).

Part 2 (``--part clients``): the same 1000 HTTP probes per second issued
by ``ProbeRunner`` (socket callbacks), by a minimal GET on asyncio streams
(a task per probe) and by httpx (a shared ``AsyncClient``, a fresh
connection per probe like the others, and again with keep-alive), side by
side in one run. Reports CPU per probe and the ratio to ``ProbeRunner``.
"""

from __future__ import annotations

import _socket
import argparse
import asyncio
import errno
import json
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import uvloop

from fastorch import probes
from fastorch._core import Action, Engine
from fastorch.probes import ProbeRunner
from fastorch.supervisor import _TIMER_SLACK_MS

SERVER = r"""
import asyncio, json, sys
import uvloop

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"


class Answer(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.buf = b""

    def data_received(self, data):
        self.buf += data
        if b"\r\n\r\n" in self.buf:
            self.buf = b""
            self.transport.write(RESPONSE)
            if b"connection: close" in data.lower():
                self.transport.close()

    def eof_received(self):
        self.transport.close()


async def main():
    loop = asyncio.get_running_loop()
    ports = []
    for _ in range(int(sys.argv[1])):
        server = await loop.create_server(Answer, "127.0.0.1", 0, backlog=256)
        ports.append(server.sockets[0].getsockname()[1])
    print(json.dumps(ports), flush=True)
    await loop.run_in_executor(None, sys.stdin.read)  # until stdin closes


uvloop.run(main())
"""


@dataclass
class Spec:
    kind: str
    target: Any
    status_min: int = 200
    status_max: int = 399
    headers: dict[str, str] = field(default_factory=dict)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_split() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def start_server(n: int) -> tuple[subprocess.Popen[str], list[int]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, json.loads(proc.stdout.readline())


def stop_server(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# -- part 1: a fleet driven by the engine ------------------------------------


class Fleet:
    """The supervisor's probe path alone: engine, one loop timer, runner."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        kind: str,
        ports: list[int],
        slack_ms: int = 0,
    ):
        self.loop = loop
        # The loop timer is armed at the engine's deadline rounded up to a
        # multiple of this: timers due within it are handled in one wake-up.
        self.slack_ms = slack_ms
        self.wakeups = 0
        self.base = loop.time()
        self.engine = Engine(now=0)
        self.runner = ProbeRunner(loop, self.on_result, None)
        self.specs: dict[int, Spec] = {}
        self.delays: list[float] = []
        self.failures = 0
        self.results = 0
        self.handle: asyncio.TimerHandle | None = None
        self.armed_ms: int | None = None
        n = len(ports)
        for i, port in enumerate(ports):
            sid = self.engine.add_service(
                f"svc{i}",
                restart=2,
                readiness=(i * 1000 // n, 1000, 900, 1, 3),
            )
            target = (
                f"127.0.0.1:{port}" if kind == "tcp" else f"http://127.0.0.1:{port}/"
            )
            self.specs[sid] = Spec(kind, target)
        self.feed(self.engine.start_all())
        for sid in self.specs:
            self.feed(self.engine.spawned(sid, 100_000 + sid))
        self.arm()

    def now_ms(self) -> int:
        return int((self.loop.time() - self.base) * 1000)

    def feed(self, actions: list[tuple[int, ...]]) -> None:
        for action in actions:
            kind = action[0]
            if kind == Action.PROBE:
                if self.armed_ms is not None:
                    due = self.base + self.armed_ms / 1000
                    self.delays.append(self.loop.time() - due)
                self.runner.run(action[1], action[2], action[3], self.specs[action[1]])
            elif kind == Action.CANCEL_PROBE:
                self.runner.cancel(action[1], action[2], action[3])

    def arm(self) -> None:
        deadline = self.engine.next_deadline()
        if deadline == self.armed_ms and self.handle is not None:
            return
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        self.armed_ms = deadline
        if deadline is not None:
            slack = self.slack_ms
            at = -(-deadline // slack) * slack if slack else deadline
            self.handle = self.loop.call_at(self.base + at / 1000, self.tick, at)

    def tick(self, at: int) -> None:
        self.handle = None
        self.wakeups += 1
        self.feed(self.engine.advance(max(self.now_ms(), at)))
        self.armed_ms = None
        self.arm()

    def on_result(self, sid: int, probe: int, seq: int, ok: bool, detail: str) -> None:
        self.results += 1
        self.failures += not ok
        self.feed(self.engine.probe_result(sid, probe, seq, ok))
        self.arm()

    async def close(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
        await self.runner.aclose()


async def run_fleet(
    kind: str, ports: list[int], duration: float, slack_ms: int = 0
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    rss0 = rss_mib()
    fleet = Fleet(loop, kind, ports, slack_ms)
    await asyncio.sleep(2.0)  # every service has had its first probe
    fleet.delays.clear()
    wakeups0 = fleet.wakeups
    results0, failures0 = fleet.results, fleet.failures
    (user0, sys0), t0 = cpu_split(), time.monotonic()
    await asyncio.sleep(duration)
    (user1, sys1), wall = cpu_split(), time.monotonic() - t0
    cpu = user1 - user0 + sys1 - sys0
    probes = fleet.results - results0
    out = {
        "kind": kind,
        "services": len(ports),
        "seconds": round(wall, 1),
        "probes_per_s": round(probes / wall, 1),
        "failed": fleet.failures - failures0,
        "cpu_pct_of_core": round(100 * cpu / wall, 2),
        "cpu_user_pct": round(100 * (user1 - user0) / wall, 2),
        "cpu_sys_pct": round(100 * (sys1 - sys0) / wall, 2),
        "cpu_us_per_probe": round(1e6 * cpu / max(probes, 1), 1),
        "delay_p50_ms": round(1000 * pct(fleet.delays, 0.5), 2),
        "delay_p99_ms": round(1000 * pct(fleet.delays, 0.99), 2),
        "delay_max_ms": round(1000 * max(fleet.delays, default=0.0), 2),
        "rss_mib": round(rss_mib(), 1),
        "rss_growth_mib": round(rss_mib() - rss0, 1),
        "durations_count": fleet.runner.durations.count(kind),
        "slack_ms": slack_ms,
        "wakeups_per_s": round((fleet.wakeups - wakeups0) / wall),
    }
    await fleet.close()
    return out


# -- part 1b: ways of running a tcp probe, side by side ------------------------


class _VariantRun(probes._SocketRun):
    """``_SocketRun`` with each saving of the tcp path switchable."""

    __slots__ = ()
    sync = True  # ask the connect's outcome again instead of polling
    reset = True  # close with a reset (SO_LINGER 0)
    raw = True  # the C socket type, not the socket.socket subclass

    def _connect(self, family: int, addr: tuple[Any, ...]) -> None:
        kind = _socket.socket if self.raw else socket.socket
        sock = kind(family, probes._STREAM_FLAGS)
        self.sock = sock
        self.fd = sock.fileno()
        err = sock.connect_ex(addr)
        if err == errno.EINPROGRESS:
            err = sock.connect_ex(addr) if self.sync else errno.EALREADY
            if err == errno.EALREADY:
                self.polling = True
                self.runner._loop.add_writer(self.fd, self._on_writable)
                return
        if err and err != errno.EISCONN:
            self.finish(False, f"connect: {os.strerror(err)}")
            return
        self._on_connected()

    def _on_connected(self) -> None:
        if self.target.kind == "tcp" and not self.reset:
            self.finish(True, "connected")
            return
        super()._on_connected()


def _variant(name: str, sync: bool, reset: bool, raw: bool) -> type:
    return type(name, (_VariantRun,), {"__slots__": (), "sync": sync,
                                      "reset": reset, "raw": raw})  # fmt: skip


TCP_VARIANTS = {
    "before": _variant("Before", False, False, False),
    "sync": _variant("Sync", True, False, False),
    "sync+reset": _variant("SyncReset", True, True, False),
    "sync+reset+raw": probes._SocketRun,
}


def time_wait_sockets() -> int:
    """TCP sockets in TIME_WAIT, machine-wide (/proc/net/sockstat: cheap)."""
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                fields = line.split()
                return int(fields[fields.index("tw") + 1])
    return 0


async def run_tcp_variants(
    ports: list[int], duration: float, slice_s: float, slacks: list[int]
) -> list[dict[str, Any]]:
    """The tcp fleet once per variant, in turns of *slice_s* seconds.

    Each turn builds a fresh fleet (probe start times spread over a second,
    as after a start of the whole fleet) and measures after every service
    had its first probe. Short turns taken in rotation let the machine's
    other load fall on all variants alike; each gets *duration* seconds in
    all. CPU is this thread's (CLOCK_THREAD_CPUTIME_ID) with the user/sys
    split from rusage.
    """
    plan = [(name, cls, 0) for name, cls in TCP_VARIANTS.items()]
    plan += [(f"slack {ms} ms", probes._SocketRun, ms) for ms in slacks if ms]
    stats = {
        name: {"cpu": 0.0, "user": 0.0, "sys": 0.0, "wall": 0.0, "probes": 0,
               "wakeups": 0, "delays": [], "tw": 0}
        for name, _, _ in plan
    }  # fmt: skip
    loop = asyncio.get_running_loop()
    original = probes._SocketRun
    try:
        rounds = max(1, round(duration / slice_s))
        for _ in range(rounds):
            for name, cls, slack in plan:
                probes._SocketRun = cls  # type: ignore[misc]
                fleet = Fleet(loop, "tcp", ports, slack)
                await asyncio.sleep(1.2)  # every service had its first probe
                st = stats[name]
                fleet.delays.clear()
                n0, w0, tw0 = fleet.results, fleet.wakeups, time_wait_sockets()
                c0, (u0, s0), t0 = time.thread_time(), cpu_split(), time.monotonic()
                await asyncio.sleep(slice_s)
                c1, (u1, s1), t1 = time.thread_time(), cpu_split(), time.monotonic()
                st["cpu"] += c1 - c0
                st["user"] += u1 - u0
                st["sys"] += s1 - s0
                st["wall"] += t1 - t0
                st["probes"] += fleet.results - n0
                st["wakeups"] += fleet.wakeups - w0
                st["delays"] += fleet.delays
                st["tw"] += time_wait_sockets() - tw0
                await fleet.close()
    finally:
        probes._SocketRun = original  # type: ignore[misc]
    rows = []
    for name, st in stats.items():
        wall = st["wall"]
        rows.append(
            {
                "variant": name,
                "seconds": round(wall, 1),
                "probes_per_s": round(st["probes"] / wall, 1),
                "cpu_pct_of_core": round(100 * st["cpu"] / wall, 2),
                "cpu_user_pct": round(100 * st["user"] / wall, 2),
                "cpu_sys_pct": round(100 * st["sys"] / wall, 2),
                "cpu_us_per_probe": round(1e6 * st["cpu"] / max(st["probes"], 1), 1),
                "wakeups_per_s": round(st["wakeups"] / wall),
                "delay_p50_ms": round(1000 * pct(st["delays"], 0.5), 2),
                "delay_p99_ms": round(1000 * pct(st["delays"], 0.99), 2),
                "time_wait_per_s": round(st["tw"] / wall),
            }
        )
    base = rows[0]["cpu_us_per_probe"]
    for row in rows:
        row["ratio_to_before"] = round(row["cpu_us_per_probe"] / base, 2)
    rows.append({"rss_mib": round(rss_mib(), 1)})
    return rows


async def run_runner_batches(ports: list[int], probes_n: int) -> list[dict[str, Any]]:
    """The runner's own cost per tcp probe, 50 probes per loop turn (so no
    timer wake-up per probe), beside the bare syscalls of the same probe."""
    loop = asyncio.get_running_loop()
    specs = [Spec("tcp", f"127.0.0.1:{p}") for p in ports]
    addrs = [("127.0.0.1", p) for p in ports]
    linger = probes._LINGER_RESET
    done = [0]

    def on_result(*_: Any) -> None:
        done[0] += 1

    def bare(seq: int) -> None:
        sock = _socket.socket(socket.AF_INET, probes._STREAM_FLAGS)
        sock.connect_ex(addrs[seq % len(addrs)])
        sock.connect_ex(addrs[seq % len(addrs)])
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        sock.close()
        done[0] += 1

    plan = [("before", TCP_VARIANTS["before"]), ("after", probes._SocketRun),
            ("bare syscalls", None)]  # fmt: skip
    cost: dict[str, list[float]] = {name: [] for name, _ in plan}
    original = probes._SocketRun
    try:
        for _ in range(5):
            for name, cls in plan:
                probes._SocketRun = cls or original  # type: ignore[misc]
                runner = ProbeRunner(loop, on_result, None)
                done[0] = seq = 0
                cpu0 = time.thread_time()
                while seq < probes_n:
                    for _ in range(50):
                        seq += 1
                        if cls is None:
                            bare(seq)
                        else:
                            runner.run(
                                seq % len(specs), 0, seq, specs[seq % len(specs)]
                            )
                    while done[0] < seq:
                        await asyncio.sleep(0)
                    await asyncio.sleep(0.002)  # the server accepts
                cost[name].append((time.thread_time() - cpu0) / seq)
                await runner.aclose()
    finally:
        probes._SocketRun = original  # type: ignore[misc]
    return [
        {"runner": name, "cpu_us_per_probe_median": round(1e6 * pct(v, 0.5), 1)}
        for name, v in cost.items()
    ]


# -- part 2: three HTTP clients side by side ----------------------------------


async def streams_get(host: str, port: int) -> bool:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            b"GET / HTTP/1.1\r\nHost: %s:%d\r\nConnection: close\r\n\r\n"
            % (host.encode(), port)
        )
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(None, 2)[1])
        await reader.read()
        return 200 <= status <= 399
    finally:
        writer.close()
        await writer.wait_closed()


async def paced(
    rate: int, duration: float, issue: Callable[[int], None], done: Callable[[], int]
) -> tuple[float, int, float]:
    """Issue ``rate`` probes a second in 10 ms batches; CPU s, probes, wall."""
    loop = asyncio.get_running_loop()
    per_batch = rate // 100
    start0 = done()
    cpu0, t0 = cpu_seconds(), loop.time()
    i = 0
    next_at = t0
    while loop.time() - t0 < duration:
        for _ in range(per_batch):
            issue(i)
            i += 1
        next_at += 0.01
        await asyncio.sleep(max(0.0, next_at - loop.time()))
    deadline = loop.time() + 5
    while done() - start0 < i and loop.time() < deadline:
        await asyncio.sleep(0.01)
    return cpu_seconds() - cpu0, done() - start0, loop.time() - t0


async def run_clients(ports: list[int], duration: float) -> list[dict[str, Any]]:
    import httpx

    loop = asyncio.get_running_loop()
    rows = []

    async def measure(
        name: str, body: Callable[[], Awaitable[tuple[float, int, float]]]
    ):
        cpu, n, wall = await body()
        rows.append(
            {
                "client": name,
                "probes": n,
                "cpu_pct_of_core": round(100 * cpu / wall, 2),
                "cpu_us_per_probe": round(1e6 * cpu / max(n, 1), 1),
            }
        )

    # ProbeRunner: socket callbacks.
    count = [0]

    def on_result(*_: Any) -> None:
        count[0] += 1

    runner = ProbeRunner(loop, on_result, None)
    specs = [Spec("http", f"http://127.0.0.1:{p}/") for p in ports]

    await measure(
        "ProbeRunner (callbacks)",
        lambda: paced(
            1000, duration, lambda i: runner.run(i, 0, i, specs[i % len(specs)]),
            lambda: count[0],
        ),
    )  # fmt: skip
    await runner.aclose()

    # asyncio streams: a task per probe.
    done = [0]
    tasks: set[asyncio.Task[Any]] = set()

    def issue_streams(i: int) -> None:
        task = loop.create_task(streams_get("127.0.0.1", ports[i % len(ports)]))
        tasks.add(task)
        task.add_done_callback(
            lambda t: (tasks.discard(t), done.__setitem__(0, done[0] + 1))
        )

    await measure(
        "asyncio streams", lambda: paced(1000, duration, issue_streams, lambda: done[0])
    )

    # httpx, fresh connection per probe and pooled keep-alive.
    for name, headers in (("httpx (Connection: close)", {"Connection": "close"}),
                          ("httpx (keep-alive pool)", {})):  # fmt: skip
        async with httpx.AsyncClient(
            timeout=5, limits=httpx.Limits(max_connections=2000)
        ) as client:
            done[0] = 0

            async def get(
                port: int, client: Any = client, headers: Any = headers
            ) -> None:
                try:
                    r = await client.get(f"http://127.0.0.1:{port}/", headers=headers)
                    r.status_code  # noqa: B018
                finally:
                    done[0] += 1

            def issue_httpx(i: int) -> None:
                task = loop.create_task(get(ports[i % len(ports)]))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

            await measure(
                name, lambda: paced(1000, duration, issue_httpx, lambda: done[0])
            )
    base = rows[0]["cpu_us_per_probe"]
    for row in rows:
        row["ratio_to_probe_runner"] = round(row["cpu_us_per_probe"] / base, 2)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument(
        "--part",
        choices=["fleet", "tcp", "runner", "clients", "all"],
        default="all",
    )
    parser.add_argument(
        "--slice", type=float, default=2.0, help="for --part tcp: seconds per turn"
    )
    parser.add_argument(
        "--slack", default="", help="for --part tcp: loop-timer slacks (ms), e.g. 5,10"
    )
    parser.add_argument("--kinds", default="tcp,http")
    parser.add_argument(
        "--fleet-slack",
        type=int,
        default=_TIMER_SLACK_MS,
        help="for --part fleet: loop-timer slack (ms); default the supervisor's",
    )
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    args = parser.parse_args()
    run = uvloop.run if args.loop == "uvloop" else asyncio.run

    proc, ports = start_server(args.services)
    try:
        if args.part in ("fleet", "all"):
            # The fleet's loop timer has the supervisor's slack, as in
            # `fastorch run`; --fleet-slack 0 shows the cost without it.
            slack = args.fleet_slack
            for kind in args.kinds.split(","):
                print(json.dumps(run(run_fleet(kind, ports, args.duration, slack))))
        if args.part == "tcp":
            slacks = [int(ms) for ms in args.slack.split(",") if ms]
            coro = run_tcp_variants(ports, args.duration, args.slice, slacks)
            for row in run(coro):
                print(json.dumps(row))
        if args.part == "runner":
            for row in run(run_runner_batches(ports, 5000)):
                print(json.dumps(row))
        if args.part in ("clients", "all"):
            rows = run(run_clients(ports, min(args.duration, 10.0)))
            for row in rows:
                print(json.dumps(row))
    finally:
        stop_server(proc)


if __name__ == "__main__":
    main()
