"""A private, throwaway ``systemd-journald`` for tests.

journald hard-codes its socket paths (``/run/systemd/journal/...``) and its
volatile storage (``/run/log/journal``). ``Journald`` runs it in a private
mount namespace where a tmpfs covers ``/run/systemd`` and two directories of
a fresh temporary root are bind-mounted over ``/run/systemd/journal`` and
``/run/log``. The sockets and journal files journald creates there are the
very inodes under that root, so the test process, which stays in the host
namespace, can:

- send to journald: ``jd.socket`` (native protocol, datagrams),
  ``jd.stdout`` (stream protocol, what ``sd_journal_stream_fd`` speaks),
  ``jd.dev_log`` (syslog);
- read entries back: ``jd.entries(FIELD="value")`` runs
  ``journalctl --directory`` over the journal files;
- run a program that only knows the default paths (systemd-python,
  ``logger``, ``systemd-cat``) inside journald's namespace:
  ``jd.run_inside([...])``.

Nothing on the host changes: no host socket, no persistent journal file.
journald dies with the test process (``setpriv --pdeathsig`` on ``unshare``,
``unshare --kill-child`` on journald), even if pytest is SIGKILLed.

Example, connecting a child's stdout to the journal as a stream::

    import pytest
    from harness.journald import Journald, skip_reason

    @pytest.fixture(scope="module")
    def journald():
        reason = skip_reason()
        if reason:
            pytest.skip(reason)
        with Journald() as jd:
            yield jd

    def test_child_output_lands_in_journal(journald):
        stream = journald.stream("web", priority=6)
        subprocess.run(["echo", "hello"], stdout=stream.fileno(), timeout=5)
        stream.close()
        (entry,) = journald.wait_for(SYSLOG_IDENTIFIER="web")
        assert entry["MESSAGE"] == "hello"

Entries are dicts of ``journalctl -o json`` (values are strings; binary
values are lists of ints). journald is asynchronous: use ``wait_for``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any

JOURNALD_BINARIES = (
    "/lib/systemd/systemd-journald",
    "/usr/lib/systemd/systemd-journald",
)

#: Volatile storage only; no forwarding; no rate limit so bursts in tests are
#: never dropped.
JOURNALD_CONF = """\
[Journal]
Storage=volatile
ReadKMsg=no
ForwardToSyslog=no
ForwardToKMsg=no
ForwardToConsole=no
ForwardToWall=no
RateLimitBurst=0
"""

# Runs as "sh -c" inside the new mount namespace: $1 is the temporary root,
# $2 the journald binary.
_BOOT = r"""
set -eu
root=$1
mount -t tmpfs -o mode=0755 tmpfs /run/systemd
mkdir -p /run/systemd/journal /run/systemd/journald.conf.d
mount --bind "$root/sockets" /run/systemd/journal
mount --bind "$root/log" /run/log
cp "$root/journald.conf" /run/systemd/journald.conf.d/50-test.conf
exec "$2" </dev/null
"""

# Variables of an outer service manager that must not leak into journald.
_MANAGER_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS")


def journald_binary() -> str | None:
    """Return the path of systemd-journald on this machine, or None."""
    for path in JOURNALD_BINARIES:
        if os.access(path, os.X_OK):
            return path
    return None


def skip_reason() -> str | None:
    """Name the missing capability that prevents a private journald, or None."""
    if os.geteuid() != 0:
        return "needs root (mount namespaces, bind mounts)"
    for tool in ("unshare", "setpriv", "nsenter", "journalctl"):
        if shutil.which(tool) is None:
            return f"needs {tool} (util-linux/systemd)"
    if journald_binary() is None:
        return "needs the systemd-journald binary"
    if not os.path.isdir("/run/log"):
        return "needs a /run/log directory to mount over"
    return None


class Journald:
    """A private systemd-journald whose sockets and files the test can reach.

    Use as a context manager, or call ``start()`` and ``stop()``. Start it
    from the main thread: it dies when the thread that started it exits.
    """

    def __init__(self, tmp_dir: str = "/tmp") -> None:
        # A short root keeps socket paths far below the 108-byte sun_path limit.
        self._tmp_dir = tmp_dir
        self.root = ""
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> str:
        """Path of the native-protocol datagram socket."""
        return os.path.join(self.root, "sockets", "socket")

    @property
    def stdout(self) -> str:
        """Path of the stdout stream socket (``sd_journal_stream_fd``)."""
        return os.path.join(self.root, "sockets", "stdout")

    @property
    def dev_log(self) -> str:
        """Path of the syslog datagram socket."""
        return os.path.join(self.root, "sockets", "dev-log")

    @property
    def directory(self) -> str:
        """Directory holding the journal files (for ``journalctl -D``)."""
        return os.path.join(self.root, "log", "journal")

    def __enter__(self) -> Journald:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, timeout: float = 10.0) -> Journald:
        """Start journald and wait until its stream socket accepts."""
        binary = journald_binary()
        if binary is None:
            raise RuntimeError("systemd-journald not found")
        self.root = tempfile.mkdtemp(prefix="fj-", dir=self._tmp_dir)
        os.mkdir(os.path.join(self.root, "sockets"))
        os.mkdir(os.path.join(self.root, "log"))
        with open(os.path.join(self.root, "journald.conf"), "w") as f:
            f.write(JOURNALD_CONF)
        env = {k: v for k, v in os.environ.items() if k not in _MANAGER_VARS}
        # mount(8) would otherwise record our mounts in the host's /run/mount.
        env["LIBMOUNT_UTAB"] = os.path.join(self.root, "utab")
        argv = [
            "setpriv", "--pdeathsig", "KILL",
            "unshare", "--mount", "--propagation", "private",
            "--fork", "--kill-child",
            "sh", "-c", _BOOT, "journald-boot", self.root, binary,
        ]  # fmt: skip
        with open(os.path.join(self.root, "journald.log"), "wb") as log:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env
            )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"journald exited early: {self.log()!r}")
            if self.pid is None:
                self.pid = _only_child(self._proc.pid)
            if self.pid is not None and _accepts(self.stdout):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"journald not ready in {timeout}s: {self.log()!r}")
            time.sleep(0.02)

    def log(self) -> str:
        """What journald itself printed (errors at start-up)."""
        try:
            with open(os.path.join(self.root, "journald.log"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def stop(self) -> None:
        """Kill journald (its namespace goes with it) and remove the root."""
        if self._proc is not None:
            # unshare ignores SIGTERM while it waits; SIGKILL makes the kernel
            # deliver --kill-child's SIGKILL to journald.
            self._proc.kill()
            self._proc.wait(timeout=10)
            self._proc = None
        if self.pid is not None:
            _wait_gone(self.pid, timeout=10)
            self.pid = None
        if self.root:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = ""

    def send(self, message: str, **fields: Any) -> None:
        """Send one entry over the native protocol (values must be one line)."""
        lines = [f"MESSAGE={message}"]
        lines += [f"{k}={v}" for k, v in fields.items()]
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(("\n".join(lines) + "\n").encode(), self.socket)

    def stream(
        self, identifier: str, priority: int = 6, level_prefix: bool = False
    ) -> socket.socket:
        """Open a stdout stream: what is written to it becomes entries.

        The socket's ``fileno()`` can be a child's stdout; close ours after
        the child is spawned.
        """
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(self.stdout)
            s.shutdown(socket.SHUT_RD)
            # identifier, unit id, priority, level prefix, then forwarding to
            # syslog, kmsg and console: the stream protocol's fixed header.
            header = f"{identifier}\n\n{priority}\n{int(level_prefix)}\n0\n0\n0\n"
            s.sendall(header.encode())
        except BaseException:
            s.close()
            raise
        return s

    def entries(self, *matches: str, **fields: Any) -> list[dict[str, Any]]:
        """Return the entries matching ``FIELD=value`` (all given must match)."""
        return read_journal(self.directory, *matches, **fields)

    def wait_for(
        self, *matches: str, count: int = 1, timeout: float = 5.0, **fields: Any
    ) -> list[dict[str, Any]]:
        """Poll until at least ``count`` entries match; return them all."""
        return wait_for_entries(
            self.directory, *matches, count=count, timeout=timeout, **fields
        )

    def inside(self, argv: list[str]) -> list[str]:
        """Return ``argv`` prefixed to run in journald's mount namespace.

        There the default paths (``/run/systemd/journal/socket``) are this
        journald, so systemd-python or ``systemd-cat`` reach it unchanged.
        """
        if self.pid is None:
            raise RuntimeError("journald is not running")
        prefix = ["nsenter", f"--target={self.pid}", "--mount"]
        return [*prefix, f"--wd={os.getcwd()}", *argv]

    def run_inside(
        self, argv: list[str], timeout: float = 30.0, **kwargs: Any
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``argv`` to completion in journald's mount namespace."""
        env = {k: v for k, v in os.environ.items() if k not in _MANAGER_VARS}
        env.update(kwargs.pop("env", {}))
        return subprocess.run(self.inside(argv), timeout=timeout, env=env, **kwargs)


