"""A real ``fastorch run`` process under signals: a second SIGINT, PID 1."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import CHILDREN, PY, alive, children_of, zombies_of


def start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)


def wait_text(proc: subprocess.Popen[bytes], log: Path, text: str) -> None:
    deadline = time.monotonic() + 20
    while text not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()
        assert proc.poll() is None, log.read_text()
        time.sleep(0.05)


def finish(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_second_sigint_kills_the_groups_at_once(tmp_path):
    # stubborn ignores SIGTERM and has a long stop timeout: only the second
    # SIGINT can end the stop early.
    pidfile = tmp_path / "pid"
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(
        f"""
[defaults.logs]
destination = "null"
[services.stubborn]
command = ["sh", "-c", "echo $$ > {pidfile}; exec {PY} {CHILDREN}/ignore_term.py"]
stop_timeout = "60s"
"""
    )
    log = tmp_path / "out.log"
    proc = start([PY, "-m", "fastorch", "run", "--no-api", str(cfg)], log)
    try:
        wait_text(proc, log, "initial start settled")
        child = int(pidfile.read_text())
        time.sleep(0.3)  # let the child install its SIGTERM handler
        proc.send_signal(signal.SIGINT)
        wait_text(proc, log, "stubborn: ready -> stopping")
        time.sleep(0.5)
        assert alive(child), "the child must survive SIGTERM"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - t0 < 5
        assert not alive(child)
        assert "second SIGINT: killing every process group" in log.read_text()
    finally:
        finish(proc)


needs_pidns = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="a new PID namespace needs root and unshare(1)",
)


@needs_pidns
def test_as_pid1_orphans_are_reaped_and_sigterm_stops_the_fleet(tmp_path):
    # In its own PID namespace fastorch is PID 1: every orphan of the
    # namespace is its child. A service double-forks a short-lived orphan
    # many times; none may stay a zombie, and SIGTERM still stops in order.
    cfg = tmp_path / "cfg.toml"
    marker = tmp_path / "orphans"
    script = (
        f"for i in $(seq 20); do (sleep 0.05 &); done; touch {marker}; exec sleep 60"
    )
    cfg.write_text(
        f"""
[defaults.logs]
destination = "null"
[services.db]
command = ["sleep", "60"]
[services.spawner]
depends_on = ["db"]
command = ["sh", "-c", "{script}"]
"""
    )
    log = tmp_path / "out.log"
    argv = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
    proc = start(argv + [PY, "-m", "fastorch", "run", "--no-api", str(cfg)], log)
    try:
        wait_text(proc, log, "initial start settled")
        deadline = time.monotonic() + 10
        while not marker.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # fastorch is the only child of unshare, and PID 1 inside.
        inner = children_of(proc.pid)
        assert len(inner) == 1
        fastorch = inner[0]
        assert _ns_pid(fastorch) == 1
        time.sleep(0.5)  # every orphan has exited by now
        deadline = time.monotonic() + 5
        while zombies_of(fastorch):
            assert time.monotonic() < deadline, zombies_of(fastorch)
            time.sleep(0.05)
        os.kill(fastorch, signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        text = log.read_text()
        assert text.index("spawner: stopping -> stopped") < text.index(
            "db: ready -> stopping"
        )
    finally:
        finish(proc)


def _ns_pid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    raise AssertionError("no NSpid line")
