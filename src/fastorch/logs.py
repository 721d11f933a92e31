"""Where a child's stdout and stderr go: journal, rotated files, inherit, null.

- ``journal``: fastorch connects to journald's stream socket, writes the
  stream header itself (what ``sd_journal_stream_fd(3)`` does) and hands the
  socket to the child as its stdout/stderr: no byte passes through fastorch.
- ``file``: one pipe per stream, read on the loop in large chunks, cut at
  the last newline and appended to ``<dir>/<name>.log`` with one ``write``
  per chunk of whole lines; size-based rotation to ``.1`` .. ``.<keep>``.
  The last ``tail_lines`` lines stay in memory for the API.
- ``inherit``: the child writes where fastorch writes. ``null``: /dev/null.

The descriptors of a service stay open across its restarts, until
:meth:`LogManager.release`. docs/logs.md has the details and measurements.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import select
import socket
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["LogManager"]

logger = logging.getLogger(__name__)

# journald reads these priorities from the stream header (syslog levels).
_PRIORITY_STDOUT = 6  # info
_PRIORITY_STDERR = 3  # err

# Pipe capacity asked for (fcntl F_SETPIPE_SZ): fewer wake-ups for a fast
# writer. Linux caps it at /proc/sys/fs/pipe-max-size (1 MiB by default)
# for an unprivileged process.
_PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

# One read takes at most this much; a wake-up reads at most _READS_PER_WAKE
# times, so one noisy child cannot hold the loop for long.
_READ_SIZE = 1 << 20
_READS_PER_WAKE = 8

# A line longer than this is cut (a newline is added), which bounds the
# memory a child can make fastorch hold. journald's limit is 48 KiB.
_LINE_MAX = 64 * 1024

# What journald gets for its send buffer (sd_journal_stream_fd asks 8 MiB;
# the kernel caps SO_SNDBUF at net.core.wmem_max unless we may force it).
_JOURNAL_SNDBUF = 8 << 20

_DESTINATIONS = ("journal", "file", "inherit", "null")


class _Tail:
    """The last lines of one service's output, and who follows them."""

    __slots__ = ("lines", "listeners")

    def __init__(self, maxlen: int) -> None:
        self.lines: deque[bytes] = deque(maxlen=maxlen)
        self.listeners: list[Callable[[str], None]] = []

    def resize(self, maxlen: int) -> None:
        if self.lines.maxlen != maxlen:
            self.lines = deque(self.lines, maxlen=maxlen)

    def add(self, whole: bytes) -> None:
        """Take a chunk of whole lines (ending in a newline)."""
        lines = self.lines
        n = lines.maxlen or 0
        if n:
            # Only the last n lines of a big chunk can survive: find where
            # they start rather than splitting the whole chunk.
            pos = len(whole) - 1
            for _ in range(n):
                pos = whole.rfind(b"\n", 0, pos)
                if pos < 0:
                    break
            lines.extend(whole[pos + 1 : -1].split(b"\n"))
        if self.listeners:
            text = whole[:-1].decode("utf-8", "replace").split("\n")
            for callback in list(self.listeners):
                for line in text:
                    try:
                        callback(line)
                    except Exception:
                        logger.exception("log listener failed")
                        self.listeners.remove(callback)
                        break


