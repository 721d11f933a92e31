"""fastorch as a systemd service: sd_notify, the watchdog, journal logging.

``SystemdNotifier`` tells the service manager about fastorch itself
(READY, STATUS, RELOADING, STOPPING, WATCHDOG). It uses systemd-python
(the ``fastorch[systemd]`` extra) when importable and reads
``$NOTIFY_SOCKET`` from the process environment; otherwise, or for another
environment mapping, it speaks the datagram protocol itself. Both accept
path and abstract (``@name``) sockets. Without ``$NOTIFY_SOCKET`` every
call is a no-op that returns False.

``setup_logging`` sends fastorch's own log records to the journal with
their structured fields (uppercase record attributes such as
``FASTORCH_SERVICE`` become journal fields), or prints readable lines to
stderr. Only ``cli.py`` calls it.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import re
import socket
import stat
import struct
import sys
import time
import traceback
from collections.abc import Callable, Mapping

from fastorch.errors import ConfigError

try:
    import systemd.daemon as _sd_daemon
    import systemd.journal as _sd_journal
except ImportError:  # the optional extra is not installed
    _sd_daemon = None
    _sd_journal = None

__all__ = [
    "JOURNAL_SOCKET",
    "MANAGER_ENV_VARS",
    "JournalHandler",
    "SystemdNotifier",
    "encode_journal_fields",
    "journal_available",
    "scrub_environ",
    "setup_logging",
]

logger = logging.getLogger(__name__)

JOURNAL_SOCKET = "/run/systemd/journal/socket"
_SEND_TIMEOUT_S = 1.0

#: Variables the service manager hands to fastorch alone. Children must not
#: inherit them: a child would ping fastorch's watchdog or claim its fds.
MANAGER_ENV_VARS = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
)

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
_TARGETS = ("auto", "journal", "stderr")


def scrub_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """Return a copy of ``environ`` without the service manager's variables."""
    return {k: v for k, v in environ.items() if k not in MANAGER_ENV_VARS}


def _socket_address(path: str) -> str | bytes:
    # sd_notify(3): a leading "@" names a socket in the abstract namespace.
    if path.startswith("@"):
        return b"\0" + path[1:].encode()
    return path


