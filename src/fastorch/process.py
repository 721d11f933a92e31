"""Spawn children in their own session, watch their exits, signal them.

Every child fastorch starts (services and exec probes alike) goes through one
:class:`ProcessTable`, which:

- starts the child as the leader of a new session and process group
  (``pgid == sid == pid``), with glibc's ``posix_spawn`` (vfork-speed,
  through ``fastorch._spawn``, which adds the chdir action) when argv,
  env, cwd and the standard streams are all that is asked for, and with
  ``subprocess.Popen`` otherwise (user, group, umask, rlimits);
- learns of its exit through a pidfd on the event loop (no polling, and
  no ``waitpid(-1)`` that could steal another component's child);
- makes fastorch a child subreaper, so descendants that outlive their
  parent are reparented to it; a ``SIGCHLD`` handler reaps them;
- kills what a service leaves behind when its main process exits: its
  process group, and the processes that were in its tree when it was
  signalled (which catches a grandchild that moved to a new session).

See docs/runtime.md for the measurements behind these choices.
"""

from __future__ import annotations

import asyncio
import ctypes
import grp
import logging
import os
import pwd
import resource
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from fastorch import _spawn
from fastorch.errors import SpawnError

__all__ = ["DEVNULL", "ProcessTable", "ProcStat", "read_stat", "scan_proc"]

logger = logging.getLogger(__name__)

DEVNULL = subprocess.DEVNULL

# linux/prctl.h
_PR_SET_CHILD_SUBREAPER = 36

_RLIMIT_NAMES = {
    name[len("RLIMIT_") :].lower(): getattr(resource, name)
    for name in dir(resource)
    if name.startswith("RLIMIT_")
}


@dataclass(slots=True, frozen=True)
class ProcStat:
    """The fields of ``/proc/<pid>/stat`` fastorch needs."""

    pid: int
    state: str
    ppid: int
    pgrp: int
    session: int
    starttime: int


def read_stat(pid: int) -> ProcStat | None:
    """Read ``/proc/<pid>/stat``; None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the
    # last ')' (proc(5)).
    rest = data[data.rindex(b")") + 2 :].split()
    return ProcStat(
        pid=pid,
        state=rest[0].decode(),
        ppid=int(rest[1]),
        pgrp=int(rest[2]),
        session=int(rest[3]),
        starttime=int(rest[19]),
    )


def scan_proc() -> dict[int, ProcStat]:
    """Every process of the host (of this PID namespace), by pid."""
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            st = read_stat(int(entry.name))
            if st is not None:
                table[st.pid] = st
    return table


def child_map(procs: dict[int, ProcStat]) -> dict[int, list[int]]:
    """Each pid's children in *procs*."""
    children: dict[int, list[int]] = {}
    for st in procs.values():
        children.setdefault(st.ppid, []).append(st.pid)
    return children


