"""Control API and metrics at fleet size: requests/s, scrape time, RSS.

    python bench/bench_api.py [N]     (default N = 1000 services)

Runs N real ``sleep`` children under a Supervisor, serves the API on a Unix
socket and measures, side by side in one run:

- list services (``GET /v1/services``) and one start/stop pair (two POSTs)
  per second, from an async httpx client on the same loop with a few
  concurrent connections;
- ``/metrics`` render time (in process, median of 20) and over the socket;
- RSS the API and metrics add: two real ``fastorch run`` processes with
  the same fleet, one with ``--no-api``, measured from outside after the
  API one has served three scrapes and three full listings (measuring
  inside the benchmark's own process would count the client's buffers).

A start/stop pair costs what the supervisor does for it, mostly spawning
and signalling; the API's own share is the GET /v1/services/NAME rate.

Targets: scrape <= 20 ms, RSS added <= 10 MiB at N = 1000.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import uvloop

CONCURRENCY = 4


def supervisor_rss(n: int, tmp: Path) -> tuple[float, float]:
    """RSS in MiB of ``fastorch run`` on N ``sleep`` services, without and
    with the API (after it served three scrapes and three listings)."""
    import httpx

    socket_path = str(tmp / "rss.sock")
    services = "".join(
        f'[services.s{i}]\ncommand = ["sleep", "3600"]\n' for i in range(n)
    )
    path = tmp / "rss.toml"
    path.write_text(
        f'[supervisor]\napi_socket = "{socket_path}"\nlog_level = "warning"\n'
        '[defaults.logs]\ndestination = "null"\n' + services
    )
    found = []
    for no_api in (True, False):
        argv = [sys.executable, "-m", "fastorch", "run", str(path)]
        proc = subprocess.Popen(argv + (["--no-api"] if no_api else []))
        try:
            me = psutil.Process(proc.pid)
            deadline = time.monotonic() + 120
            while len(me.children()) < n:
                if time.monotonic() > deadline:
                    raise SystemExit("fleet did not start in 120 s")
                time.sleep(0.1)
            if not no_api:
                transport = httpx.HTTPTransport(uds=socket_path)
                with httpx.Client(transport=transport, base_url="http://f") as c:
                    for _ in range(3):
                        c.get("/metrics").raise_for_status()
                        c.get("/v1/services").raise_for_status()
            time.sleep(1)
            found.append(me.memory_info().rss / 2**20)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    return found[0], found[1]


async def timed_rate(make, count: int) -> float:
    """Requests per second of ``count`` calls of ``make(i)``, CONCURRENCY wide."""
    queue = iter(range(count))

    async def worker() -> None:
        for i in queue:
            await make(i)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return count / (time.perf_counter() - started)


async def main(n: int) -> None:
    from fastorch import config as configmod
    from fastorch.supervisor import Supervisor

    tmp = Path(tempfile.mkdtemp(prefix="fastorch-bench-api-"))
    socket_path = str(tmp / "api.sock")
    services = "".join(
        f'[services.s{i}]\ncommand = ["sleep", "3600"]\n' for i in range(n)
    )
    path = tmp / "fleet.toml"
    path.write_text(
        f'[supervisor]\napi_socket = "{socket_path}"\n'
        '[defaults.logs]\ndestination = "null"\n' + services
    )

    sup = Supervisor(configmod.load(path), handle_signals=False)
    task = asyncio.get_running_loop().create_task(sup.run())
    deadline = time.monotonic() + 120
    while sup.engine.count_by_state()[4] < n:
        if time.monotonic() > deadline:
            raise SystemExit("fleet did not get ready in 120 s")
        await asyncio.sleep(0.05)

    # Baseline: the fleet is up, the API is not imported yet. The client's
    # own library is loaded first: it is the benchmark's cost, not the API's.
    import httpx

    from fastorch.api import serve

    server = await serve(sup)
    client = httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=socket_path),
        base_url="http://fastorch",
        timeout=30,
    )
    try:
        exporter = server.app.state.metrics
        for _ in range(3):
            (await client.get("/metrics")).raise_for_status()

        renders = []
        for _ in range(20):
            started = time.perf_counter()
            exporter.render()
            renders.append(time.perf_counter() - started)
        over_socket = []
        for _ in range(10):
            started = time.perf_counter()
            r = await client.get("/metrics")
            over_socket.append(time.perf_counter() - started)
        series = sum(1 for line in r.text.splitlines() if line and line[0] != "#")

        async def list_all(i: int) -> None:
            (await client.get("/v1/services")).raise_for_status()

        async def one(i: int) -> None:
            (await client.get(f"/v1/services/s{i % n}")).raise_for_status()

        async def start_stop(i: int) -> None:
            name = f"s{i % n}"
            (await client.post(f"/v1/services/{name}/stop")).raise_for_status()
            (await client.post(f"/v1/services/{name}/start")).raise_for_status()

        list_rate = await timed_rate(list_all, 50)
        one_rate = await timed_rate(one, 500)
        pair_rate = await timed_rate(start_stop, 300)
    finally:
        await client.aclose()
        await server.aclose()
        await asyncio.wait_for(sup.shutdown(), 60)
        await task

    ms = 1000
    print(f"fastorch API benchmark, N = {n} services, {CONCURRENCY} connections")
    print(f"  GET /v1/services (all {n} rows)    {list_rate:8.1f} req/s")
    print(f"  GET /v1/services/NAME             {one_rate:8.1f} req/s")
    print(f"  POST stop + POST start pair       {pair_rate:8.1f} pairs/s")
    print(
        f"  /metrics render (in process)      {statistics.median(renders) * ms:8.2f} ms"
        f"  (min {min(renders) * ms:.2f}, {series} series, target <= 20 ms)"
    )
    print(
        f"  /metrics over the Unix socket     "
        f"{statistics.median(over_socket) * ms:8.2f} ms"
    )
    without, with_api = supervisor_rss(n, tmp)
    print(
        f"  RSS added by API + metrics        {with_api - without:8.2f} MiB"
        f"  (fastorch run: {without:.1f} MiB with --no-api, {with_api:.1f} MiB"
        " serving; target <= 10 MiB)"
    )
    print(f"  ratio list-all / get-one          {list_rate / one_rate:8.3f}")


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    os.environ.setdefault("FASTORCH_RUNTIME_DIR", tempfile.gettempdir())
    uvloop.run(main(count))
