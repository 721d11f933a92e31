"""SystemdNotifier against real AF_UNIX datagram sockets (no manager needed)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator

import pytest

from fastorch import systemd
from fastorch.systemd import SystemdNotifier, scrub_environ

try:
    import systemd.daemon as sd_daemon  # noqa: F401

    HAVE_SYSTEMD_PYTHON = True
except ImportError:
    HAVE_SYSTEMD_PYTHON = False


class Receiver:
    """A bound datagram socket standing in for the service manager."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        bind_to = "\0" + address[1:] if address.startswith("@") else address
        self.sock.bind(bind_to)
        self.sock.settimeout(2.0)

    def recv(self) -> list[str]:
        return self.sock.recv(4096).decode().split("\n")

    def pending(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096)
        except BlockingIOError:
            return False
        finally:
            self.sock.settimeout(2.0)
        return True


@pytest.fixture
def path_receiver() -> Iterator[Receiver]:
    # tmp_path can exceed the 108-byte sun_path limit; /tmp stays short.
    d = tempfile.mkdtemp(prefix="fn-")
    r = Receiver(os.path.join(d, "notify"))
    yield r
    r.sock.close()
    shutil.rmtree(d)


@pytest.fixture
def abstract_receiver() -> Iterator[Receiver]:
    r = Receiver(f"@fastorch-test/{os.getpid()}/{uuid.uuid4().hex}")
    yield r
    r.sock.close()


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_fallback_sender_speaks_the_protocol(kind, path_receiver, abstract_receiver):
    receiver = path_receiver if kind == "path" else abstract_receiver
    n = SystemdNotifier({"NOTIFY_SOCKET": receiver.address})
    assert n.enabled
    assert not n._use_library

    n.ready()
    assert receiver.recv() == ["READY=1"]
    n.status("3/4 ready,\n1 starting")
    assert receiver.recv() == ["STATUS=3/4 ready, 1 starting"]
    n.stopping()
    assert receiver.recv() == ["STOPPING=1"]
    n.watchdog()
    assert receiver.recv() == ["WATCHDOG=1"]
    assert n.notify("STATUS=a", "ERRNO=5") is True
    assert receiver.recv() == ["STATUS=a", "ERRNO=5"]


def test_reloading_carries_monotonic_timestamp(path_receiver):
    n = SystemdNotifier({"NOTIFY_SOCKET": path_receiver.address})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = path_receiver.recv()
    assert first == "RELOADING=1"
    key, value = second.split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_without_notify_socket_everything_is_a_noop():
    n = SystemdNotifier({"WATCHDOG_USEC": "2000000"})
    assert not n.enabled
    assert n.watchdog_interval is None
    assert n.notify("READY=1") is False
    n.ready()
    n.status("x")
    n.watchdog()


def test_unreachable_socket_returns_false_and_does_not_raise():
    d = tempfile.mkdtemp(prefix="fn-")
    try:
        n = SystemdNotifier({"NOTIFY_SOCKET": os.path.join(d, "gone")})
        assert n.notify("READY=1") is False
        n.ready()
    finally:
        shutil.rmtree(d)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "2000000"}, 1.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "banana"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_the_timeout_for_this_pid(env, expected):
    n = SystemdNotifier({"NOTIFY_SOCKET": "@unused", **env})
    assert n.watchdog_interval == expected


def test_scheduled_watchdog_pings_from_the_loop_until_cancelled(path_receiver):
    n = SystemdNotifier(
        {"NOTIFY_SOCKET": path_receiver.address, "WATCHDOG_USEC": "40000"}
    )
    assert n.watchdog_interval == 0.02

    async def run() -> None:
        cancel = n.schedule_watchdog(asyncio.get_running_loop())
        await asyncio.sleep(0.15)
        cancel()

    asyncio.run(run())
    pings = 0
    while path_receiver.pending():
        pings += 1
    assert 3 <= pings <= 9
    time.sleep(0.05)
    assert not path_receiver.pending()


def test_scrub_environ_drops_the_managers_variables():
    env = {
        "NOTIFY_SOCKET": "/run/x",
        "WATCHDOG_USEC": "1",
        "WATCHDOG_PID": "2",
        "LISTEN_FDS": "1",
        "PATH": "/bin",
    }
    assert scrub_environ(env) == {"PATH": "/bin"}


@pytest.mark.skipif(not HAVE_SYSTEMD_PYTHON, reason="needs systemd-python")
@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_systemd_python_path_delivers(
    kind, path_receiver, abstract_receiver, monkeypatch
):
    receiver = path_receiver if kind == "path" else abstract_receiver
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.address)
    n = SystemdNotifier()
    assert n._use_library
    n.ready()
    assert receiver.recv() == ["READY=1"]
    n.reloading()
    assert receiver.recv()[0] == "RELOADING=1"
    assert n.notify("STATUS=via library") is True
    assert receiver.recv() == ["STATUS=via library"]


def test_library_is_not_used_for_another_environment(monkeypatch, path_receiver):
    # systemd-python reads the process environment, not our mapping.
    monkeypatch.setenv("NOTIFY_SOCKET", "@somewhere-else")
    n = SystemdNotifier({"NOTIFY_SOCKET": path_receiver.address})
    assert not n._use_library
    n.ready()
    assert path_receiver.recv() == ["READY=1"]


def test_module_exports():
    assert set(systemd.__all__) <= set(dir(systemd))


def test_a_receiver_that_stopped_reading_does_not_block_forever(
    path_receiver, monkeypatch
):
    monkeypatch.setattr(systemd, "_SEND_TIMEOUT_S", 0.05)
    n = SystemdNotifier({"NOTIFY_SOCKET": path_receiver.address})
    # The kernel queues a bounded number of datagrams per receiver
    # (net.unix.max_dgram_qlen); past it a send would block.
    deadline = time.monotonic() + 10
    while n.notify("WATCHDOG=1"):
        assert time.monotonic() < deadline, "the queue never filled"
    t0 = time.monotonic()
    assert n.notify("READY=1") is False
    assert time.monotonic() - t0 < 1.0