def read_journal(directory: str, *matches: str, **fields: Any) -> list[dict[str, Any]]:
    """Return the entries of the journal files in ``directory`` that match."""
    argv = ["journalctl", f"--directory={directory}", "-o", "json"]
    argv += ["--all", "--no-pager", "-q", *matches]
    argv += [f"{k}={v}" for k, v in fields.items()]
    out = subprocess.run(argv, capture_output=True, timeout=10, check=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line]


def wait_for_entries(
    directory: str,
    *matches: str,
    count: int = 1,
    timeout: float = 5.0,
    **fields: Any,
) -> list[dict[str, Any]]:
    """Poll until at least ``count`` entries match; return them all."""
    deadline = time.monotonic() + timeout
    while True:
        found = read_journal(directory, *matches, **fields)
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{len(found)} of {count} journal entries matching "
                f"{matches} {fields} after {timeout}s"
            )
        time.sleep(0.05)


def _only_child(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = f.read().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def _accepts(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def _reap_if_ours(pid: int) -> None:
    # A test process that ran a ProcessTable is a child subreaper: journald,
    # orphaned when unshare dies, is then reparented to it and must be
    # reaped here, or it stays a zombie child of pytest.
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}"):
        try:
            # Zombies of another parent still show; check the state.
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    _reap_if_ours(pid)
                    return
        except OSError:
            return
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.01)
