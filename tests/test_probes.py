"""Probes and notify sockets against real servers and children on loopback."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvloop

from fastorch.probes import NotifyServer, ProbeRunner

try:
    from fastorch.process import ProcessTable
except ImportError:  # pragma: no cover - process.py is not there yet
    ProcessTable = None  # type: ignore[assignment,misc]

BOUND = 10.0  # seconds any single test waits at most


@dataclass
class Spec:
    """The attributes of ``fastorch.config.ProbeConfig`` a runner reads."""

    kind: str
    target: Any
    status_min: int = 200
    status_max: int = 399
    headers: dict[str, str] = field(default_factory=dict)
    initial_delay_ms: int = 0
    interval_ms: int = 1000
    timeout_ms: int = 1000
    success_threshold: int = 1
    failure_threshold: int = 3


@pytest.fixture(params=["uvloop", "asyncio"])
def loop(request: pytest.FixtureRequest) -> Iterator[asyncio.AbstractEventLoop]:
    new = (
        uvloop.new_event_loop()
        if request.param == "uvloop"
        else asyncio.new_event_loop()
    )
    yield new
    new.run_until_complete(new.shutdown_asyncgens())
    new.close()


def run(loop: asyncio.AbstractEventLoop, coro: Awaitable[Any]) -> Any:
    return loop.run_until_complete(asyncio.wait_for(coro, BOUND))


class Results:
    """Collects on_result calls and lets a test wait for them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: list[tuple[int, int, int, bool, str]] = []
        self.inside_run = False
        self.reentrant = False
        self._event = asyncio.Event()

    def __call__(self, sid: int, probe: int, seq: int, ok: bool, detail: str) -> None:
        if self.inside_run:
            self.reentrant = True
        self.items.append((sid, probe, seq, ok, detail))
        self._event.set()

    async def wait(self, count: int) -> list[tuple[int, int, int, bool, str]]:
        while len(self.items) < count:
            self._event.clear()
            await self._event.wait()
        return self.items

    def by_seq(self) -> dict[int, tuple[bool, str]]:
        return {seq: (ok, detail) for _, _, seq, ok, detail in self.items}