def descendants(
    procs: dict[int, ProcStat],
    roots: Iterable[int],
    children: dict[int, list[int]] | None = None,
) -> set[int]:
    """The pids below *roots* in the ppid tree of *procs* (roots excluded)."""
    if children is None:
        children = child_map(procs)
    found: set[int] = set()
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def set_child_subreaper() -> bool:
    """Make this process a child subreaper (prctl(2)); False if refused."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one: one pidfd per child."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


# How long adopted orphans may wait to be reaped in pidfd mode.
_ORPHAN_DELAY_S = 0.05


@dataclass(slots=True)
class _Child:
    pid: int
    on_exit: Callable[[int, int], None]
    pidfd: int = -1
    popen: subprocess.Popen[bytes] | None = None
    # (pid, starttime) of the tree when last signalled; killed at exit.
    tree: list[tuple[int, int]] = field(default_factory=list)


class ProcessTable:
    """The children of this fastorch process: spawn, watch, signal, reap.

    Args:
        loop: the event loop every callback runs on.
        exit_watch: ``"pidfd"`` (one pidfd per child on the loop; the
            default, safe beside other code that starts children),
            ``"waitpid"`` (one ``SIGCHLD`` handler reaping with
            ``waitpid(-1)``: O(1) per exit and no descriptor per child, for
            a process whose every child is ours, as ``fastorch run`` is) or
            ``"sigchld"`` (the handler peeking with ``waitid(WNOWAIT)``; for
            kernels without pidfd, and a baseline of
            bench/bench_exit_watch.py).
        subreaper: make this process a child subreaper.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        exit_watch: str = "pidfd",
        subreaper: bool = True,
    ) -> None:
        if exit_watch not in ("pidfd", "sigchld", "waitpid"):
            raise ValueError(f"unknown exit_watch {exit_watch!r}")
        if exit_watch == "pidfd" and not hasattr(os, "pidfd_open"):
            exit_watch = "sigchld"
        self._loop = loop
        self._use_pidfd = exit_watch == "pidfd"
        self._reap_all = exit_watch == "waitpid"
        self._children: dict[int, _Child] = {}
        self._closed = False
        self._own_session = os.getsid(0)
        self.is_pid1 = os.getpid() == 1
        self.is_subreaper = set_child_subreaper() if subreaper else False
        self.orphans_reaped = 0
        raise_nofile_limit()
        # uvloop refuses add_signal_handler(SIGCHLD) (libuv keeps it for its
        # own subprocesses, which fastorch does not use), so a plain handler
        # hands the work to the loop; call_soon_threadsafe is safe here.
        self._sigchld_pending = False
        self._prev_sigchld = signal.signal(signal.SIGCHLD, self._sigchld_handler)

    def __len__(self) -> int:
        return len(self._children)

    def __contains__(self, pid: object) -> bool:
        return pid in self._children

    def pids(self) -> list[int]:
        """The pids of the children not reaped yet."""
        return list(self._children)

    # -- spawning ----------------------------------------------------------

    def spawn(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        group: str | None = None,
        umask: int | None = None,
        rlimits: dict[str, tuple[int, int]] | None = None,
        stdin: int | None = DEVNULL,
        stdout: int | None = None,
        stderr: int | None = None,
        on_exit: Callable[[int, int], None],
    ) -> int:
        """Start *argv* in a new session; return its pid.

        ``on_exit(pid, status)`` is called once, on the loop; status is the
        exit code, or ``-signo`` when a signal ended the child. *stdin*,
        *stdout* and *stderr* are an fd to give the child, ``None`` to
        inherit ours, or :data:`DEVNULL`.

        Raises:
            SpawnError: the executable is missing or not executable, the
                user, group or cwd does not exist, a limit is unknown, or
                the exec failed; nothing was started.
        """
        if self._closed:
            raise SpawnError("process table is closed")
        if not argv:
            raise SpawnError("empty command")
        path = _resolve_executable(argv[0], env, cwd)
        if cwd is not None and not os.path.isdir(cwd):
            raise SpawnError(f"working directory {cwd!r} does not exist")
        limits = _check_rlimits(rlimits)

        popen = None
        if user is None and group is None and umask is None and not limits:
            pid = self._posix_spawn(path, argv, env, cwd, stdin, stdout, stderr)
        else:
            popen = _popen(
                path, argv, env, cwd, user, group, umask, limits, stdin, stdout, stderr
            )
            pid = popen.pid

        child = _Child(pid, on_exit, popen=popen)
        self._children[pid] = child
        if self._use_pidfd:
            self._watch(child)
        return pid

    def _posix_spawn(
        self,
        path: str,
        argv: list[str],
        env: dict[str, str] | None,
        cwd: str | None,
        stdin: int | None,
        stdout: int | None,
        stderr: int | None,
    ) -> int:
        if env is None:
            env = dict(os.environ)
        try:
            # glibc's posix_spawn uses clone(CLONE_VFORK) and reports a
            # failed chdir or exec as its return value, so errors surface
            # here; _spawn adds the chdir action Python 3.11 lacks.
            return _spawn.spawn(
                os.fsencode(path),
                [os.fsencode(a) for a in argv],
                [os.fsencode(f"{k}={v}") for k, v in env.items()],
                None if cwd is None else os.fsencode(cwd),
                _spawn_fd(stdin),
                _spawn_fd(stdout),
                _spawn_fd(stderr),
            )
        except OSError as exc:
            raise SpawnError(f"cannot start {argv[0]!r}: {exc.strerror}") from exc

    def _watch(self, child: _Child) -> None:
        try:
            child.pidfd = os.pidfd_open(child.pid)
        except ProcessLookupError:
            # Already reaped by the SIGCHLD path: nothing to watch.
            return
        self._loop.add_reader(child.pidfd, self._on_pidfd, child.pid)

    # -- exits -------------------------------------------------------------

    def _on_pidfd(self, pid: int) -> None:
        try:
            reaped, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if reaped != 0:
            self._finish(pid, status)

    def _sigchld_handler(self, signo: int, frame: object) -> None:
        if not self._sigchld_pending and not self._closed:
            self._sigchld_pending = True
            if self._use_pidfd:
                # Our children come through their pidfds; this pass only
                # reaps adopted orphans, and its waitid walks every child:
                # keep it off the path of a restart, and batch it.
                self._loop.call_soon_threadsafe(
                    self._loop.call_later, _ORPHAN_DELAY_S, self._on_sigchld
                )
            else:
                self._loop.call_soon_threadsafe(self._on_sigchld)

    def _on_sigchld(self) -> None:
        self._sigchld_pending = False
        if self._reap_all:
            self._reap_any()
            return
        # Peek (WNOWAIT) at one zombie child at a time, so a child spawned by
        # other code in this process is never reaped behind its owner's back.
        while True:
            try:
                res = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if res is None or res.si_pid == 0:
                return
            pid = res.si_pid
            if pid in self._children:
                _, status = os.waitpid(pid, 0)
                self._finish(pid, status)
            elif self._is_orphan(pid):
                os.waitpid(pid, 0)
                self.orphans_reaped += 1
                logger.debug("reaped orphan %d", pid)
            else:
                # A foreign child: its owner reaps it. waitid(P_ALL) would
                # show it first again and again, so look for ours by name.
                self._reap_around()
                return

    def _reap_any(self) -> None:
        # Every child of this process is ours or an adopted orphan, so
        # waitpid(-1) takes each exit in O(1), however many children run.
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self._children:
                self._finish(pid, status)
            else:
                self.orphans_reaped += 1
                logger.debug("reaped orphan %d", pid)

    def _reap_around(self) -> None:
        """Reap our exited children and orphans one by one (the slow way,
        for when a foreign zombie hides them from waitid(P_ALL))."""
        for pid in list(self._children):
            try:
                reaped, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if reaped:
                self._finish(pid, status)
        self._reap_orphans()

    def _reap_orphans(self) -> int:
        """Reap every orphan zombie adopted by this process; the count."""
        me = os.getpid()
        count = 0
        for st in scan_proc().values():
            if (
                st.ppid == me
                and st.state == "Z"
                and st.pid not in self._children
                and (self.is_pid1 or st.session != self._own_session)
            ):
                try:
                    os.waitpid(st.pid, os.WNOHANG)
                except ChildProcessError:
                    continue
                count += 1
        self.orphans_reaped += count
        return count

    def _is_orphan(self, pid: int) -> bool:
        if self.is_pid1:
            return True
        st = read_stat(pid)
        # Children spawned by other code here stay in our session; a
        # descendant of a service is in the service's session or its own.
        return st is not None and st.session != self._own_session

    def _finish(self, pid: int, wait_status: int) -> None:
        child = self._children.pop(pid, None)
        if child is None:
            return
        if child.pidfd >= 0:
            self._loop.remove_reader(child.pidfd)
            os.close(child.pidfd)
        status = os.waitstatus_to_exitcode(wait_status)
        if child.popen is not None:
            child.popen.returncode = status
        self._kill_leftovers(child)
        try:
            child.on_exit(pid, status)
        except Exception:
            logger.exception("exit callback of pid %d failed", pid)

    def _kill_leftovers(self, child: _Child) -> None:
        # A service is over when its main process exits: what stayed in its
        # group goes too (the pgid cannot be reused while members live).
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for pid, starttime in child.tree:
            st = read_stat(pid)
            if st is not None and st.starttime == starttime and st.state != "Z":
                _kill(pid, signal.SIGKILL)

    # -- signals -----------------------------------------------------------

    def signal_group(self, pid: int, signo: int) -> bool:
        """Send *signo* to the process group of child *pid*; False if gone."""
        return self.signal_groups([(pid, signo)])[0]

    def signal_groups(self, items: list[tuple[int, int]]) -> list[bool]:
        """Signal several groups after one snapshot of their process trees.

        The snapshot (one pass over /proc) remembers every descendant, so a
        grandchild that moved to a new session is still killed when the
        main process exits.
        """
        live = [pid for pid, _ in items if pid in self._children]
        if live:
            self._snapshot(live)
        results = []
        for pid, signo in items:
            if pid not in self._children:
                results.append(False)
                continue
            try:
                os.killpg(pid, signo)
                results.append(True)
            except ProcessLookupError:
                results.append(False)
        return results

    def _snapshot(self, pids: list[int]) -> None:
        procs = scan_proc()
        children = child_map(procs)
        sessions: dict[int, list[int]] = {}
        for st in procs.values():
            sessions.setdefault(st.session, []).append(st.pid)
        for pid in pids:
            if pid not in procs:
                continue
            members = descendants(procs, [pid], children)
            members.update(sessions.get(pid, ()))
            members.discard(pid)
            self._children[pid].tree = [(p, procs[p].starttime) for p in members]

    # -- closing -----------------------------------------------------------

    def kill_orphans(self) -> int:
        """SIGKILL every reparented orphan and its descendants; the count."""
        procs = scan_proc()
        me = os.getpid()
        roots = [
            st.pid
            for st in procs.values()
            if st.ppid == me
            and st.pid not in self._children
            and st.state != "Z"
            and (self.is_pid1 or st.session != self._own_session)
        ]
        victims = set(roots) | descendants(procs, roots)
        for pid in victims:
            _kill(pid, signal.SIGKILL)
        return len(victims)

    def close(self) -> None:
        """Kill and reap every child left, kill orphans, stop watching."""
        if self._closed:
            return
        self._closed = True
        for pid in list(self._children):
            _killpg(pid, signal.SIGKILL)
        # Orphans: kill them, then reap them as they die; their own children
        # are adopted in turn when they go, so repeat (briefly) until none
        # is left, or they would stay zombies of whoever runs this table.
        deadline = time.monotonic() + 2.0
        while self.kill_orphans() + self._reap_orphans():
            if time.monotonic() > deadline:
                break
            time.sleep(0.005)
        for pid, child in list(self._children.items()):
            try:
                _, status = os.waitpid(pid, 0)
            except ChildProcessError:
                status = 0
            if child.pidfd >= 0:
                self._loop.remove_reader(child.pidfd)
                os.close(child.pidfd)
                child.pidfd = -1
            if child.popen is not None:
                child.popen.returncode = os.waitstatus_to_exitcode(status)
        self._children.clear()
        self._on_sigchld()
        signal.signal(signal.SIGCHLD, self._prev_sigchld or signal.SIG_DFL)