class _LogFile:
    """``<dir>/<name>.log`` with size-based rotation; whole lines only."""

    __slots__ = ("path", "max_size", "keep", "fd", "size", "error")

    def __init__(self, path: str, max_size: int, keep: int) -> None:
        self.path = path
        self.max_size = max_size
        self.keep = keep
        self.fd = -1
        self.size = 0
        self.error = 0
        self._open()

    def _open(self) -> None:
        self.fd = os.open(
            self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640
        )
        self.size = os.fstat(self.fd).st_size

    def write(self, whole: bytes) -> None:
        """Append a chunk of whole lines, rotating between lines as needed."""
        limit = self.max_size
        if limit <= 0 or self.size + len(whole) <= limit:
            self._write(whole)
            return
        view = memoryview(whole)
        start = 0
        end = len(whole)
        while start < end:
            room = limit - self.size
            if end - start <= room:
                self._write(view[start:end])
                break
            # The last newline that still fits decides the cut.
            cut = whole.rfind(b"\n", start, start + max(room, 0))
            if cut >= 0:
                self._write(view[start : cut + 1])
                start = cut + 1
            elif self.size == 0:
                # One line longer than max_size: it gets a file to itself.
                cut = whole.index(b"\n", start)
                self._write(view[start : cut + 1])
                start = cut + 1
            self._rotate()

    def _write(self, data: bytes | memoryview) -> None:
        try:
            while data:
                n = os.write(self.fd, data)
                self.size += n
                data = data[n:]
            self.error = 0
        except OSError as exc:
            # A full disk must not stop the child: the chunk is dropped and
            # the failure logged once until a write succeeds again.
            if exc.errno != self.error:
                logger.warning("cannot write %s: %s", self.path, exc.strerror)
            self.error = exc.errno or -1

    def _rotate(self) -> None:
        os.close(self.fd)
        self.fd = -1
        try:
            if self.keep <= 0:
                os.unlink(self.path)
            else:
                for i in range(self.keep - 1, 0, -1):
                    try:
                        os.rename(f"{self.path}.{i}", f"{self.path}.{i + 1}")
                    except FileNotFoundError:
                        pass
                os.rename(self.path, f"{self.path}.1")
        except OSError as exc:
            logger.warning("cannot rotate %s: %s", self.path, exc.strerror)
        self._open()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Pipe:
    """One stream of a service in file mode: the pipe and its partial line."""

    __slots__ = ("read_fd", "write_fd", "partial")

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self.read_fd, False)
        try:
            fcntl.fcntl(self.write_fd, _F_SETPIPE_SZ, _PIPE_SIZE)
        except OSError:
            pass  # over pipe-max-size or the user's pipe quota: keep 64 KiB
        self.partial = b""


class _Sink:
    """What one service's output is connected to."""

    __slots__ = ("name", "destination", "fds", "socks", "pipes", "file", "tail")

    def __init__(self, name: str, destination: str) -> None:
        self.name = name
        self.destination = destination
        self.fds: tuple[int | None, int | None] = (None, None)
        self.socks: list[socket.socket] = []
        self.pipes: list[_Pipe] = []
        self.file: _LogFile | None = None
        self.tail: _Tail | None = None

    def is_stale(self) -> bool:
        """True when journald hung up on a stream (it was restarted)."""
        if not self.socks:
            return False
        poller = select.poll()
        for sock in self.socks:
            poller.register(sock, select.POLLOUT)
        return any(ev & (select.POLLHUP | select.POLLERR) for _, ev in poller.poll(0))


