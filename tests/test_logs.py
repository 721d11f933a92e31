"""Child output through LogManager, with real children, pipes and sockets."""

from __future__ import annotations

import asyncio
import glob
import logging
import os
import socket
import stat
import sys
import tempfile
import time
import zlib
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import uvloop

from fastorch.logs import LogManager
from fastorch.process import ProcessTable

BOUND = 30.0  # seconds a test waits at most


@dataclass
class LogCfg:
    """The attributes of ``fastorch.config.LogConfig`` the manager reads."""

    destination: str = "file"
    dir: str | None = None
    max_size: int = 0
    keep: int = 3
    tail_lines: int = 100


@pytest.fixture(params=["uvloop", "asyncio"])
def loop(request: pytest.FixtureRequest) -> Iterator[asyncio.AbstractEventLoop]:
    if request.param == "uvloop":
        new = uvloop.new_event_loop()
    else:
        new = asyncio.new_event_loop()
    yield new
    new.run_until_complete(new.shutdown_asyncgens())
    new.close()


@pytest.fixture
def table(loop: asyncio.AbstractEventLoop) -> Iterator[ProcessTable]:
    procs = ProcessTable(loop, subreaper=False)
    yield procs
    procs.close()


@pytest.fixture
def tmp() -> Iterator[str]:
    with tempfile.TemporaryDirectory() as path:
        yield path


def run(loop: asyncio.AbstractEventLoop, coro: Awaitable[Any]) -> Any:
    return loop.run_until_complete(asyncio.wait_for(coro, BOUND))


async def child(
    table: ProcessTable, code: str, fds: tuple[int | None, int | None]
) -> int:
    """Run ``python3 -c code`` with the given stdout/stderr; its status."""
    done = asyncio.get_running_loop().create_future()
    table.spawn(
        [sys.executable, "-c", code],
        stdout=fds[0],
        stderr=fds[1],
        on_exit=lambda pid, status: done.set_result(status),
    )
    return await done


async def until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def read_all(directory: str, name: str) -> list[bytes]:
    """The contents of name.log.<keep> .. name.log.1, name.log, oldest first."""
    base = os.path.join(directory, f"{name}.log")
    rotated = sorted(glob.glob(base + ".*"), key=lambda p: -int(p.rsplit(".", 1)[1]))
    out = []
    for path in [*rotated, base]:
        with open(path, "rb") as f:
            out.append(f.read())
    return out


# A child that writes lines as fast as it can to both streams, each line
# carrying its stream, its sequence number and a checksum of its payload.
BURST = """
import os, sys, zlib
total = {total}
alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789" * 8
pending = {{1: b"", 2: b""}}
batch = {{1: [], 2: []}}

def flush(fd, everything=False):
    # Write in slices that end mid-line, as a child's stdio buffer does.
    data = pending[fd] + b"".join(batch[fd])
    batch[fd].clear()
    step = 65521
    while len(data) >= step or (everything and data):
        data = data[os.write(fd, data[:step]):]
    pending[fd] = data

written = seq = 0
while written < total:
    payload = alphabet[seq % 97 : seq % 97 + 20 + seq % 150]
    fd = 2 if seq % 5 == 0 else 1
    line = b"%c %d %08x %s\\n" % (
        69 if fd == 2 else 79, seq, zlib.crc32(payload), payload)
    batch[fd].append(line)
    written += len(line)
    seq += 1
    if len(batch[fd]) >= 1000:
        flush(fd)
flush(1, True)
flush(2, True)
os.write(2, b"LAST %d\\n" % seq)
"""


def check_burst(data: bytes) -> int:
    """Every line whole, in order per stream, checksums right; the count."""
    lines = data.split(b"\n")
    assert lines.pop() == b"", "output does not end with a newline"
    # LAST comes on stderr after everything else; stdout's last lines are
    # read from their own pipe and may land after it in the file.
    last = [line for line in lines if line.startswith(b"LAST ")]
    assert len(last) == 1, last
    lines.remove(last[0])
    expected = int(last[0].split()[1])
    next_seq = {b"O": [], b"E": []}
    for line in lines:
        stream, seq, crc, payload = line.split(b" ")
        assert int(crc, 16) == zlib.crc32(payload), line[:80]
        next_seq[stream].append(int(seq))
    seqs = next_seq[b"O"] + next_seq[b"E"]
    assert next_seq[b"O"] == sorted(next_seq[b"O"])
    assert next_seq[b"E"] == sorted(next_seq[b"E"])
    assert len(seqs) == expected and set(seqs) == set(range(expected))
    return expected