def _kill(pid: int, signo: int) -> None:
    try:
        os.kill(pid, signo)
    except (ProcessLookupError, PermissionError):
        pass


def _killpg(pgid: int, signo: int) -> None:
    try:
        os.killpg(pgid, signo)
    except (ProcessLookupError, PermissionError):
        pass


_which_cache: dict[tuple[str, str], str] = {}


def _resolve_executable(name: str, env: dict[str, str] | None, cwd: str | None) -> str:
    if "/" in name:
        path = name if os.path.isabs(name) or cwd is None else os.path.join(cwd, name)
        if not os.path.exists(path):
            raise SpawnError(f"executable {name!r} not found") from FileNotFoundError(
                2, "No such file or directory", path
            )
    else:
        search = (os.environ if env is None else env).get("PATH", os.defpath)
        # A PATH search costs a stat per directory; a fleet of instances
        # asks the same question a thousand times, and one access() call
        # confirms the answer still holds.
        found = _which_cache.get((name, search))
        if found is not None and os.access(found, os.X_OK):
            return found
        found = shutil.which(name, path=search)
        if found is not None:
            _which_cache[(name, search)] = found
            return found
        path = shutil.which(name, mode=os.F_OK, path=search) or ""
        if not path:
            raise SpawnError(
                f"executable {name!r} not found in PATH"
            ) from FileNotFoundError(2, "No such file or directory", name)
    if os.path.isdir(path) or not os.access(path, os.X_OK):
        raise SpawnError(f"{path!r} is not executable") from PermissionError(
            13, "Permission denied", path
        )
    return path


