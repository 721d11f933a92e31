"""Health probes (http, tcp, exec) and the per-service notify sockets.

The engine decides when a probe runs and what its result means; this module
only carries a run out and reports ``ok`` or not. A tcp or http probe is a
non-blocking socket driven by ``add_writer``/``add_reader`` callbacks on the
loop: no task, future or stream per run (docs/health.md has the numbers
behind that choice). An exec probe is a child started through the
supervisor's process table, so the supervisor stays the only reaper.
"""

from __future__ import annotations

import _socket
import asyncio
import bisect
import errno
import ipaddress
import logging
import os
import signal
import socket
import ssl
import struct
import subprocess
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

__all__ = ["NotifyServer", "ProbeDurations", "ProbeRunner"]

logger = logging.getLogger(__name__)

ResultCallback = Callable[[int, int, int, bool, str], None]

# The largest response we read: the status line decides the result, the
# rest is read only so the server is not answered with a reset.
_MAX_RESPONSE = 64 * 1024

# Probe sockets are the C type itself: the ``socket.socket`` subclass adds
# Python-level __init__ and close() calls per probe and nothing needed here.
_STREAM_FLAGS = socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC

# struct linger {l_onoff = 1, l_linger = 0}: close() resets the connection.
_LINGER_RESET = struct.pack("ii", 1, 0)

# A resolved host name is reused this long (seconds) before asking again.
_RESOLVE_TTL = 30.0

# Notify datagrams are at most PIPE_BUF (systemd's NOTIFY_BUFFER_MAX).
_NOTIFY_MAX = 4096

# Datagrams drained per wake-up of one notify socket, so that one chatty
# child cannot starve the loop.
_NOTIFY_BURST = 64


class Spawner(Protocol):
    """What exec probes need of ``fastorch.process.ProcessTable``."""

    def spawn(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None,
        cwd: str | None,
        stdin: int | None,
        stdout: int | None,
        stderr: int | None,
        on_exit: Callable[[int, int], None],
    ) -> int: ...

    def signal_group(self, pid: int, signo: int) -> object: ...


class ProbeDurations:
    """Probe run durations in seconds, as a histogram per probe kind.

    There is deliberately no per-service label: 1000 services times the
    bucket count would dominate a scrape. ``buckets(kind)`` returns the
    cumulative pairs prometheus-client's ``HistogramMetricFamily.add_metric``
    takes.
    """

    BOUNDS = (
        0.0005,
        0.001,
        0.0025,
        0.005,
        0.01,
        0.025,
        0.05,
        0.1,
        0.25,
        0.5,
        1.0,
        2.5,
        5.0,
        10.0,
    )
    KINDS = ("http", "tcp", "exec")

    def __init__(self) -> None:
        n = len(self.BOUNDS) + 1
        self._counts = {kind: [0] * n for kind in self.KINDS}
        self._sums = dict.fromkeys(self.KINDS, 0.0)
        self._failures = dict.fromkeys(self.KINDS, 0)

    def observe(self, kind: str, seconds: float, ok: bool = True) -> None:
        """Count one finished run of a ``kind`` probe."""
        self._counts[kind][bisect.bisect_left(self.BOUNDS, seconds)] += 1
        self._sums[kind] += seconds
        if not ok:
            self._failures[kind] += 1

    def buckets(self, kind: str) -> list[tuple[str, float]]:
        """Cumulative ``(upper bound, count)`` pairs, the last one ``+Inf``."""
        out = []
        total = 0
        for bound, count in zip(
            (*map(repr, self.BOUNDS), "+Inf"), self._counts[kind], strict=True
        ):
            total += count
            out.append((bound, float(total)))
        return out

    def sum(self, kind: str) -> float:
        """Total seconds spent in ``kind`` probes."""
        return self._sums[kind]

    def count(self, kind: str) -> int:
        """Number of finished ``kind`` probe runs."""
        return sum(self._counts[kind])

    def failures(self, kind: str) -> int:
        """Number of finished ``kind`` probe runs that failed."""
        return self._failures[kind]


