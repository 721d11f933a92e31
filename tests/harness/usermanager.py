"""A real ``systemd --user`` service manager for tests, without systemd as PID 1.

``UserManager`` starts, in private mount and PID namespaces, a volatile
``systemd-journald`` and a ``systemd --user`` manager, then lets the test
drive them with ``systemctl --user`` (run inside the namespaces through
``nsenter``) and read the journal files from outside. The host is left as
it was: ``/run/systemd`` is a private tmpfs in there, the journal files are
in the harness's own directory, and everything dies with the test process
(``setpriv --pdeathsig`` on ``unshare --kill-child``: when the namespace's
PID 1 dies, the kernel kills every process in it).

What the namespace provides, and why:

- ``/run`` is bind-mounted on itself: ``ProtectKernelTunables=`` and
  ``ProtectControlGroups=`` would otherwise hide the notify and journal
  sockets under an empty tmpfs.
- ``/run/systemd/system`` exists, so the manager believes the system was
  booted with systemd; ``/run/systemd/inaccessible/*`` exist for the
  sandboxing options that mask paths.
- ``XDG_RUNTIME_DIR`` is ``/run/systemd/user``, on tmpfs (the manager
  refuses to clean a ``RuntimeDirectory=`` on a disk file system) and
  outside ``/run/user`` (which ``ProtectHome=`` hides).
- The manager runs in a cgroup ``<name>.slice/user@0.service`` of every
  hierarchy, so it builds its tree there and journald fills in
  ``_SYSTEMD_USER_UNIT``.

Example::

    with UserManager() as m:
        m.link("systemd/fastorch.service")
        m.drop_in("fastorch.service", "test", "[Service]\\nWatchdogSec=2s\\n")
        m.systemctl("start", "fastorch.service")       # returns after READY=1
        assert m.show("fastorch.service", "SubState")["SubState"] == "running"
        # fastorch's own entries; the manager's lines about it carry USER_UNIT=
        m.wait_for(_SYSTEMD_USER_UNIT="fastorch.service", FASTORCH_SERVICE="web")

Unit files live in ``m.config_home/systemd/user``; the unit sees
``%t`` = ``/run/systemd/user``. Paths a unit needs must not be under
``/tmp`` when it has ``PrivateTmp=``: the root of the harness is therefore
``<repo>/.ci-systemd/`` by default.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

from harness.journald import (
    JOURNALD_CONF,
    _only_child,
    _wait_gone,
    journald_binary,
    read_journal,
    wait_for_entries,
)

SYSTEMD_BINARIES = ("/lib/systemd/systemd", "/usr/lib/systemd/systemd")
RUNTIME_DIR = "/run/systemd/user"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Runs as "sh -c" as PID 1 of the new namespaces. $1 root, $2 cgroup path
# below each hierarchy, $3 journald, $4 systemd, $5 python, $6.. the
# cgroup hierarchies.
_BOOT = r"""
set -eu
root=$1 cg=$2 journald=$3 systemd=$4 python=$5
shift 5
mount --bind /run /run
mount -t tmpfs -o mode=0755 tmpfs /run/systemd
mkdir -p /run/systemd/system /run/systemd/journal /run/systemd/journald.conf.d
mkdir -p /run/systemd/inaccessible
cd /run/systemd/inaccessible
mkdir -m 0 dir
install -m 0 /dev/null reg
mkfifo -m 0 fifo
mknod -m 0 chr c 0 0
mknod -m 0 blk b 0 0
"$python" -c 'import os, stat; os.mknod("sock", stat.S_IFSOCK)'
chmod 0 sock
cd /
mkdir -m 0700 "$XDG_RUNTIME_DIR"
mount --bind "$root/log" /run/log
cp "$root/journald.conf" /run/systemd/journald.conf.d/50-test.conf
"$journald" </dev/null >"$root/journald.log" 2>&1 &
i=0
while [ ! -S /run/systemd/journal/socket ]; do
    i=$((i + 1)); [ $i -lt 200 ] || { echo "journald did not start"; exit 3; }
    sleep 0.05
done
sh -c '
    cg=$1; systemd=$2; shift 2
    for h in "$@"; do mkdir -p "$h/$cg"; echo $$ > "$h/$cg/cgroup.procs"; done
    exec "$systemd" --user --log-target=journal