def _check_rlimits(
    rlimits: dict[str, tuple[int, int]] | None,
) -> list[tuple[int, tuple[int, int]]]:
    if not rlimits:
        return []
    limits = []
    for name, value in rlimits.items():
        key = name.lower().removeprefix("rlimit_")
        if key not in _RLIMIT_NAMES:
            raise SpawnError(f"unknown resource limit {name!r}")
        limits.append((_RLIMIT_NAMES[key], (int(value[0]), int(value[1]))))
    return limits


def _spawn_fd(fd: int | None) -> int:
    if fd is None:
        return _spawn.INHERIT
    if fd == DEVNULL:
        return _spawn.DEVNULL
    return fd


def _popen(
    path: str,
    argv: list[str],
    env: dict[str, str] | None,
    cwd: str | None,
    user: str | None,
    group: str | None,
    umask: int | None,
    limits: list[tuple[int, tuple[int, int]]],
    stdin: int | None,
    stdout: int | None,
    stderr: int | None,
) -> subprocess.Popen[bytes]:
    gid = None
    extra_groups = None
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError as exc:
            raise SpawnError(f"unknown group {group!r}") from exc
    if user is not None:
        try:
            pw = pwd.getpwnam(user)
        except KeyError as exc:
            raise SpawnError(f"unknown user {user!r}") from exc
        if gid is None:
            gid = pw.pw_gid
        # Without this the child keeps root's supplementary groups.
        extra_groups = os.getgrouplist(user, gid)

    preexec = None
    if limits:
        # The limits must hold before exec; this makes Popen fork instead
        # of vfork, a cost paid only by services that ask for rlimits.
        def preexec() -> None:
            for res, value in limits:
                resource.setrlimit(res, value)

    try:
        return subprocess.Popen(
            argv,
            executable=path,
            env=env,
            cwd=cwd,
            user=user,
            group=gid,
            extra_groups=extra_groups,
            umask=-1 if umask is None else umask,
            start_new_session=True,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            # fastorch opens every fd non-inheritable (PEP 446): closing the
            # rest in the child costs one syscall per open fd (a pidfd per
            # child), measured at ~2 ms per spawn with 1000 children.
            close_fds=False,
            preexec_fn=preexec,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise SpawnError(f"cannot start {argv[0]!r}: {reason}") from exc
