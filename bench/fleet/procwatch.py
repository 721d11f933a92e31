"""Watch process trees from outside through the kernel's proc connector.

The netlink proc connector reports every fork, exec and exit on the host
with a CLOCK_MONOTONIC timestamp taken in the kernel at the moment it
happens. One thread blocked in ``recv`` turns those reports into, per
process tree started by the bench, the set of children running ``sleep``
and when each one exec'd or exited. The supervisor under test is never
polled: it pays nothing for being watched, and a respawn is timed at the
child's ``execve``, not at the next time an observer happens to look.

Needs CAP_NET_ADMIN (the bench runs as root).
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2
NLMSG_DONE = 3
SO_RCVBUFFORCE = 33  # Linux; the socket module does not export it

PROC_EVENT_FORK = 0x00000001
PROC_EVENT_EXEC = 0x00000002
PROC_EVENT_EXIT = 0x80000000

_NLMSGHDR = struct.Struct("=IHHII")
_CN_MSG = struct.Struct("=IIIIHH")
_EVENT_HEAD = struct.Struct("=IIQ")
_FORK = struct.Struct("=IIII")
_EXEC = struct.Struct("=II")
_EXIT = struct.Struct("=II")
_EVENT_AT = _NLMSGHDR.size + _CN_MSG.size
_DATA_AT = _EVENT_AT + _EVENT_HEAD.size

# A burst of 1,000 spawns is ~3,000 reports; each costs a full skb in the
# socket's queue, so a large buffer keeps a slow reader from losing any.
_RCVBUF_BYTES = 64 << 20


class EventsLost(RuntimeError):
    """The socket overflowed: some reports are gone, the run is not valid."""


@dataclass
class Tree:
    """What the bench knows about one process it started and its descendants.

    Timestamps are ``time.monotonic_ns()`` values (the kernel's clock).
    """

    root: int
    members: set[int] = field(default_factory=set)
    running: dict[int, int] = field(default_factory=dict)
    execs: list[tuple[int, int]] = field(default_factory=list)
    exits: dict[int, int] = field(default_factory=dict)
    forks: dict[int, int] = field(default_factory=dict)
    root_exit_ns: int | None = None

    def helpers(self) -> list[int]:
        """Live descendants that are not services (helper processes)."""
        return [p for p in self.members if p != self.root and p not in self.running]


class ProcWatch:
    """Follow every process tree started by this process, in a thread.

    A process forked by this one becomes the root of a new ``Tree``; its
    descendants join that tree. A descendant that execs ``sleep`` (the
    service command of the bench) counts as a running service until it
    exits.
    """

    def __init__(self, service_comm: str = "sleep") -> None:
        self._me = os.getpid()
        self._comm = service_comm
        self._owner: dict[int, Tree] = {}
        self._trees: dict[int, Tree] = {}
        self._cond = threading.Condition()
        self._lost = False
        self._stopping = False
        self._sock = self._open()
        self._thread = threading.Thread(
            target=self._read, name="procwatch", daemon=True
        )
        self._thread.start()

    def _open(self) -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, _RCVBUF_BYTES)
            sock.bind((0, CN_IDX_PROC))
            self._send_op(sock, PROC_CN_MCAST_LISTEN)
        except BaseException:
            sock.close()
            raise
        sock.settimeout(0.2)
        return sock

    @staticmethod
    def _send_op(sock: socket.socket, op: int) -> None:
        body = struct.pack("=I", op)
        cn = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(body), 0) + body
        head = _NLMSGHDR.pack(_NLMSGHDR.size + len(cn), NLMSG_DONE, 0, 0, 0)
        sock.send(head + cn)

    def close(self) -> None:
        """Stop the reader thread and close the socket."""
        self._stopping = True
        self._thread.join(timeout=2.0)
        try:
            self._send_op(self._sock, PROC_CN_MCAST_IGNORE)
        except OSError:
            pass
        self._sock.close()

    @property
    def lock(self) -> threading.Condition:
        """Hold it to read a ``Tree`` while the reader thread may change it."""
        return self._cond

    def tree(self, root: int, timeout: float = 5.0) -> Tree:
        """The tree of ``root``, a child this process just started."""
        with self._cond:
            ok = self._cond.wait_for(lambda: root in self._trees, timeout)
            if not ok:
                raise TimeoutError(f"no fork report for pid {root}")
            return self._trees[root]

    def forget(self, root: int) -> None:
        """Drop a finished tree."""
        with self._cond:
            tree = self._trees.pop(root, None)
            if tree is not None:
                for pid in tree.members:
                    self._owner.pop(pid, None)

    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` holds (checked under the lock)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                if self._lost:
                    raise EventsLost("proc connector dropped reports")
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def check(self) -> None:
        """Raise ``EventsLost`` if any report was dropped so far."""
        if self._lost:
            raise EventsLost("proc connector dropped reports")

    def _read(self) -> None:
        buf = bytearray(1 << 16)
        view = memoryview(buf)
        while not self._stopping:
            try:
                size = self._sock.recv_into(buf)
            except TimeoutError:
                continue
            except OSError as exc:
                if exc.errno == 105:  # ENOBUFS: the queue overflowed
                    with self._cond:
                        self._lost = True
                        self._cond.notify_all()
                    continue
                if self._stopping:
                    return
                raise
            with self._cond:
                self._parse(view[:size])
                self._cond.notify_all()

    def _parse(self, data: memoryview) -> None:
        at = 0
        while at + _DATA_AT <= len(data):
            length = _NLMSGHDR.unpack_from(data, at)[0]
            if length < _DATA_AT:
                return
            what, _cpu, ts = _EVENT_HEAD.unpack_from(data, at + _EVENT_AT - 0)
            self._event(what, ts, data, at + _DATA_AT)
            at += (length + 3) & ~3

    def _event(self, what: int, ts: int, data: memoryview, at: int) -> None:
        if what == PROC_EVENT_FORK:
            _ppid, ptgid, pid, tgid = _FORK.unpack_from(data, at)
            if pid != tgid:
                return  # a new thread, not a new process
            if ptgid == self._me:
                tree = Tree(root=pid)
                self._trees[pid] = tree
            else:
                tree = self._owner.get(ptgid)
                if tree is None:
                    return
            tree.members.add(pid)
            tree.forks[pid] = ts
            self._owner[pid] = tree
        elif what == PROC_EVENT_EXEC:
            pid, tgid = _EXEC.unpack_from(data, at)
            tree = self._owner.get(tgid)
            if tree is None or tgid == tree.root:
                return
            if self._comm_of(tgid) == self._comm:
                tree.running[tgid] = ts
                tree.execs.append((ts, tgid))
        elif what == PROC_EVENT_EXIT:
            pid, tgid = _EXIT.unpack_from(data, at)
            if pid != tgid:
                return
            tree = self._owner.pop(tgid, None)
            if tree is None:
                return
            tree.members.discard(tgid)
            tree.running.pop(tgid, None)
            tree.exits[tgid] = ts
            if tgid == tree.root:
                tree.root_exit_ns = ts

    @staticmethod
    def _comm_of(pid: int) -> str | None:
        try:
            with open(f"/proc/{pid}/comm", "rb") as f:
                return f.read().rstrip(b"\n").decode()
        except OSError:
            return None