class LogManager:
    """Connects each service's stdout/stderr to its log destination.

    Args:
        loop: the supervisor's event loop; pipes are read on it.
        journal_socket: journald's stdout stream socket.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        journal_socket: str = "/run/systemd/journal/stdout",
    ) -> None:
        self._loop = loop
        self._journal_socket = journal_socket
        self._sinks: dict[int, _Sink] = {}
        self._draining: list[_Sink] = []
        self._tails: dict[str, _Tail] = {}
        self._devnull = -1
        self._journal_warned = False
        self._is_closed = False

    def open(self, sid: int, name: str, cfg: Any) -> tuple[int | None, int | None]:
        """The fds to give the child as stdout and stderr (None: inherit).

        They stay open, and are returned again, across restarts of the
        service until :meth:`release`; a changed destination or name
        replaces them.
        """
        if self._is_closed:
            raise RuntimeError("log manager is closed")
        destination = getattr(cfg, "destination", "inherit") or "inherit"
        if destination not in _DESTINATIONS:
            raise ValueError(
                f"service {name!r}: unknown log destination {destination!r}"
            )
        sink = self._sinks.get(sid)
        if sink is not None:
            if sink.name == name and destination in (sink.destination, "journal"):
                if not sink.is_stale():
                    if sink.tail is not None:
                        sink.tail.resize(int(getattr(cfg, "tail_lines", 0) or 0))
                    return sink.fds
            self.release(sid)
        sink = self._connect(name, destination, cfg)
        self._sinks[sid] = sink
        return sink.fds

    def release(self, sid: int) -> None:
        """Close what the service's output went to; the tail stays readable.

        In file mode, what is still in the pipes (or written by a process
        that outlived the service) is read until the pipe's end.
        """
        sink = self._sinks.pop(sid, None)
        if sink is None:
            return
        for sock in sink.socks:
            sock.close()
        sink.socks.clear()
        if sink.pipes:
            for pipe in sink.pipes:
                if pipe.write_fd >= 0:
                    os.close(pipe.write_fd)
                    pipe.write_fd = -1
            self._draining.append(sink)

    def destination(self, name: str) -> str | None:
        """Where *name*'s output goes now (after any fallback), or None."""
        for sink in self._sinks.values():
            if sink.name == name:
                return sink.destination
        return None

    def tail(self, name: str, n: int) -> list[str]:
        """The last *n* lines the service wrote (file mode only)."""
        tail = self._tails.get(name)
        if tail is None or n <= 0:
            return []
        lines = tail.lines
        start = max(0, len(lines) - n)
        return [lines[i].decode("utf-8", "replace") for i in range(start, len(lines))]

    def listen(self, name: str, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call *callback* with each new line of *name*; returns the undo."""
        tail = self._tails.get(name)
        if tail is None:
            tail = self._tails[name] = _Tail(0)
        tail.listeners.append(callback)

        def unlisten() -> None:
            try:
                tail.listeners.remove(callback)
            except ValueError:
                pass

        return unlisten

    async def aclose(self) -> None:
        """Release every service, flush what is buffered, close everything."""
        self._is_closed = True
        for sid in list(self._sinks):
            self.release(sid)
        for sink in self._draining:
            for pipe in sink.pipes:
                if pipe.read_fd >= 0:
                    self._on_readable(sink, pipe)
                self._close_pipe(sink, pipe, flush=True)
        self._draining.clear()
        if self._devnull >= 0:
            os.close(self._devnull)
            self._devnull = -1

    # -- destinations ----------------------------------------------------

    def _connect(self, name: str, destination: str, cfg: Any) -> _Sink:
        if destination == "journal":
            sink = self._open_journal(name)
            if sink is not None:
                return sink
            directory = getattr(cfg, "dir", None)
            fallback = "file" if _is_writable_dir(directory) else "inherit"
            if not self._journal_warned:
                self._journal_warned = True
                logger.warning(
                    "journald is unreachable at %s: service output goes to %s",
                    self._journal_socket,
                    f"files in {directory}" if fallback == "file" else "fastorch's own",
                )
            else:
                logger.debug("service %s: journal unreachable, %s", name, fallback)
            destination = fallback
        sink = _Sink(name, destination)
        if destination == "null":
            if self._devnull < 0:
                self._devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            sink.fds = (self._devnull, self._devnull)
        elif destination == "file":
            self._open_file(sink, cfg)
        return sink

    def _open_journal(self, name: str) -> _Sink | None:
        sink = _Sink(name, "journal")
        for priority in (_PRIORITY_STDOUT, _PRIORITY_STDERR):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                # A stuck journald must not stall the loop: bounded connect.
                sock.settimeout(1.0)
                sock.connect(self._journal_socket)
                sock.setblocking(True)
                sock.shutdown(socket.SHUT_RD)
                _grow_sndbuf(sock)
                # The stream header of systemd's stdout protocol: identifier,
                # unit id (empty: only PID 1 may set it), priority,
                # level_prefix, forward to syslog, kmsg, console.
                sock.sendall(f"{name}\n\n{priority}\n0\n0\n0\n0\n".encode())
            except OSError as exc:
                sock.close()
                for other in sink.socks:
                    other.close()
                logger.debug("journal stream for %s: %s", name, exc)
                return None
            sink.socks.append(sock)
        sink.fds = (sink.socks[0].fileno(), sink.socks[1].fileno())
        return sink

    def _open_file(self, sink: _Sink, cfg: Any) -> None:
        directory = getattr(cfg, "dir", None)
        if not directory:
            raise ValueError(f"service {sink.name!r}: file logs need a dir")
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"{sink.name}.log")
        sink.file = _LogFile(
            path,
            int(getattr(cfg, "max_size", 0) or 0),
            int(getattr(cfg, "keep", 0) or 0),
        )
        tail_lines = int(getattr(cfg, "tail_lines", 0) or 0)
        tail = self._tails.get(sink.name)
        if tail is None:
            tail = self._tails[sink.name] = _Tail(tail_lines)
        else:
            tail.resize(tail_lines)
        sink.tail = tail
        sink.pipes = [_Pipe(), _Pipe()]
        for pipe in sink.pipes:
            self._loop.add_reader(pipe.read_fd, self._on_readable, sink, pipe)
        sink.fds = (sink.pipes[0].write_fd, sink.pipes[1].write_fd)

    # -- file mode: the hot path -----------------------------------------

    def _on_readable(self, sink: _Sink, pipe: _Pipe) -> None:
        for _ in range(_READS_PER_WAKE):
            try:
                data = os.read(pipe.read_fd, _READ_SIZE)
                size = len(data)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                logger.warning("service %s: cannot read output: %s", sink.name, exc)
                data = b""
                size = 0
            if not data:
                # Every writer is gone (the service was released).
                self._close_pipe(sink, pipe, flush=True)
                return
            if pipe.partial:
                data = pipe.partial + data
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                if len(data) < _LINE_MAX:
                    pipe.partial = data
                    if size < _READ_SIZE:
                        return
                    continue
                data += b"\n"
                cut = len(data)
            if cut == len(data):
                pipe.partial = b""
                whole = data
            else:
                pipe.partial = data[cut:]
                whole = data[:cut]
                if len(pipe.partial) >= _LINE_MAX:
                    whole += pipe.partial + b"\n"
                    pipe.partial = b""
            self._emit(sink, whole)
            if size < _READ_SIZE:
                return  # the pipe is empty now; spare a read that says so

    def _emit(self, sink: _Sink, whole: bytes) -> None:
        if sink.file is not None:
            sink.file.write(whole)
        if sink.tail is not None:
            sink.tail.add(whole)

    def _close_pipe(self, sink: _Sink, pipe: _Pipe, flush: bool) -> None:
        if pipe.read_fd < 0:
            return
        self._loop.remove_reader(pipe.read_fd)
        os.close(pipe.read_fd)
        pipe.read_fd = -1
        if pipe.write_fd >= 0:
            os.close(pipe.write_fd)
            pipe.write_fd = -1
        if flush and pipe.partial:
            self._emit(sink, pipe.partial + b"\n")
            pipe.partial = b""
        if all(p.read_fd < 0 for p in sink.pipes):
            if sink.file is not None:
                sink.file.close()
            if sink in self._draining:
                self._draining.remove(sink)


def _grow_sndbuf(sock: socket.socket) -> None:
    so_sndbufforce = getattr(socket, "SO_SNDBUFFORCE", 32)
    try:
        sock.setsockopt(socket.SOL_SOCKET, so_sndbufforce, _JOURNAL_SNDBUF)
    except OSError:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _JOURNAL_SNDBUF)
        except OSError:
            pass


def _is_writable_dir(directory: str | None) -> bool:
    if not directory:
        return False
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        return False
    return os.access(directory, os.W_OK | os.X_OK)