class _Target:
    """A probe spec parsed once: kind, address and the request bytes."""

    __slots__ = (
        "kind",
        "host",
        "port",
        "addr",
        "family",
        "request",
        "is_tls",
        "status_min",
        "status_max",
        "argv",
        "error",
    )

    def __init__(self, spec: Any) -> None:
        self.kind: str = spec.kind
        self.host = ""
        self.port = 0
        self.addr: tuple[Any, ...] | None = None
        self.family = socket.AF_INET
        self.request = b""
        self.is_tls = False
        self.status_min = int(getattr(spec, "status_min", 200) or 200)
        self.status_max = int(getattr(spec, "status_max", 399) or 399)
        self.argv: list[str] = []
        self.error = ""
        try:
            if self.kind == "http":
                self._parse_url(spec.target, getattr(spec, "headers", None) or {})
            elif self.kind == "tcp":
                self._parse_hostport(spec.target)
            elif self.kind == "exec":
                self.argv = [str(a) for a in spec.target]
                if not self.argv:
                    self.error = "empty command"
            else:
                self.error = f"unknown probe kind {self.kind!r}"
        except (ValueError, TypeError) as exc:
            self.error = f"bad target {spec.target!r}: {exc}"

    def _parse_hostport(self, target: str) -> None:
        host, sep, port = str(target).rpartition(":")
        if not sep or not host:
            raise ValueError("expected host:port")
        self._set_host(host.strip("[]"), int(port))

    def _parse_url(self, url: str, headers: Mapping[str, str]) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("expected an http:// or https:// url")
        self.is_tls = parts.scheme == "https"
        self._set_host(parts.hostname, parts.port or (443 if self.is_tls else 80))
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        host_header = parts.netloc.rpartition("@")[2]
        lines = [f"GET {path} HTTP/1.1"]
        names = {name.lower() for name in headers}
        if "host" not in names:
            lines.append(f"Host: {host_header}")
        if "user-agent" not in names:
            lines.append("User-Agent: fastorch-probe")
        if "accept" not in names:
            lines.append("Accept: */*")
        lines.extend(f"{name}: {value}" for name, value in headers.items())
        # The connection is closed after one answer: no keep-alive to manage.
        lines.append("Connection: close")
        self.request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _set_host(self, host: str, port: int) -> None:
        if not 0 < port < 65536:
            raise ValueError(f"port {port} out of range")
        self.host = host
        self.port = port
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return  # a name: resolved on the loop at run time
        if ip.version == 6:
            self.family = socket.AF_INET6
            self.addr = (host, port, 0, 0)
        else:
            self.addr = (host, port)