class SystemdNotifier:
    """Send sd_notify messages about fastorch itself to the service manager.

    Notify from the main process only: the unit sets ``NotifyAccess=main``.
    """

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        self._socket_path = environ.get("NOTIFY_SOCKET") or None
        self.enabled: bool = self._socket_path is not None
        self.watchdog_interval: float | None = _watchdog_interval(environ)
        if not self.enabled:
            self.watchdog_interval = None
        # systemd-python reads the C-level environment, so it is right only
        # for os.environ itself (whose writes go through putenv).
        self._use_library = (
            _sd_daemon is not None
            and environ is os.environ
            and self._socket_path is not None
        )

    def ready(self) -> None:
        """Report that start-up (or a reload) finished: READY=1."""
        self.notify("READY=1")

    def status(self, text: str) -> None:
        """Set the one-line status shown by ``systemctl status``."""
        self.notify("STATUS=" + " ".join(text.splitlines()))

    def reloading(self) -> None:
        """Report that a reload began; send ``ready()`` when it is done."""
        now_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={now_us}")

    def stopping(self) -> None:
        """Report that the ordered stop began: STOPPING=1."""
        self.notify("STOPPING=1")

    def watchdog(self) -> None:
        """Ping the watchdog: WATCHDOG=1."""
        self.notify("WATCHDOG=1")

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` (``"KEY=value"``) as one message; True if delivered."""
        if self._socket_path is None or not fields:
            return False
        message = "\n".join(fields)
        if self._use_library:
            assert _sd_daemon is not None
            return bool(_sd_daemon.notify(message))
        return self._send(message.encode())

    def _send(self, data: bytes) -> bool:
        assert self._socket_path is not None
        try:
            with socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
            ) as sock:
                # A full receive queue blocks a datagram sender; a manager
                # that stopped reading must not freeze the event loop.
                sock.settimeout(_SEND_TIMEOUT_S)
                sock.sendto(data, _socket_address(self._socket_path))
        except OSError as exc:
            # A manager that went away must not take the supervisor down.
            logger.debug("sd_notify to %s failed: %s", self._socket_path, exc)
            return False
        return True

    def schedule_watchdog(self, loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
        """Ping the watchdog from ``loop`` every interval; return a canceller.

        The ping runs as a loop callback, so a blocked loop stops the pings
        and the service manager restarts fastorch. Without a watchdog the
        canceller does nothing.
        """
        interval = self.watchdog_interval
        handle: asyncio.Handle | None = None

        def ping() -> None:
            nonlocal handle
            self.watchdog()
            assert interval is not None
            handle = loop.call_later(interval, ping)

        def cancel() -> None:
            if handle is not None:
                handle.cancel()

        if interval is not None:
            handle = loop.call_soon(ping)
        return cancel


def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
    # sd_watchdog_enabled(3): the watchdog is ours only if WATCHDOG_PID is
    # unset or names this process; ping at half the timeout.
    usec = environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    owner = environ.get("WATCHDOG_PID")
    try:
        if owner and int(owner) != os.getpid():
            return None
        timeout_us = int(usec)
    except ValueError:
        return None
    if timeout_us <= 0:
        return None
    return timeout_us / 2 / 1_000_000


def journal_available(path: str = JOURNAL_SOCKET) -> bool:
    """Return True if ``path`` is a socket journald listens on."""
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return False
    except OSError:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(path)
        except OSError:
            return False
    return True


# Journal field names: uppercase letters, digits and "_", not starting with
# "_" (those are trusted fields journald sets itself), at most 64 bytes.
_FIELD_NAME = re.compile(r"[A-Z0-9][A-Z0-9_]{0,63}")
_PRIORITY = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),
)


def _priority(levelno: int) -> int:
    for threshold, priority in _PRIORITY:
        if levelno >= threshold:
            return priority
    return 7


def _record_fields(record: logging.LogRecord) -> dict[str, str]:
    return {
        key: str(value)
        for key, value in record.__dict__.items()
        if key.isupper() and _FIELD_NAME.fullmatch(key) and value is not None
    }


class JournalHandler(logging.Handler):
    """Send log records to journald over its native datagram protocol.

    Needs no library. Uppercase record attributes (``extra=``) become journal
    fields. Entries too large for one datagram travel in a sealed memfd, as
    the protocol allows.
    """

    def __init__(
        self,
        socket_path: str = JOURNAL_SOCKET,
        identifier: str = "fastorch",
        level: int = logging.NOTSET,
    ) -> None:
        super().__init__(level)
        self.socket_path = socket_path
        self.identifier = identifier
        self._sock = socket.socket(
            socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
        )

    def emit(self, record: logging.LogRecord) -> None:
        """Format ``record`` and send it as one journal entry."""
        try:
            fields = {
                "MESSAGE": self.format(record),
                "PRIORITY": str(_priority(record.levelno)),
                "SYSLOG_IDENTIFIER": self.identifier,
                "LOGGER": record.name,
                "CODE_FILE": record.pathname or "",
                "CODE_LINE": str(record.lineno),
                "CODE_FUNC": record.funcName or "",
                "THREAD_NAME": str(record.threadName),
            }
            if record.exc_info:
                exc_text = "".join(traceback.format_exception(*record.exc_info))
                fields["EXCEPTION_TEXT"] = exc_text
            fields.update(_record_fields(record))
            self._send(encode_journal_fields(fields))
        except Exception:
            self.handleError(record)

    def _send(self, data: bytes) -> None:
        try:
            self._sock.sendto(data, self.socket_path)
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_memfd(data)

    def _send_memfd(self, data: bytes) -> None:
        # systemd.journal-fields(7) native protocol: an oversized entry goes
        # as a sealed memfd passed with SCM_RIGHTS in an empty datagram.
        fd = os.memfd_create("journal-entry", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, data)
            seals = (
                fcntl.F_SEAL_SHRINK
                | fcntl.F_SEAL_GROW
                | fcntl.F_SEAL_WRITE
                | fcntl.F_SEAL_SEAL
            )
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))]
            self._sock.sendmsg([], ancillary, 0, self.socket_path)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()
        super().close()


def encode_journal_fields(fields: Mapping[str, str]) -> bytes:
    """Encode fields in the native journal protocol.

    A value with a newline uses the binary form: name, newline, 64-bit
    little-endian length, value, newline.
    """
    out = bytearray()
    for name, value in fields.items():
        raw = value.encode("utf-8", "replace")
        if b"\n" in raw:
            out += name.encode() + b"\n" + struct.pack("<Q", len(raw)) + raw + b"\n"
        else:
            out += name.encode() + b"=" + raw + b"\n"
    return bytes(out)


def _drop_unset_fields(record: logging.LogRecord) -> bool:
    # systemd-python would write FASTORCH_PID=None for a service without a
    # process; the native handler leaves such a field out, and so do we.
    for key in [k for k, v in record.__dict__.items() if v is None and k.isupper()]:
        delattr(record, key)
    return True


def _library_journal_handler() -> logging.Handler | None:
    if _sd_journal is None:
        return None
    handler = _sd_journal.JournalHandler(SYSLOG_IDENTIFIER="fastorch")
    handler.addFilter(_drop_unset_fields)
    return handler


def _stderr_is_journal() -> bool:
    # systemd.exec(5): JOURNAL_STREAM is "device:inode" of the stream that
    # stdout/stderr were connected to when the service manager started us.
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(part) for part in value.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def _wants_journal(target: str, journal_socket: str) -> bool:
    if target == "stderr":
        return False
    if not journal_available(journal_socket):
        return False
    if target == "journal":
        return True
    # auto: journald is there; a person at a terminal still reads stderr.
    if _stderr_is_journal():
        return True
    try:
        return not os.isatty(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return True


_installed: logging.Handler | None = None


def setup_logging(
    level: str = "info",
    target: str = "auto",
    journal_socket: str = JOURNAL_SOCKET,
) -> None:
    """Configure the root logger for fastorch's own log.

    Args:
        level: ``debug``, ``info``, ``warning``, ``error`` or ``critical``.
        target: ``journal``, ``stderr`` or ``auto``: the journal when
            journald is reachable and stderr is not a terminal (or stderr is
            the journal stream, ``JOURNAL_STREAM``), else stderr.
        journal_socket: journald's native socket (tests point it elsewhere).

    Raises:
        ConfigError: unknown level or target.
    """
    global _installed
    levelno = _LEVELS.get(level.lower())
    if levelno is None:
        raise ConfigError([("log_level", f"unknown log level {level!r}")])
    if target not in _TARGETS:
        raise ConfigError([("log_target", f"unknown log target {target!r}")])

    root = logging.getLogger()
    if _installed is not None:
        root.removeHandler(_installed)
        _installed.close()
        _installed = None

    handler: logging.Handler | None = None
    if _wants_journal(target, journal_socket):
        if journal_socket == JOURNAL_SOCKET:
            handler = _library_journal_handler()
        if handler is None:
            handler = JournalHandler(journal_socket)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        )
    root.addHandler(handler)
    root.setLevel(levelno)
    _installed = handler
    if target == "journal" and isinstance(handler, logging.StreamHandler):
        logger.warning(
            "journal socket %s unreachable, logging to stderr", journal_socket
        )
