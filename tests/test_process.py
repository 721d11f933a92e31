"""ProcessTable with real children: spawn, exits, signals, leftovers."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import pytest
import uvloop

from conftest import CHILDREN, alive, wait_until, zombies_of
from fastorch.errors import SpawnError
from fastorch.process import ProcessTable


def run(coro_fn, watch: str = "pidfd"):
    async def main():
        table = ProcessTable(asyncio.get_running_loop(), exit_watch=watch)
        try:
            return await asyncio.wait_for(coro_fn(table), 20)
        finally:
            table.close()

    return uvloop.run(main())


def exit_future(loop):
    fut = loop.create_future()
    return fut, lambda pid, status: fut.set_result((pid, status))


@pytest.mark.parametrize("watch", ["pidfd", "sigchld", "waitpid"])
def test_exit_code_and_signal_reach_on_exit(watch):
    async def body(table):
        loop = asyncio.get_running_loop()
        fut, cb = exit_future(loop)
        pid = table.spawn(["sh", "-c", "exit 3"], on_exit=cb)
        assert await fut == (pid, 3)

        fut, cb = exit_future(loop)
        pid = table.spawn(["sleep", "30"], on_exit=cb)
        assert os.getpgid(pid) == pid and os.getsid(pid) == pid
        assert table.signal_group(pid, signal.SIGTERM)
        assert await fut == (pid, -signal.SIGTERM)
        assert not table.signal_group(pid, signal.SIGTERM)
        assert len(table) == 0

    run(body, watch)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"argv": ["fastorch-no-such-program"]}, "not found"),
        ({"argv": ["/nonexistent/prog"]}, "not found"),
        ({"argv": ["/tmp"]}, "not executable"),
        ({"argv": ["true"], "user": "fastorch-no-such-user"}, "unknown user"),
        ({"argv": ["true"], "group": "fastorch-no-such-group"}, "unknown group"),
        ({"argv": ["true"], "cwd": "/nonexistent/dir"}, "does not exist"),
        ({"argv": ["true"], "rlimits": {"bogus": (1, 1)}}, "unknown resource"),
    ],
)
def test_spawn_errors_are_clear_and_start_nothing(kwargs, message):
    async def body(table):
        with pytest.raises(SpawnError, match=message) as info:
            table.spawn(**kwargs, on_exit=lambda pid, status: None)
        if "argv" in kwargs and len(kwargs) == 1:
            assert isinstance(info.value.__cause__, OSError)
        assert len(table) == 0

    run(body)


def test_file_without_exec_bit_is_not_executable(tmp_path):
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)

    async def body(table):
        with pytest.raises(SpawnError, match="not executable"):
            table.spawn([str(script)], on_exit=lambda pid, status: None)

    run(body)


def test_output_goes_to_the_given_fd():
    async def body(table):
        loop = asyncio.get_running_loop()
        r, w = os.pipe()
        fut, cb = exit_future(loop)
        table.spawn(["sh", "-c", "echo out; echo err >&2"], stdout=w, stderr=w,
                    on_exit=cb)  # fmt: skip
        os.close(w)
        await fut
        with os.fdopen(r, "rb") as f:
            assert sorted(f.read().split()) == [b"err", b"out"]

    run(body)


def test_user_cwd_umask_rlimits_apply(tmp_path):
    async def body(table):
        loop = asyncio.get_running_loop()
        out = tmp_path / "out"
        fd = os.open(out, os.O_WRONLY | os.O_CREAT, 0o666)
        os.chmod(tmp_path, 0o777)
        fut, cb = exit_future(loop)
        table.spawn(
            ["sh", "-c", "id -u; pwd; umask; ulimit -n"],
            cwd=str(tmp_path),
            user="nobody",
            umask=0o027,
            rlimits={"nofile": (123, 123)},
            stdout=fd,
            on_exit=cb,
        )
        os.close(fd)
        assert (await fut)[1] == 0
        lines = out.read_text().split()
        assert lines == ["65534", str(tmp_path), "0027", "123"]

    if os.geteuid() != 0:
        pytest.skip("needs root to switch users")
    run(body)


@pytest.mark.parametrize("setsid", [False, True])
def test_descendants_are_killed_with_the_service(tmp_path, setsid):
    async def body(table):
        loop = asyncio.get_running_loop()
        pidfile = tmp_path / "grandchild.pid"
        argv = [sys.executable, str(CHILDREN / "forker.py"), str(pidfile)]
        fut, cb = exit_future(loop)
        pid = table.spawn(argv + (["--setsid"] if setsid else []), on_exit=cb)
        await wait_until(pidfile.exists)
        grandchild = int(pidfile.read_text())
        assert alive(grandchild)
        table.signal_group(pid, signal.SIGTERM)
        await fut
        # Reparented to us, killed, then reaped by the SIGCHLD handler.
        await wait_until(lambda: not os.path.exists(f"/proc/{grandchild}"))

    run(body)


@pytest.mark.parametrize("watch", ["pidfd", "sigchld", "waitpid"])
def test_orphans_are_reaped(tmp_path, watch):
    async def body(table):
        loop = asyncio.get_running_loop()
        assert table.is_subreaper
        fut, cb = exit_future(loop)
        # The parent exits at once; the grandchild (new session) lives on.
        pidfile = tmp_path / "g.pid"
        argv = [sys.executable, str(CHILDREN / "forker.py"), str(pidfile)]
        table.spawn(argv + ["--setsid", "--exit"], on_exit=cb)
        await fut
        await wait_until(pidfile.exists)
        grandchild = int(pidfile.read_text())
        assert os.getsid(grandchild) == grandchild
        assert table.kill_orphans() >= 1
        await wait_until(lambda: not os.path.exists(f"/proc/{grandchild}"))
        await wait_until(lambda: zombies_of(os.getpid()) == [])
        assert table.orphans_reaped >= 1

    run(body, watch)


def test_foreign_children_are_not_reaped():
    async def body(table):
        loop = asyncio.get_running_loop()
        foreign = subprocess.Popen(["sh", "-c", "exit 7"])
        fut, cb = exit_future(loop)
        table.spawn(["sh", "-c", "sleep 0.1"], on_exit=cb)
        await fut
        await asyncio.sleep(0.05)
        # Its exit status is still there for its owner to collect.
        assert foreign.wait(timeout=5) == 7

    run(body)


def test_close_kills_and_reaps_everything():
    async def body(table):
        pids = [
            table.spawn(["sleep", "30"], on_exit=lambda p, s: None) for _ in range(5)
        ]
        table.close()
        for pid in pids:
            assert not os.path.exists(f"/proc/{pid}")
        assert zombies_of(os.getpid()) == []

    run(body)


def test_many_children_exit_once_each():
    async def body(table):
        loop = asyncio.get_running_loop()
        n = 200
        seen: dict[int, int] = {}
        done = loop.create_future()

        def on_exit(pid, status):
            seen[pid] = seen.get(pid, 0) + 1
            if len(seen) == n and not done.done():
                done.set_result(None)

        pids = {table.spawn(["true"], on_exit=on_exit) for _ in range(n)}
        await done
        assert set(seen) == pids and set(seen.values()) == {1}
        assert zombies_of(os.getpid()) == []

    run(body)


def test_fast_path_sets_cwd_and_default_signals(tmp_path):
    # The child must not inherit the supervisor's ignored SIGPIPE, nor a
    # blocked signal mask; its cwd is the one asked for.
    out = tmp_path / "out"

    async def body(table):
        loop = asyncio.get_running_loop()
        fut, cb = exit_future(loop)
        with open(out, "wb") as f:
            table.spawn(
                ["sh", "-c", "pwd; grep -E '^Sig(Ign|Blk)' /proc/self/status"],
                cwd=str(tmp_path),
                stdout=f.fileno(),
                on_exit=cb,
            )
        assert (await fut)[1] == 0

    run(body)
    lines = out.read_text().splitlines()
    assert lines[0] == str(tmp_path)
    fields = dict(line.split(":\t") for line in lines[1:])
    assert int(fields["SigBlk"], 16) == 0
    assert not int(fields["SigIgn"], 16) & (1 << (signal.SIGPIPE - 1))