class _Run:
    """One probe run; the subclasses drive it with loop callbacks."""

    __slots__ = ("runner", "key", "target", "started", "is_done")

    def __init__(self, runner: ProbeRunner, key: tuple[int, int, int], target: _Target):
        self.runner = runner
        self.key = key
        self.target = target
        self.started = 0.0
        self.is_done = False

    def start(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        """Stop the run without a result; idempotent."""
        raise NotImplementedError

    def finish(self, ok: bool, detail: str) -> None:
        if self.is_done:
            return
        self.abort()
        self.is_done = True
        self.runner._finished(self, ok, detail)


class _SocketRun(_Run):
    """A tcp connect, and for http one GET on that connection."""

    __slots__ = ("sock", "fd", "buf", "resolving", "polling")

    def __init__(self, runner: ProbeRunner, key: tuple[int, int, int], target: _Target):
        super().__init__(runner, key, target)
        self.sock: _socket.socket | None = None
        self.fd = -1
        self.buf = b""
        self.resolving: asyncio.Future[Any] | None = None
        self.polling = False  # the fd is registered with the loop

    def start(self) -> None:
        target = self.target
        if target.addr is not None:
            self._connect(target.family, target.addr)
            return
        cached = self.runner._resolved.get((target.host, target.port))
        if cached is not None and cached[0] > time.monotonic():
            self._connect(cached[1], cached[2])
            return
        self.resolving = asyncio.ensure_future(
            self.runner._loop.getaddrinfo(
                target.host, target.port, type=socket.SOCK_STREAM
            ),
            loop=self.runner._loop,
        )
        self.resolving.add_done_callback(self._on_resolved)

    def _on_resolved(self, fut: asyncio.Future[Any]) -> None:
        self.resolving = None
        if self.is_done or fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None or not fut.result():
            self.finish(False, f"resolve {self.target.host}: {exc}")
            return
        family, _, _, _, addr = fut.result()[0]
        self.runner._resolved[(self.target.host, self.target.port)] = (
            time.monotonic() + _RESOLVE_TTL,
            family,
            addr,
        )
        self._connect(family, addr)

    def _connect(self, family: int, addr: tuple[Any, ...]) -> None:
        try:
            sock = _socket.socket(family, _STREAM_FLAGS)
        except OSError as exc:
            self.finish(False, f"socket: {exc.strerror}")
            return
        self.sock = sock
        self.fd = sock.fileno()
        err = sock.connect_ex(addr)
        if err == errno.EINPROGRESS:
            # On loopback the kernel has done the whole handshake by the
            # time connect() returns (the SYN-ACK waits in the socket's
            # backlog until connect releases the socket lock). Asking again
            # tells at once: 0 once connected, the error once refused,
            # EALREADY only while a remote peer is still answering. This
            # saves a poll handle, two epoll_ctl calls and a loop wake-up.
            err = sock.connect_ex(addr)
            if err == errno.EALREADY:
                self.polling = True
                self.runner._loop.add_writer(self.fd, self._on_writable)
                return
        if err and err != errno.EISCONN:
            self.finish(False, f"connect: {os.strerror(err)}")
            return
        self._on_connected()

    def _on_writable(self) -> None:
        assert self.sock is not None
        self.runner._loop.remove_writer(self.fd)
        self.polling = False
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.finish(False, f"connect: {os.strerror(err)}")
            return
        self._on_connected()

    def _on_connected(self) -> None:
        sock = self.sock
        assert sock is not None
        if self.target.kind == "tcp":
            # The probe's answer is the handshake; nothing is sent. A reset
            # instead of a FIN spares both sides the close handshake, and
            # this side a TIME_WAIT socket per probe (60 s each: 60,000 of
            # them at 1000 probes a second).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            self.finish(True, "connected")
            return
        try:
            # A request is a few hundred bytes: a fresh socket's send buffer
            # takes it whole.
            sent = sock.send(self.target.request)
        except OSError as exc:
            self.finish(False, f"send: {exc.strerror}")
            return
        if sent != len(self.target.request):
            self.finish(False, "send: short write")
            return
        self.polling = True
        self.runner._loop.add_reader(self.fd, self._on_readable)

    def _on_readable(self) -> None:
        assert self.sock is not None
        try:
            data = self.sock.recv(_MAX_RESPONSE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._answer(eof=True, error=exc.strerror or str(exc))
            return
        if not data:
            self._answer(eof=True)
            return
        self.buf += data
        self._answer(eof=False)

    def _answer(self, eof: bool, error: str = "") -> None:
        """Finish once the response is complete (or cannot be)."""
        buf = self.buf
        head_end = buf.find(b"\r\n\r\n")
        if head_end < 0 and not eof and len(buf) < _MAX_RESPONSE:
            return
        line_end = buf.find(b"\r\n")
        status_line = buf[: line_end if line_end >= 0 else len(buf)]
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
            self.finish(False, f"bad response: {error or status_line[:80]!r}")
            return
        try:
            status = int(parts[1])
        except ValueError:
            self.finish(False, f"bad status line: {status_line[:80]!r}")
            return
        if not eof and not self._body_complete(buf, head_end, status):
            return
        target = self.target
        ok = target.status_min <= status <= target.status_max
        self.finish(ok, f"http {status}")

    @staticmethod
    def _body_complete(buf: bytes, head_end: int, status: int) -> bool:
        if len(buf) >= _MAX_RESPONSE or status in (204, 304) or status < 200:
            return True
        head = buf[:head_end].lower()
        body = len(buf) - head_end - 4
        at = head.find(b"\r\ncontent-length:")
        if at >= 0:
            end = head.find(b"\r\n", at + 2)
            value = head[at + 17 : end if end >= 0 else len(head)]
            try:
                return body >= int(value)
            except ValueError:
                return True
        if b"\r\ntransfer-encoding: chunked" in head:
            return buf.endswith(b"0\r\n\r\n")
        return False  # read until the server closes

    def abort(self) -> None:
        if self.resolving is not None:
            self.resolving.cancel()
            self.resolving = None
        if self.sock is not None:
            if self.polling:
                loop = self.runner._loop
                loop.remove_writer(self.fd)
                loop.remove_reader(self.fd)
                self.polling = False
            self.sock.close()
            self.sock = None


class _TlsRun(_Run):
    """An https GET through asyncio streams (rarer; a task per run)."""

    __slots__ = ("task",)

    def __init__(self, runner: ProbeRunner, key: tuple[int, int, int], target: _Target):
        super().__init__(runner, key, target)
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = self.runner._loop.create_task(self._get())

    async def _get(self) -> None:
        target = self.target
        try:
            reader, writer = await asyncio.open_connection(
                target.host, target.port, ssl=self.runner._tls_context()
            )
        except (OSError, ssl.SSLError) as exc:
            self.finish(False, f"connect: {exc}")
            return
        try:
            writer.write(target.request)
            head = await reader.readuntil(b"\r\n\r\n")
            parts = head.split(None, 2)
            status = int(parts[1])
            ok = target.status_min <= status <= target.status_max
            self.finish(ok, f"http {status}")
        except (OSError, ssl.SSLError, ValueError, IndexError) as exc:
            self.finish(False, f"bad response: {exc}")
        except asyncio.IncompleteReadError:
            self.finish(False, "bad response: connection closed")
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, ssl.SSLError):
                pass

    def abort(self) -> None:
        task = self.task
        self.task = None
        if task is not None and task is not asyncio.current_task(self.runner._loop):
            task.cancel()


class _ExecRun(_Run):
    """A command run through the process table; exit status 0 is healthy."""

    __slots__ = ("pid", "env", "cwd")

    def __init__(
        self,
        runner: ProbeRunner,
        key: tuple[int, int, int],
        target: _Target,
        env: dict[str, str] | None,
        cwd: str | None,
    ):
        super().__init__(runner, key, target)
        self.pid = 0
        self.env = env
        self.cwd = cwd

    def start(self) -> None:
        spawner = self.runner._spawner
        assert spawner is not None  # run() checked
        devnull = subprocess.DEVNULL  # the process table opens it in the child
        try:
            self.pid = spawner.spawn(
                self.target.argv,
                env=self.env,
                cwd=self.cwd,
                stdin=devnull,
                stdout=devnull,
                stderr=devnull,
                on_exit=self._on_exit,
            )
        except OSError as exc:
            self.finish(False, f"spawn: {exc}")

    def _on_exit(self, pid: int, status: int) -> None:
        self.pid = 0
        if status == 0:
            self.finish(True, "exit 0")
        elif status > 0:
            self.finish(False, f"exit {status}")
        else:
            self.finish(False, f"killed by {_signal_name(-status)}")

    def abort(self) -> None:
        if self.pid:
            pid = self.pid
            self.pid = 0
            spawner = self.runner._spawner
            assert spawner is not None
            try:
                spawner.signal_group(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _signal_name(signo: int) -> str:
    try:
        return signal.Signals(signo).name
    except ValueError:
        return f"signal {signo}"


class ProbeRunner:
    """Runs http, tcp and exec probes for the supervisor.

    Args:
        loop: the supervisor's event loop; every callback runs on it.
        on_result: called as ``on_result(sid, probe, seq, ok, detail)``
            once per run, unless the run was cancelled first.
        spawner: the process table exec probes are started through.
        max_concurrency: runs in flight at most; later ones wait in a FIFO
            queue (the engine's timeout still counts while they wait).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_result: ResultCallback,
        spawner: Spawner | None,
        *,
        max_concurrency: int = 256,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, not {max_concurrency}")
        self._loop = loop
        self._on_result = on_result
        self._spawner = spawner
        self._max_concurrency = max_concurrency
        self._runs: dict[tuple[int, int, int], _Run] = {}
        self._queue: deque[_Run] = deque()
        self._active = 0
        self._targets: dict[int, tuple[Any, _Target]] = {}
        self._resolved: dict[tuple[str, int], tuple[float, int, Any]] = {}
        self._tls: ssl.SSLContext | None = None
        # Results reached inside run() or cancel(), reported by one loop
        # callback per turn (not one per result); cancel() pops its own.
        self._deferred: dict[tuple[int, int, int], tuple[bool, str]] = {}
        self._flush: asyncio.Handle | None = None
        self._starting: _Run | None = None
        self._is_closed = False
        self.durations = ProbeDurations()

    @property
    def in_flight(self) -> int:
        """Runs started and not finished."""
        return self._active

    @property
    def queued(self) -> int:
        """Runs waiting for a free slot."""
        return len(self._runs) - self._active

    def run(
        self,
        sid: int,
        probe: int,
        seq: int,
        spec: Any,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> None:
        """Start one run of ``spec``; returns at once.

        ``on_result(sid, probe, seq, ok, detail)`` follows on the loop, never
        from inside this call.
        """
        if self._is_closed:
            raise RuntimeError("probe runner is closed")
        key = (sid, probe, seq)
        if key in self._runs or key in self._deferred:
            return  # the engine never repeats a seq; a duplicate is dropped
        target = self._target(spec)
        if target.error:
            self._defer(key, False, target.error)
            return
        run: _Run
        if target.kind == "exec":
            if self._spawner is None:
                self._defer(key, False, "no process table")
                return
            run = _ExecRun(self, key, target, env, cwd)
        elif target.is_tls:
            run = _TlsRun(self, key, target)
        else:
            run = _SocketRun(self, key, target)
        self._runs[key] = run
        if self._active < self._max_concurrency:
            self._begin(run)
        else:
            self._queue.append(run)

    def cancel(self, sid: int, probe: int, seq: int) -> None:
        """Abandon a run: close its socket or SIGKILL its process group."""
        key = (sid, probe, seq)
        if self._deferred.pop(key, None) is not None:
            return
        run = self._runs.pop(key, None)
        if run is None:
            return
        was_started = run.started != 0.0
        run.is_done = True
        if was_started:
            run.abort()
            self._release_slot()
        # A queued run stays in the deque; _release_slot skips finished ones.

    async def aclose(self) -> None:
        """Abandon every run; no result is reported after this."""
        self._is_closed = True
        runs = list(self._runs.values())
        self._runs.clear()
        self._queue.clear()
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        self._deferred.clear()
        tasks = []
        for run in runs:
            if isinstance(run, _TlsRun) and run.task is not None:
                tasks.append(run.task)
            run.is_done = True
            if run.started:
                run.abort()
        self._active = 0
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- internals -------------------------------------------------------

    def _target(self, spec: Any) -> _Target:
        # Parsing a url costs more than a probe's own syscalls; the spec
        # objects live as long as the config, so cache by identity.
        entry = self._targets.get(id(spec))
        if entry is not None and entry[0] is spec:
            return entry[1]
        target = _Target(spec)
        self._targets[id(spec)] = (spec, target)
        if len(self._targets) > 65536:
            self._targets.clear()  # a long run of reloads: start over
        return target

    def _begin(self, run: _Run) -> None:
        self._active += 1
        run.started = self._loop.time()
        self._starting = run
        try:
            run.start()
        except Exception as exc:  # a broken probe must not break the loop
            logger.exception(
                "probe %d of service %d: cannot start", run.key[1], run.key[0]
            )
            run.finish(False, f"internal error: {exc}")
        finally:
            self._starting = None

    def _finished(self, run: _Run, ok: bool, detail: str) -> None:
        if self._runs.get(run.key) is not run:
            return  # cancelled meanwhile
        del self._runs[run.key]
        self.durations.observe(run.target.kind, self._loop.time() - run.started, ok)
        self._release_slot()
        if self._starting is run:
            # Failed inside run() or cancel() (which starts queued runs):
            # the caller is still handling actions, so report on the next
            # loop turn; cancel() can still withdraw it until then.
            self._defer(run.key, ok, detail)
        else:
            self._report(run.key, ok, detail)

    def _defer(self, key: tuple[int, int, int], ok: bool, detail: str) -> None:
        self._deferred[key] = (ok, detail)
        if self._flush is None:
            self._flush = self._loop.call_soon(self._report_deferred)

    def _report_deferred(self) -> None:
        self._flush = None
        deferred = self._deferred
        # Only those deferred so far: a handler that starts runs defers
        # theirs to the next turn, and one that cancels a run still waiting
        # here withdraws its result.
        for key in list(deferred):
            entry = deferred.pop(key, None)
            if entry is not None:
                self._report(key, entry[0], entry[1])

    def _report(self, key: tuple[int, int, int], ok: bool, detail: str) -> None:
        sid, probe, seq = key
        try:
            self._on_result(sid, probe, seq, ok, detail)
        except Exception:
            logger.exception(
                "probe %d of service %d: result handler failed", probe, sid
            )

    def _release_slot(self) -> None:
        self._active -= 1
        queue = self._queue
        while queue and self._active < self._max_concurrency:
            run = queue.popleft()
            if not run.is_done:
                self._begin(run)

    def _tls_context(self) -> ssl.SSLContext:
        # Like kubelet, an https probe checks that the service answers, not
        # who it is: no certificate verification.
        if self._tls is None:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            self._tls = ctx
        return self._tls


_CREDS = struct.Struct("3i")  # struct ucred: pid, uid, gid


class NotifyServer:
    """One ``NOTIFY_SOCKET`` per service: sd_notify datagrams to the engine.

    Each service gets an ``AF_UNIX``/``SOCK_DGRAM`` socket at
    ``<directory>/<sid>.sock``, read with ``loop.add_reader``. A datagram is
    newline-separated ``KEY=VALUE`` lines; ``on_message(sid, fields)`` gets
    them as a dict. With ``SO_PASSCRED`` the kernel adds the sender's
    credentials, passed on as ``fields["_PID"]`` and ``fields["_UID"]``
    (underscore keys cannot come from the sender: such lines are dropped).
    File descriptors sent along (``FDSTORE=1``) are closed: fastorch keeps
    no fd store.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        directory: str,
        on_message: Callable[[int, dict[str, str]], None],
    ) -> None:
        self._loop = loop
        self._directory = directory
        self._on_message = on_message
        self._socks: dict[int, tuple[socket.socket, str]] = {}
        self._ancbufsize = socket.CMSG_SPACE(_CREDS.size) + socket.CMSG_SPACE(16 * 4)

    def open(self, sid: int) -> str:
        """Bind the service's socket (once) and return its path."""
        entry = self._socks.get(sid)
        if entry is not None:
            return entry[1]
        os.makedirs(self._directory, mode=0o755, exist_ok=True)
        path = os.path.join(self._directory, f"{sid}.sock")
        sock = socket.socket(
            socket.AF_UNIX,
            socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
        )
        try:
            try:
                os.unlink(path)  # left over by an earlier fastorch
            except FileNotFoundError:
                pass
            sock.bind(path)
            # A child may run as another user; the directory's mode is what
            # keeps strangers out.
            os.chmod(path, 0o666)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        except OSError:
            sock.close()
            raise
        self._socks[sid] = (sock, path)
        self._loop.add_reader(sock.fileno(), self._on_readable, sid, sock)
        return path

    def close(self, sid: int) -> None:
        """Close and unlink the service's socket, if it has one."""
        entry = self._socks.pop(sid, None)
        if entry is None:
            return
        sock, path = entry
        self._loop.remove_reader(sock.fileno())
        sock.close()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def close_all(self) -> None:
        """Close every socket."""
        for sid in list(self._socks):
            self.close(sid)

    def _on_readable(self, sid: int, sock: socket.socket) -> None:
        for _ in range(_NOTIFY_BURST):
            try:
                data, ancdata, _flags, _addr = sock.recvmsg(
                    _NOTIFY_MAX, self._ancbufsize, socket.MSG_CMSG_CLOEXEC
                )
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                logger.warning(
                    "service %d: notify socket read failed", sid, exc_info=True
                )
                return
            fields = self._parse(data, ancdata)
            if not fields:
                continue
            try:
                self._on_message(sid, fields)
            except Exception:
                logger.exception("service %d: notify handler failed", sid)

    @staticmethod
    def _parse(data: bytes, ancdata: list[tuple[int, int, bytes]]) -> dict[str, str]:
        fields: dict[str, str] = {}
        for line in data.decode("utf-8", "replace").split("\n"):
            key, sep, value = line.partition("=")
            if sep and key and not key.startswith("_"):
                fields[key] = value
        for level, kind, payload in ancdata:
            if level != socket.SOL_SOCKET:
                continue
            if kind == socket.SCM_CREDENTIALS and len(payload) >= _CREDS.size:
                pid, uid, _gid = _CREDS.unpack_from(payload)
                fields["_PID"] = str(pid)
                fields["_UID"] = str(uid)
            elif kind == socket.SCM_RIGHTS:
                fds = memoryview(payload)[: len(payload) - len(payload) % 4].cast("i")
                for fd in fds:
                    os.close(fd)
        # A datagram of credentials alone (or only junk) says nothing.
        return fields if any(key[0] != "_" for key in fields) else {}