def test_burst_of_50mb_arrives_whole_across_rotations(
    loop: asyncio.AbstractEventLoop, table: ProcessTable, tmp: str
) -> None:
    total = 50 * 1024 * 1024
    max_size = 8 * 1024 * 1024

    async def main() -> None:
        logs = LogManager(loop)
        cfg = LogCfg(dir=tmp, max_size=max_size, keep=10, tail_lines=5)
        fds = logs.open(1, "burst", cfg)
        assert await child(table, BURST.format(total=total), fds) == 0
        logs.release(1)
        await until(lambda: not logs._draining)
        tail = logs.tail("burst", 5)
        await logs.aclose()
        files = read_all(tmp, "burst")
        assert len(files) >= (total + max_size - 1) // max_size
        assert sum(map(len, files)) >= total
        for data in files:
            assert 0 < len(data) <= max_size and data.endswith(b"\n")
        everything = b"".join(files)
        check_burst(everything)
        # The tail is the last lines as they were written to the files.
        assert tail == everything.decode().splitlines()[-5:]

    run(loop, main())


def test_rotation_keeps_lines_whole_and_keep_files(
    loop: asyncio.AbstractEventLoop, table: ProcessTable, tmp: str
) -> None:
    code = (
        "import sys\n"
        "for i in range(400):\n"
        "    print(str(i) + ' ' + 'x' * (i % 37), flush=i % 7 == 0)\n"
        "print('L' * 2500)\n"  # longer than max_size: a file of its own
        "print('end')\n"
    )

    async def main() -> None:
        logs = LogManager(loop)
        fds = logs.open(3, "rot", LogCfg(dir=tmp, max_size=1000, keep=3))
        assert await child(table, code, fds) == 0
        logs.release(3)
        await until(lambda: not logs._draining)
        await logs.aclose()
        files = read_all(tmp, "rot")
        assert len(files) == 4  # name.log and .1 .. .3: older ones are gone
        assert files[-1] == b"end\n"
        assert files[-2] == b"L" * 2500 + b"\n"
        for data in files[:-2]:
            assert len(data) <= 1000 and data.endswith(b"\n")
        numbers = [int(line.split()[0]) for line in b"".join(files[:-2]).splitlines()]
        assert numbers == list(range(numbers[0], 400))

    run(loop, main())


def test_tail_and_listen(
    loop: asyncio.AbstractEventLoop, table: ProcessTable, tmp: str
) -> None:
    async def main() -> None:
        logs = LogManager(loop)
        heard: list[str] = []
        early: list[str] = []
        unlisten_early = logs.listen("web", early.append)
        unlisten_early()
        unlisten = logs.listen("web", heard.append)
        fds = logs.open(1, "web", LogCfg(dir=tmp, tail_lines=3))
        code = "for i in range(10): print('line', i)\nprint('é')"
        assert await child(table, code, fds) == 0
        await until(lambda: len(heard) == 11)
        assert logs.tail("web", 2) == ["line 9", "é"]
        assert logs.tail("web", 50) == ["line 8", "line 9", "é"]
        assert logs.tail("nobody", 5) == []
        unlisten()
        assert await child(table, "print('after')", fds) == 0
        await until(lambda: "after" in logs.tail("web", 3))
        assert heard[-1] != "after" and early == []
        assert heard == [f"line {i}" for i in range(10)] + ["é"]
        await logs.aclose()

    run(loop, main())


def test_fds_survive_restarts_and_partial_lines_flush(
    loop: asyncio.AbstractEventLoop, table: ProcessTable, tmp: str
) -> None:
    async def main() -> None:
        logs = LogManager(loop)
        cfg = LogCfg(dir=tmp)
        fds = logs.open(1, "svc", cfg)
        assert await child(table, "print('first run')", fds) == 0
        # A restart: the same pipes again, the file grows.
        assert logs.open(1, "svc", cfg) == fds
        code = "import sys; sys.stdout.write('no newline at exit')"
        assert await child(table, code, fds) == 0
        await until(lambda: logs.tail("svc", 1) == ["first run"])
        logs.release(1)
        await until(lambda: not logs._draining)
        await logs.aclose()
        with open(os.path.join(tmp, "svc.log"), "rb") as f:
            assert f.read() == b"first run\nno newline at exit\n"

    run(loop, main())


