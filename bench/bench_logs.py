"""Cost of a child's output to the supervisor: file mode and journal mode.

Run: ``python bench/bench_logs.py --mb 50``.

A child (``python3 -c``) writes ``--mb`` MiB of ~100-byte lines to stdout
as fast as it can. Side by side in one run:

- ``file``: ``LogManager`` file mode (1 MiB pipe, big reads, one write per
  chunk of whole lines, rotation at 10 MiB);
- ``file-readline``: the plain way, for comparison: the same pipe read with
  an asyncio ``StreamReader``, ``readline()`` and a buffered ``write`` per
  line;
- ``journal``: ``LogManager`` journal mode (the child writes to journald's
  socket itself). Uses ``--journal-socket`` (default: journald's, when
  present); without one, a stand-in reader process on a Unix socket takes
  the bytes, which measures the same thing: fastorch's side.

Reports supervisor CPU seconds per MiB (user+sys of this process only; the
child and journald are other processes) and the wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import uvloop

from fastorch.logs import LogManager
from fastorch.process import ProcessTable

WRITER = """
import os, sys
total = int(sys.argv[1]) << 20
lines = b"".join(b"%08d %s\\n" % (i, b"x" * (40 + i % 90)) for i in range(10000))
written = 0
while written < total:
    block = lines[: total - written]
    view = memoryview(block)
    while view:
        view = view[os.write(1, view):]
    written += len(block)
"""

DRAIN = """
import selectors, socket, sys
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(sys.argv[1])
srv.listen(8)
print("ready", flush=True)
sel = selectors.DefaultSelector()
for _ in range(2):
    sel.register(srv.accept()[0], selectors.EVENT_READ)
total = 0
while sel.get_map():
    for key, _ in sel.select():
        data = key.fileobj.recv(1 << 20)
        if not data:
            sel.unregister(key.fileobj)
        total += len(data)
print(total, flush=True)
"""


@dataclass
class LogCfg:
    destination: str
    dir: str
    max_size: int = 10 << 20
    keep: int = 5
    tail_lines: int = 200


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def spawn_writer(table: ProcessTable, mb: int, stdout: int | None) -> int:
    done = asyncio.get_running_loop().create_future()
    table.spawn(
        [sys.executable, "-c", WRITER, str(mb)],
        stdout=stdout,
        stderr=None,
        on_exit=lambda pid, status: done.set_result(status),
    )
    return await done


async def until(predicate: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("bench step did not finish")
        await asyncio.sleep(0.005)


async def bench_file(table: ProcessTable, mb: int, directory: str) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    logs = LogManager(loop)
    fds = logs.open(1, "bench", LogCfg("file", directory))
    c0, t0 = cpu(), time.monotonic()
    assert await spawn_writer(table, mb, fds[0]) == 0
    logs.release(1)
    await until(lambda: not logs._draining)
    c, wall = cpu() - c0, time.monotonic() - t0
    await logs.aclose()
    size = sum(
        os.path.getsize(os.path.join(directory, f))
        for f in os.listdir(directory)
        if f.startswith("bench.log")
    )
    return _row("file", mb, c, wall, size)


async def bench_readline(
    table: ProcessTable, mb: int, directory: str
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    r, w = os.pipe2(os.O_CLOEXEC)
    reader = asyncio.StreamReader(limit=1 << 16)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(r, "rb", 0)
    )
    path = os.path.join(directory, "readline.log")
    c0, t0 = cpu(), time.monotonic()
    with open(path, "wb") as out:
        child = loop.create_task(spawn_writer(table, mb, w))
        await asyncio.sleep(0)  # let the child start before our end closes
        await until(lambda: len(table) > 0 or child.done())
        os.close(w)
        while line := await reader.readline():
            out.write(line)
        assert await child == 0
    c, wall = cpu() - c0, time.monotonic() - t0
    transport.close()
    return _row("file-readline", mb, c, wall, os.path.getsize(path))


async def bench_journal(
    table: ProcessTable, mb: int, socket_path: str | None, directory: str
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    drain = None
    label = "journal"
    if socket_path is None:
        socket_path = os.path.join(directory, "stdout")
        drain = subprocess.Popen(
            [sys.executable, "-c", DRAIN, socket_path],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert drain.stdout is not None
        drain.stdout.readline()
        label = "journal (stand-in reader)"
    logs = LogManager(loop, journal_socket=socket_path)
    fds = logs.open(1, "bench", LogCfg("journal", directory))
    c0, t0 = cpu(), time.monotonic()
    assert await spawn_writer(table, mb, fds[0]) == 0
    c, wall = cpu() - c0, time.monotonic() - t0
    logs.release(1)
    await logs.aclose()
    size = mb << 20
    if drain is not None:
        assert drain.stdout is not None
        size = int(drain.stdout.readline())
        drain.wait(10)
    return _row(label, mb, c, wall, size)


def _row(mode: str, mb: int, cpu_s: float, wall: float, size: int) -> dict[str, Any]:
    return {
        "mode": mode,
        "mib": mb,
        "bytes_arrived": size,
        "supervisor_cpu_s": round(cpu_s, 3),
        "cpu_s_per_mib": round(cpu_s / mb, 5),
        "wall_s": round(wall, 2),
        "mib_per_s": round(mb / wall, 1),
    }


async def main_async(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    table = ProcessTable(loop, subreaper=False)
    journal = args.journal_socket
    if journal is None and os.path.exists("/run/systemd/journal/stdout"):
        journal = "/run/systemd/journal/stdout"
    rows = []
    try:
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory() as d:
                rows.append(await bench_file(table, args.mb, d))
            with tempfile.TemporaryDirectory() as d:
                rows.append(await bench_readline(table, args.mb, d))
            with tempfile.TemporaryDirectory() as d:
                rows.append(await bench_journal(table, args.mb, journal, d))
    finally:
        table.close()
    base = next(r["cpu_s_per_mib"] for r in rows if r["mode"] == "file")
    for row in rows:
        row["cpu_ratio_to_file"] = round(row["cpu_s_per_mib"] / base, 2)
        print(json.dumps(row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=50, help="MiB the child writes")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--journal-socket", default=None)
    args = parser.parse_args()
    uvloop.run(main_async(args))


if __name__ == "__main__":
    main()
