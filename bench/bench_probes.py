"""Probe cost: 1000 services probed each second, and three HTTP clients.

Run: ``python bench/bench_probes.py --duration 60`` (default 10 s per run).

Part 1 (``--part fleet``): the compiled engine schedules a readiness probe
per service every second (start times spread over the first second), and
``ProbeRunner`` carries them out against real listeners on loopback, one
port per service, served by a separate process so that only the
supervisor side is measured. Reports CPU % of one core, CPU per probe,
scheduling delay (p50/p99/max: how late ``run()`` is called after the
deadline the loop timer was armed for), RSS.

Part 2 (``--part clients``): the same 1000 HTTP probes per second issued
by ``ProbeRunner`` (socket callbacks), by a minimal GET on asyncio streams
(a task per probe) and by httpx (a shared ``AsyncClient``, a fresh
connection per probe like the others, and again with keep-alive), side by
side in one run. Reports CPU per probe and the ratio to ``ProbeRunner``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import uvloop

from fastorch._core import Action, Engine
from fastorch.probes import ProbeRunner

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

    def __init__(self, loop: asyncio.AbstractEventLoop, kind: str, ports: list[int]):
        self.loop = loop
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
            self.handle = self.loop.call_at(self.base + deadline / 1000, self.tick)

    def tick(self) -> None:
        self.handle = None
        self.feed(self.engine.advance(max(self.now_ms(), self.armed_ms or 0)))
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


async def run_fleet(kind: str, ports: list[int], duration: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    rss0 = rss_mib()
    fleet = Fleet(loop, kind, ports)
    await asyncio.sleep(2.0)  # every service has had its first probe
    fleet.delays.clear()
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
    }
    await fleet.close()
    return out


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
    parser.add_argument("--part", choices=["fleet", "clients", "all"], default="all")
    parser.add_argument("--kinds", default="tcp,http")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    args = parser.parse_args()
    run = uvloop.run if args.loop == "uvloop" else asyncio.run

    proc, ports = start_server(args.services)
    try:
        if args.part in ("fleet", "all"):
            for kind in args.kinds.split(","):
                print(json.dumps(run(run_fleet(kind, ports, args.duration))))
        if args.part in ("clients", "all"):
            rows = run(run_clients(ports, min(args.duration, 10.0)))
            for row in rows:
                print(json.dumps(row))
    finally:
        stop_server(proc)


if __name__ == "__main__":
    main()