def test_inherit_and_null(loop: asyncio.AbstractEventLoop) -> None:
    async def main() -> None:
        logs = LogManager(loop)
        assert logs.open(1, "a", LogCfg("inherit")) == (None, None)
        out, err = logs.open(2, "b", LogCfg("null"))
        assert out == err and out is not None
        assert os.readlink(f"/proc/self/fd/{out}") == os.devnull
        logs.release(1)
        logs.release(2)
        with pytest.raises(ValueError, match="unknown log destination"):
            logs.open(3, "c", LogCfg("syslog"))
        await logs.aclose()

    run(loop, main())


def test_journal_unreachable_falls_back_with_one_warning(
    loop: asyncio.AbstractEventLoop, tmp: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        logs = LogManager(loop, journal_socket=os.path.join(tmp, "no-journald"))
        with caplog.at_level(logging.WARNING, logger="fastorch.logs"):
            fds = logs.open(1, "a", LogCfg("journal", dir=os.path.join(tmp, "logs")))
            logs.open(2, "b", LogCfg("journal", dir=os.path.join(tmp, "logs")))
            no_dir = logs.open(3, "c", LogCfg("journal", dir="/proc/no/such/dir"))
        assert no_dir == (None, None)
        assert all(stat.S_ISFIFO(os.fstat(fd).st_mode) for fd in fds if fd)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "journald is unreachable" in warnings[0].getMessage()
        await logs.aclose()

    run(loop, main())


def test_journal_stream_goes_straight_from_child_to_socket(
    loop: asyncio.AbstractEventLoop, table: ProcessTable, tmp: str
) -> None:
    """A stand-in journald on a real socket: the header, then the child's bytes."""
    path = os.path.join(tmp, "stdout")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(8)

    async def main() -> None:
        logs = LogManager(loop, journal_socket=path)
        fds = logs.open(1, "web@1", LogCfg("journal"))
        assert all(stat.S_ISSOCK(os.fstat(fd).st_mode) for fd in fds if fd)
        code = "import sys; print('to out'); print('to err', file=sys.stderr)"
        assert await child(table, code, fds) == 0
        assert logs.tail("web@1", 5) == []  # fastorch sees none of it
        logs.release(1)
        streams = []
        server.settimeout(5)
        for _ in range(2):
            conn, _ = server.accept()
            with conn:
                conn.settimeout(5)
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
                streams.append(data)
        await logs.aclose()
        assert sorted(streams) == sorted(
            [b"web@1\n\n6\n0\n0\n0\n0\nto out\n", b"web@1\n\n3\n0\n0\n0\n0\nto err\n"]
        )

    try:
        run(loop, main())
    finally:
        server.close()


@pytest.fixture(scope="module")
def journald() -> Iterator[Any]:
    try:
        from harness.journald import Journald, skip_reason
    except ImportError:
        pytest.skip("tests/harness/journald.py (a private journald) is missing")
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    with Journald() as jd:
        yield jd


@pytest.mark.systemd
def test_journal_mode_against_a_real_journald(
    loop: asyncio.AbstractEventLoop, table: ProcessTable, journald: Any
) -> None:
    name = f"svc-{id(loop)}"  # one identifier per parametrized run

    async def main() -> None:
        logs = LogManager(loop, journal_socket=journald.stdout)
        fds = logs.open(1, name, LogCfg("journal"))
        # A restart reuses the same streams.
        code = "import sys; print('hello out'); print('hello err', file=sys.stderr)"
        assert await child(table, code, fds) == 0
        assert logs.open(1, name, LogCfg("journal")) == fds
        assert await child(table, "print('second run')", fds) == 0
        logs.release(1)
        await logs.aclose()

    run(loop, main())
    entries = journald.wait_for(count=3, SYSLOG_IDENTIFIER=name)
    got = sorted((e["MESSAGE"], e["PRIORITY"]) for e in entries)
    assert got == [("hello err", "3"), ("hello out", "6"), ("second run", "6")]
    assert {e["_TRANSPORT"] for e in entries} == {"stdout"}