class HttpServer:
    """A tiny HTTP/1.1 server on loopback whose status can change."""

    def __init__(self) -> None:
        self.status = 200
        self.hang = False
        self.requests: list[bytes] = []
        self.closed_by_peer = asyncio.Event()
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self) -> HttpServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: Any) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.requests.append(head)
            if self.hang:
                await reader.read()  # until the prober gives up
                self.closed_by_peer.set()
                return
            body = b"ok\n" if self.status < 400 else b"broken\n"
            writer.write(
                b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s"
                % (self.status, len(body), body)
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


def test_http_probe_sees_200_then_500(loop: asyncio.AbstractEventLoop) -> None:
    async def main() -> None:
        server = await HttpServer().start()
        results = Results(loop)
        runner = ProbeRunner(loop, results, None)
        spec = Spec(
            "http",
            f"http://127.0.0.1:{server.port}/healthz?x=1",
            headers={"X-Probe": "yes"},
        )
        runner.run(1, 0, 1, spec)
        await results.wait(1)
        server.status = 500
        runner.run(1, 0, 2, spec)
        await results.wait(2)
        await runner.aclose()
        await server.close()
        assert results.items == [
            (1, 0, 1, True, "http 200"),
            (1, 0, 2, False, "http 500"),
        ]
        first = server.requests[0]
        assert first.startswith(b"GET /healthz?x=1 HTTP/1.1\r\n")
        assert b"\r\nX-Probe: yes\r\n" in first
        assert f"Host: 127.0.0.1:{server.port}".encode() in first
        assert runner.durations.count("http") == 2
        assert runner.durations.failures("http") == 1
        assert runner.durations.buckets("http")[-1] == ("+Inf", 2.0)

    run(loop, main())


def test_http_status_range_is_configurable(loop: asyncio.AbstractEventLoop) -> None:
    async def main() -> None:
        server = await HttpServer().start()
        server.status = 418
        results = Results(loop)
        runner = ProbeRunner(loop, results, None)
        url = f"http://127.0.0.1:{server.port}/"
        runner.run(1, 0, 1, Spec("http", url))
        runner.run(1, 0, 2, Spec("http", url, status_min=400, status_max=418))
        await results.wait(2)
        await runner.aclose()
        await server.close()
        assert results.by_seq() == {1: (False, "http 418"), 2: (True, "http 418")}

    run(loop, main())


def test_http_probe_resolves_host_names(loop: asyncio.AbstractEventLoop) -> None:
    async def main() -> None:
        server = await HttpServer().start()
        results = Results(loop)
        runner = ProbeRunner(loop, results, None)
        spec = Spec("http", f"http://localhost:{server.port}/")
        runner.run(1, 0, 1, spec)
        runner.run(1, 0, 2, spec)  # the second one finds the name cached
        await results.wait(2)
        await runner.aclose()
        await server.close()
        assert results.by_seq() == {1: (True, "http 200"), 2: (True, "http 200")}

    if socket.getaddrinfo("localhost", 1)[0][0] != socket.AF_INET:
        pytest.skip("'localhost' does not resolve to IPv4 first on this machine")
    run(loop, main())


def test_http_server_sending_garbage_fails(loop: asyncio.AbstractEventLoop) -> None:
    async def answer(reader: asyncio.StreamReader, writer: Any) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SSH-2.0-OpenSSH\r\n")
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        results = Results(loop)
        runner = ProbeRunner(loop, results, None)
        runner.run(1, 0, 1, Spec("http", f"http://127.0.0.1:{port}/"))
        await results.wait(1)
        await runner.aclose()
        server.close()
        await server.wait_closed()
        ok, detail = results.by_seq()[1]
        assert not ok and detail.startswith("bad response")

    run(loop, main())


def test_tcp_probe_fails_once_the_listener_goes_away(
    loop: asyncio.AbstractEventLoop,
) -> None:
    async def main() -> None:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        results = Results(loop)
        runner = ProbeRunner(loop, results, None)
        spec = Spec("tcp", f"127.0.0.1:{port}")
        runner.run(7, 1, 1, spec)
        await results.wait(1)
        listener.close()
        runner.run(7, 1, 2, spec)
        await results.wait(2)
        await runner.aclose()
        assert results.by_seq() == {
            1: (True, "connected"),
            2: (False, "connect: Connection refused"),
        }

    run(loop, main())


def _time_wait_to(port: int) -> int:
    """IPv4 sockets in TIME_WAIT with *port* at either end."""
    count = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            local, remote, state = line.split()[1:4]
            ports = {
                int(local.rsplit(":", 1)[1], 16),
                int(remote.rsplit(":", 1)[1], 16),
            }
            count += state == "06" and port in ports
    return count


def test_tcp_probe_resets_the_connection_and_leaves_no_time_wait(
    loop: asyncio.AbstractEventLoop,
) -> None:
    async def main() -> None:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        results = Results(loop)
        runner = ProbeRunner(loop, results, None)
        results.inside_run = True
        runner.run(7, 1, 1, Spec("tcp", f"127.0.0.1:{port}"))
        results.inside_run = False
        await results.wait(1)
        await runner.aclose()
        # Decided by the handshake alone, and still reported after run().
        assert not results.reentrant
        assert results.by_seq() == {1: (True, "connected")}
        listener.settimeout(BOUND / 2)
        conn, _ = listener.accept()
        with conn, pytest.raises(ConnectionResetError):
            conn.recv(1)
        listener.close()
        assert _time_wait_to(port) == 0

    run(loop, main())


def test_tcp_connect_still_in_progress_is_awaited_or_cancelled(
    loop: asyncio.AbstractEventLoop,
) -> None:
    async def main() -> None:
        # A full accept queue drops SYNs: the connect stays in progress
        # until the client's SYN is retransmitted (after about 1 s).
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        filler = socket.create_connection(("127.0.0.1", port), timeout=BOUND / 2)
        results = Results(loop)
        runner = ProbeRunner(loop, results, None)
        spec = Spec("tcp", f"127.0.0.1:{port}")
        runner.run(7, 1, 1, spec)
        runner.run(7, 1, 2, spec)
        await asyncio.sleep(0.3)
        assert results.items == [] and runner.in_flight == 2
        runner.cancel(7, 1, 1)
        assert runner.in_flight == 1
        accepted = []
        while not results.items:
            try:
                accepted.append(listener.accept()[0])
            except BlockingIOError:
                await asyncio.sleep(0.01)
        await runner.aclose()
        for conn in accepted:
            conn.close()
        filler.close()
        listener.close()
        assert results.by_seq() == {2: (True, "connected")}

    run(loop, main())


def test_tcp_probe_on_ipv6_loopback(loop: asyncio.AbstractEventLoop) -> None:
    try:
        listener = socket.socket(socket.AF_INET6)
        listener.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    listener.listen(4)

    async def main() -> None:
        results = Results(loop)
        runner = ProbeRunner(loop, results, None)
        runner.run(1, 0, 1, Spec("tcp", f"[::1]:{listener.getsockname()[1]}"))
        await results.wait(1)
        await runner.aclose()
        assert results.by_seq() == {1: (True, "connected")}

    try:
        run(loop, main())
    finally:
        listener.close()


def test_bad_target_is_reported_after_run_returns(
    loop: asyncio.AbstractEventLoop,
) -> None:
    async def main() -> None:
        results = Results(loop)
        runner = ProbeRunner(loop, results, None)
        results.inside_run = True
        runner.run(1, 0, 1, Spec("tcp", "no-port-here"))
        runner.run(1, 0, 2, Spec("http", "ftp://127.0.0.1/"))
        runner.run(1, 0, 3, Spec("tcp", "127.0.0.1:1"))  # refused at once
        runner.run(1, 0, 4, Spec("exec", ["true"]))  # no process table
        results.inside_run = False
        await results.wait(4)
        await runner.aclose()
        assert not results.reentrant
        assert [ok for ok, _ in results.by_seq().values()] == [False] * 4

    run(loop, main())


def test_cancel_aborts_a_hung_http_read(loop: asyncio.AbstractEventLoop) -> None:
    async def main() -> None:
        server = await HttpServer().start()
        server.hang = True
        results = Results(loop)
        runner = ProbeRunner(loop, results, None)
        runner.run(1, 0, 1, Spec("http", f"http://127.0.0.1:{server.port}/"))
        while not server.requests:
            await asyncio.sleep(0.005)
        assert runner.in_flight == 1
        runner.cancel(1, 0, 1)
        # The server sees the connection close: the socket really went.
        await server.closed_by_peer.wait()
        await asyncio.sleep(0.05)
        assert results.items == []
        assert runner.in_flight == 0
        await runner.aclose()
        await server.close()

    run(loop, main())


def test_hung_probes_do_not_block_others(loop: asyncio.AbstractEventLoop) -> None:
    async def main() -> None:
        hung = await HttpServer().start()
        hung.hang = True
        good = await HttpServer().start()
        results = Results(loop)
        runner = ProbeRunner(loop, results, None, max_concurrency=3)
        for seq in range(1, 4):
            runner.run(seq, 0, seq, Spec("http", f"http://127.0.0.1:{hung.port}/"))
        # Every slot is taken by a hung run: the next one waits in the queue.
        runner.run(9, 0, 9, Spec("http", f"http://127.0.0.1:{good.port}/"))
        assert (runner.in_flight, runner.queued) == (3, 1)
        await asyncio.sleep(0.1)
        assert results.items == []
        # The engine's timeout fires for one hung run: its slot frees up.
        runner.cancel(1, 0, 1)
        await results.wait(1)
        assert results.items == [(9, 0, 9, True, "http 200")]
        assert (runner.in_flight, runner.queued) == (2, 0)
        await runner.aclose()
        assert runner.in_flight == 0
        await hung.close()
        await good.close()

    run(loop, main())


def test_cancel_of_a_queued_run_drops_it(loop: asyncio.AbstractEventLoop) -> None:
    async def main() -> None:
        server = await HttpServer().start()
        results = Results(loop)
        runner = ProbeRunner(loop, results, None, max_concurrency=1)
        spec = Spec("http", f"http://127.0.0.1:{server.port}/")
        runner.run(1, 0, 1, spec)
        runner.run(2, 0, 1, spec)
        runner.run(3, 0, 1, spec)
        runner.cancel(2, 0, 1)
        await results.wait(2)
        await asyncio.sleep(0.05)
        await runner.aclose()
        await server.close()
        assert sorted(sid for sid, *_ in results.items) == [1, 3]

    run(loop, main())


def test_many_probes_at_once_all_answer(loop: asyncio.AbstractEventLoop) -> None:
    async def main() -> None:
        server = await HttpServer().start()
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(512)
        results = Results(loop)
        runner = ProbeRunner(loop, results, None, max_concurrency=64)
        http = Spec("http", f"http://127.0.0.1:{server.port}/")
        tcp = Spec("tcp", f"127.0.0.1:{listener.getsockname()[1]}")
        for sid in range(300):
            runner.run(sid, sid % 2, 1, http if sid % 2 else tcp)
        await results.wait(300)
        await runner.aclose()
        await server.close()
        listener.close()
        assert all(ok for *_, ok, _ in results.items)
        assert runner.durations.count("tcp") == runner.durations.count("http") == 150

    run(loop, main())


def test_https_probe_against_a_tls_server(loop: asyncio.AbstractEventLoop) -> None:
    ssl = pytest.importorskip("ssl")
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl binary to make a test certificate")

    async def main(ctx: Any) -> None:
        server = HttpServer()
        server.server = await asyncio.start_server(
            server._handle, "127.0.0.1", 0, ssl=ctx
        )
        port = server.server.sockets[0].getsockname()[1]
        results = Results(loop)
        runner = ProbeRunner(loop, results, None)
        runner.run(1, 0, 1, Spec("http", f"https://127.0.0.1:{port}/"))
        await results.wait(1)
        await runner.aclose()
        await server.close()
        assert results.items == [(1, 0, 1, True, "http 200")]

    with tempfile.TemporaryDirectory() as tmp:
        key, cert = os.path.join(tmp, "k.pem"), os.path.join(tmp, "c.pem")
        rc = os.spawnv(
            os.P_WAIT,
            openssl,
            [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-batch",
             "-subj", "/CN=localhost", "-days", "1", "-keyout", key, "-out", cert],
        )  # fmt: skip
        if rc != 0:
            pytest.skip("openssl could not make a test certificate")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        run(loop, main(ctx))


# -- exec probes -------------------------------------------------------------


@pytest.fixture
def table(loop: asyncio.AbstractEventLoop) -> Iterator[Any]:
    if ProcessTable is None:
        pytest.skip("fastorch.process.ProcessTable is not available")
    procs = ProcessTable(loop, subreaper=False)
    yield procs
    procs.close()


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False


def test_exec_probe_reports_exit_status(
    loop: asyncio.AbstractEventLoop, table: Any
) -> None:
    async def main() -> None:
        results = Results(loop)
        runner = ProbeRunner(loop, results, table)
        runner.run(1, 0, 1, Spec("exec", ["true"]))
        runner.run(1, 0, 2, Spec("exec", [sys.executable, "-c", "raise SystemExit(3)"]))
        runner.run(1, 0, 3, Spec("exec", ["/nonexistent/check"]))
        runner.run(
            1, 0, 4, Spec("exec", ["sh", "-c", 'test "$PROBE_ENV" = here']),
            env={"PROBE_ENV": "here", "PATH": os.environ["PATH"]},
        )  # fmt: skip
        await results.wait(4)
        await runner.aclose()
        got = results.by_seq()
        assert got[1] == (True, "exit 0")
        assert got[2] == (False, "exit 3")
        assert got[3][0] is False and got[3][1].startswith("spawn:")
        assert got[4] == (True, "exit 0")
        assert runner.durations.count("exec") == 4

    run(loop, main())


def test_cancel_kills_a_hung_exec_probe_group(
    loop: asyncio.AbstractEventLoop, table: Any
) -> None:
    async def main() -> None:
        results = Results(loop)
        runner = ProbeRunner(loop, results, table)
        with tempfile.TemporaryDirectory() as tmp:
            pidfile = os.path.join(tmp, "grandchild")
            # The probe forks a grandchild that hangs too: killing the group
            # must take both.
            script = f"sleep 60 & echo $! > {pidfile}; wait"
            runner.run(1, 1, 1, Spec("exec", ["sh", "-c", script]))
            deadline = time.monotonic() + BOUND / 2
            while not _read(pidfile).strip():
                assert time.monotonic() < deadline, "probe never started"
                await asyncio.sleep(0.01)
            grandchild = int(_read(pidfile))
        (pid,) = table.pids()
        assert _alive(pid) and _alive(grandchild)
        runner.cancel(1, 1, 1)
        while table.pids() or _alive(grandchild):
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert results.items == []
        assert runner.in_flight == 0
        await runner.aclose()

    run(loop, main())


# -- notify sockets ----------------------------------------------------------


class Messages:
    def __init__(self) -> None:
        self.items: list[tuple[int, dict[str, str]]] = []
        self.event = asyncio.Event()

    def __call__(self, sid: int, fields: dict[str, str]) -> None:
        self.items.append((sid, fields))
        self.event.set()

    async def wait(self, count: int) -> None:
        while len(self.items) < count:
            self.event.clear()
            await self.event.wait()


async def _run_child(argv: list[str], env: dict[str, str]) -> int:
    proc = await asyncio.create_subprocess_exec(*argv, env=env)
    return await proc.wait()


def test_notify_from_a_python_child(loop: asyncio.AbstractEventLoop) -> None:
    code = (
        "import os, socket\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
        "s.connect(os.environ['NOTIFY_SOCKET'])\n"
        "s.send(b'READY=1\\nSTATUS=serving 3 clients\\nMAINPID=%d' % os.getpid())\n"
        "s.send(b'WATCHDOG=1')\n"
        "s.send(b'_PID=1\\njunk-without-equals')\n"
        "print(os.getpid(), flush=True)\n"
    )

    async def main(tmp: str) -> None:
        messages = Messages()
        server = NotifyServer(loop, os.path.join(tmp, "notify"), messages)
        path = server.open(5)
        assert server.open(5) == path
        assert os.path.dirname(path) == os.path.join(tmp, "notify")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, env={"NOTIFY_SOCKET": path},
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await proc.communicate()
        child = int(out)
        await messages.wait(2)
        await asyncio.sleep(0.05)  # the third datagram would show by now
        server.close_all()
        assert not os.path.exists(path)
        (sid1, first), (sid2, second) = messages.items
        assert (sid1, sid2) == (5, 5)
        assert first == {
            "READY": "1",
            "STATUS": "serving 3 clients",
            "MAINPID": str(child),
            "_PID": str(child),
            "_UID": str(os.getuid()),
        }
        assert second["WATCHDOG"] == "1" and second["_PID"] == str(child)

    with tempfile.TemporaryDirectory() as tmp:
        run(loop, main(tmp))


def test_systemd_notify_ready_works_on_a_path_socket(
    loop: asyncio.AbstractEventLoop,
) -> None:
    tool = shutil.which("systemd-notify")
    if tool is None:
        pytest.skip("systemd-notify is not installed")

    async def main(tmp: str) -> None:
        messages = Messages()
        server = NotifyServer(loop, tmp, messages)
        path = server.open(2)
        env = {"NOTIFY_SOCKET": path, "PATH": os.environ.get("PATH", "")}
        rc = await _run_child([tool, "--ready", "--status=up"], env)
        assert rc == 0
        await messages.wait(1)
        server.close(2)
        server.close(2)  # twice is harmless
        fields = messages.items[0][1]
        assert fields["READY"] == "1" and fields["STATUS"] == "up"
        assert int(fields["_PID"]) > 0

    with tempfile.TemporaryDirectory() as tmp:
        run(loop, main(tmp))


def test_notify_fds_sent_along_are_closed(loop: asyncio.AbstractEventLoop) -> None:
    async def main(tmp: str) -> None:
        messages = Messages()
        server = NotifyServer(loop, tmp, messages)
        path = server.open(1)
        before = len(os.listdir("/proc/self/fd"))
        r, w = os.pipe()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(path)
            socket.send_fds(s, [b"FDSTORE=1"], [r, w])
        os.close(r)
        os.close(w)
        await messages.wait(1)
        assert messages.items[0][1]["FDSTORE"] == "1"
        assert len(os.listdir("/proc/self/fd")) == before
        server.close_all()

    with tempfile.TemporaryDirectory() as tmp:
        run(loop, main(tmp))


def test_handler_errors_do_not_stop_the_runner(
    loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []

    def on_result(sid: int, probe: int, seq: int, ok: bool, detail: str) -> None:
        calls.append(seq)
        raise RuntimeError("handler bug")

    async def main() -> None:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        runner = ProbeRunner(loop, on_result, None)
        spec = Spec("tcp", f"127.0.0.1:{listener.getsockname()[1]}")
        runner.run(1, 0, 1, spec)
        runner.run(1, 0, 2, spec)
        deadline = time.monotonic() + BOUND / 2
        while len(calls) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await runner.aclose()
        listener.close()

    run(loop, main())
    assert sorted(calls) == [1, 2]
    assert "result handler failed" in caplog.text