' manager "$cg" "$systemd" "$@" </dev/null >"$root/manager.log" 2>&1 &
wait
"""

_MANAGER_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS")


def systemd_binary() -> str | None:
    """Return the path of the systemd manager binary, or None."""
    for path in SYSTEMD_BINARIES:
        if os.access(path, os.X_OK):
            return path
    return None


def cgroup_hierarchies() -> list[str]:
    """The hierarchies the manager must be placed in (v2 alone, or hybrid)."""
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        return ["/sys/fs/cgroup"]
    found = [f"/sys/fs/cgroup/{h}" for h in ("systemd", "unified")]
    return [h for h in found if os.path.isdir(h)]


def _remove_cgroup_tree(path: str, timeout: float) -> None:
    # The directories stay busy until the killed processes are gone.
    deadline = time.monotonic() + timeout
    while os.path.isdir(path):
        for dirpath, _, _ in sorted(os.walk(path), reverse=True):
            try:
                os.rmdir(dirpath)
            except OSError:
                pass
        if os.path.isdir(path):
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)


def _remove_stale(base_dir: str) -> None:
    """Remove cgroups and directories left by a test process that was killed.

    Their names carry the PID of the test process; the processes inside
    died with it, so only empty directories remain.
    """
    stale = re.compile(r"(?:fastorch-test|um)-(\d+)-")
    places = [(h, "fastorch-test-") for h in cgroup_hierarchies()]
    places.append((base_dir, "um-"))
    for parent, prefix in places:
        try:
            names = os.listdir(parent)
        except OSError:
            continue
        for name in names:
            match = stale.match(name)
            if not name.startswith(prefix) or not match:
                continue
            if os.path.exists(f"/proc/{match.group(1)}"):
                continue
            path = os.path.join(parent, name)
            if prefix == "um-":
                shutil.rmtree(path, ignore_errors=True)
            else:
                _remove_cgroup_tree(path, timeout=1.0)


def skip_reason() -> str | None:
    """Name the missing capability that prevents a user manager, or None."""
    if os.geteuid() != 0:
        return "needs root (namespaces, cgroups)"
    for tool in ("unshare", "setpriv", "nsenter", "systemctl", "journalctl"):
        if shutil.which(tool) is None:
            return f"needs {tool} (util-linux/systemd)"
    if systemd_binary() is None or journald_binary() is None:
        return "needs the systemd and systemd-journald binaries"
    if not cgroup_hierarchies():
        return "needs a writable cgroup hierarchy under /sys/fs/cgroup"
    if not os.access("/sys/fs/cgroup", os.W_OK) and not all(
        os.access(h, os.W_OK) for h in cgroup_hierarchies()
    ):
        return "needs write access to /sys/fs/cgroup"
    return None


class UserManager:
    """A ``systemd --user`` manager and journald in private namespaces.

    Use as a context manager, or call ``start()`` and ``stop()``; start it
    from the main thread (it dies when the starting thread exits).
    """

    def __init__(self, base_dir: str | None = None) -> None:
        self._base_dir = base_dir or os.path.join(REPO, ".ci-systemd")
        self.root = ""
        self.cgroup = ""
        self.pid: int | None = None  # PID 1 of the namespace, host view
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def config_home(self) -> str:
        """``$XDG_CONFIG_HOME`` of the manager (unit files, drop-ins)."""
        return os.path.join(self.root, "config")

    @property
    def unit_dir(self) -> str:
        """Where user units and their drop-in directories go."""
        return os.path.join(self.config_home, "systemd", "user")

    @property
    def journal_directory(self) -> str:
        """Directory of the journal files, readable from the host."""
        return os.path.join(self.root, "log", "journal")

    def __enter__(self) -> UserManager:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, timeout: float = 20.0) -> UserManager:
        """Start journald and the manager; wait until the manager answers."""
        journald, systemd = journald_binary(), systemd_binary()
        if journald is None or systemd is None:
            raise RuntimeError("systemd binaries not found")
        os.makedirs(self._base_dir, exist_ok=True)
        _remove_stale(self._base_dir)
        self.root = tempfile.mkdtemp(prefix=f"um-{os.getpid()}-", dir=self._base_dir)
        for sub in ("home", "log", "config/systemd/user"):
            os.makedirs(os.path.join(self.root, sub))
        with open(os.path.join(self.root, "journald.conf"), "w") as f:
            f.write(JOURNALD_CONF)
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.cgroup = f"fastorch-test-{tag}.slice/user@0.service"

        env = {k: v for k, v in os.environ.items() if k not in _MANAGER_VARS}
        env.update(
            HOME=os.path.join(self.root, "home"),
            XDG_RUNTIME_DIR=RUNTIME_DIR,
            XDG_CONFIG_HOME=self.config_home,
            # mount(8) would otherwise record our mounts in the host's /run.
            LIBMOUNT_UTAB=os.path.join(self.root, "utab"),
        )
        argv = [
            "setpriv", "--pdeathsig", "KILL",
            "unshare", "--mount", "--propagation", "private",
            "--pid", "--fork", "--kill-child", "--mount-proc",
            "sh", "-c", _BOOT, "boot",
            self.root, self.cgroup, journald, systemd, sys.executable,
            *cgroup_hierarchies(),
        ]  # fmt: skip
        with open(os.path.join(self.root, "boot.log"), "wb") as log:
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
                raise RuntimeError(f"user manager exited early: {self.logs()}")
            if self.pid is None:
                self.pid = _only_child(self._proc.pid)
            if self.pid is not None:
                state = self.systemctl("is-system-running", check=False)
                if state.stdout.strip() in ("running", "degraded"):
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"user manager not up in {timeout}s: {self.logs()}")
            time.sleep(0.05)

    def logs(self) -> str:
        """What the boot script, journald and the manager printed."""
        out = []
        for name in ("boot.log", "journald.log", "manager.log"):
            try:
                with open(os.path.join(self.root, name), errors="replace") as f:
                    out.append(f"{name}: {f.read().strip()}")
            except OSError:
                pass
        return "\n".join(out)

    def stop(self) -> None:
        """Kill everything in the namespaces; remove cgroups and files."""
        if self._proc is not None:
            # unshare ignores SIGTERM while it waits; on SIGKILL the kernel
            # kills the namespace's PID 1 and with it every process inside.
            self._proc.kill()
            self._proc.wait(timeout=10)
            self._proc = None
        if self.pid is not None:
            _wait_gone(self.pid, timeout=10)
            self.pid = None
        if self.cgroup:
            self._remove_cgroups(timeout=5.0)
            self.cgroup = ""
        if self.root:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = ""

    def _remove_cgroups(self, timeout: float) -> None:
        top = self.cgroup.split("/")[0]
        for hierarchy in cgroup_hierarchies():
            _remove_cgroup_tree(os.path.join(hierarchy, top), timeout)

    def command(self, argv: list[str]) -> list[str]:
        """Return ``argv`` prefixed to run inside the namespaces."""
        if self.pid is None:
            raise RuntimeError("the user manager is not running")
        return [
            "nsenter", f"--target={self.pid}", "--mount", "--pid",
            f"--wd={os.getcwd()}", *argv,
        ]  # fmt: skip

    def run(
        self, argv: list[str], timeout: float = 60.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the namespaces; capture its output as text."""
        env = {k: v for k, v in os.environ.items() if k not in _MANAGER_VARS}
        env.update(
            XDG_RUNTIME_DIR=RUNTIME_DIR,
            XDG_CONFIG_HOME=self.config_home,
            HOME=os.path.join(self.root, "home"),
        )
        done = subprocess.run(
            self.command(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"{argv} exited {done.returncode}: {done.stdout}{done.stderr}"
            )
        return done

    def systemctl(
        self, *args: str, timeout: float = 60.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """``systemctl --user ARGS`` against this manager."""
        argv = ["systemctl", "--user", "--no-pager", "--no-ask-password", *args]
        return self.run(argv, timeout=timeout, check=check)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """Properties of ``unit`` as strings (``systemctl show -p``)."""
        out = self.systemctl("show", "-p", ",".join(props), unit).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def link(self, unit_path: str) -> None:
        """Make a unit file known to the manager without copying it."""
        self.systemctl("link", os.path.abspath(unit_path))

    def drop_in(self, unit: str, name: str, text: str) -> str:
        """Write a drop-in ``<unit>.d/<name>.conf`` and daemon-reload."""
        directory = os.path.join(self.unit_dir, unit + ".d")
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, name + ".conf")
        with open(path, "w") as f:
            f.write(text)
        self.systemctl("daemon-reload")
        return path

    def unit_pids(self, unit: str) -> list[int]:
        """Host PIDs of every process in ``unit``'s cgroup (v2 view)."""
        cg = self.show(unit, "ControlGroup")["ControlGroup"]
        if not cg:
            return []
        hierarchy = cgroup_hierarchies()[-1]  # unified (v2) is last
        pids: list[int] = []
        for dirpath, _, files in os.walk(hierarchy + cg):
            if "cgroup.procs" in files:
                try:
                    with open(os.path.join(dirpath, "cgroup.procs")) as f:
                        pids += [int(p) for p in f.read().split()]
                except OSError:
                    pass
        return pids

    def wait_for_state(
        self, unit: str, timeout: float = 15.0, **expected: str
    ) -> dict[str, str]:
        """Poll ``show`` until every given property has its expected value."""
        deadline = time.monotonic() + timeout
        while True:
            props = self.show(unit, *expected)
            if all(props.get(k) == v for k, v in expected.items()):
                return props
            if time.monotonic() > deadline:
                raise AssertionError(f"{unit}: {props}, wanted {expected}")
            time.sleep(0.05)

    def entries(self, *matches: str, **fields: Any) -> list[dict[str, Any]]:
        """Journal entries matching ``FIELD=value``.

        A unit's own entries carry ``_SYSTEMD_USER_UNIT=<unit>``; what the
        manager says about it (started, watchdog timeout) ``USER_UNIT=<unit>``.
        """
        return read_journal(self.journal_directory, *matches, **fields)

    def wait_for(
        self, *matches: str, count: int = 1, timeout: float = 10.0, **fields: Any
    ) -> list[dict[str, Any]]:
        """Poll the journal until ``count`` entries match; return them."""
        return wait_for_entries(
            self.journal_directory, *matches, count=count, timeout=timeout, **fields
        )
