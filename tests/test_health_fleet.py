"""Health through a real Supervisor: probes, notify sockets, watchdog.

Every service is a real child, every probe a real socket on loopback or a
real command; the engine's rules (docs/engine.md, "Health") are checked
from the outside: states, pids, restart counters and the event stream.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import uvloop

from conftest import PY, alive, child, wait_until

BOUND = 20.0  # seconds any single test runs at most


def run(coro: Any) -> Any:
    return uvloop.run(asyncio.wait_for(coro, BOUND))


def toml(argv: list[str]) -> str:
    """A TOML array of strings (JSON strings are valid TOML strings)."""
    return json.dumps(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def probe_events(f: Any, name: str, probe: str) -> list[dict[str, Any]]:
    return [
        e
        for e in f.events
        if e["event"] == "probe" and e["service"] == name and e["probe"] == probe
    ]


def streak_before(f: Any, name: str, probe: str, to: str) -> list[bool]:
    """Results of *probe* since the last change of outcome, up to the first
    transition of *name* into *to* (probe events precede their effect)."""
    results: list[bool] = []
    for e in f.events:
        if e["service"] != name:
            continue
        if e["event"] == "transition" and e["to"] == to:
            break
        if e["event"] == "probe" and e["probe"] == probe:
            if results and results[-1] != e["ok"]:
                results = []
            results.append(e["ok"])
    else:
        raise AssertionError(f"{name} never went to {to}")
    return results


async def hold(f: Any, seconds: float) -> None:
    """Let the fleet run for *seconds*, collecting its events."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            await f._pull(deadline)
        except AssertionError:
            return


# -- readiness -----------------------------------------------------------------


def test_http_readiness_200_then_500_is_unhealthy_not_restarted(fleet, tmp_path):
    port = free_port()
    status = tmp_path / "status"
    text = f"""
[services.web]
command = {child("http_status", port, status)}
[services.web.readiness]
http = "http://127.0.0.1:{port}/ready"
interval = "100ms"
timeout = "500ms"
failure_threshold = 3
[services.early]
command = ["sleep", "30"]
depends_on = {{ web = "ready" }}
[services.late]
command = ["sleep", "30"]
autostart = false
depends_on = {{ web = "ready" }}
"""

    async def body():
        async with fleet(text) as f:
            await f.wait_state("early", "ready")
            pid, early = f.pid("web"), f.pid("early")

            status.write_text("500")
            await f.wait_event(service="web", to="unhealthy")
            row = f.sup.service("web")
            assert (row["pid"], row["restarts"]) == (pid, 0)
            assert row["ready"] is False and row["healthy"] is False
            assert row["reason"] == "probe_failed"
            assert streak_before(f, "web", "readiness", "unhealthy") == [False] * 3
            # A running dependent is left alone; a new one has to wait.
            assert f.pid("early") == early and f.state("early") == "ready"
            f.sup.start(["late"])
            await hold(f, 0.6)
            assert f.state("late") == "waiting" and f.pid("late") is None
            assert f.state("web") == "unhealthy" and f.pid("web") == pid

            status.write_text("200")
            await f.wait_state("late", "ready")
            row = f.sup.service("web")
            assert (row["state"], row["pid"], row["restarts"]) == ("ready", pid, 0)
            back = await f.wait_event(service="web", to="ready", reason="probe_ready")
            started = await f.wait_event(service="late", to="starting")
            assert started["time"] >= back["time"]
        assert f.sup.engine.info(f.sup._sid("web")).probe_failures_total >= 3

    run(body())


def test_readiness_failure_gates_dependent_and_never_restarts(fleet, tmp_path):
    flag = tmp_path / "ready-flag"
    text = f"""
[services.x]
command = ["sleep", "30"]
[services.x.readiness]
exec = ["test", "-e", "{flag}"]
interval = "50ms"
failure_threshold = 1
[services.dep]
command = ["sleep", "30"]
depends_on = {{ x = "ready" }}
"""

    async def body():
        async with fleet(text) as f:
            sid = f.sup._sid("x")
            await f.wait_state("x", "running")
            pid = f.pid("x")
            # Far past the threshold: still the same process, never ready.
            await wait_until(
                lambda: f.sup.engine.info(sid).probe_failures_total >= 8, 5
            )
            row = f.sup.service("x")
            assert (row["state"], row["pid"], row["restarts"]) == ("running", pid, 0)
            assert f.state("dep") == "waiting" and f.pid("dep") is None

            flag.touch()
            await f.wait_state("dep", "ready")
            assert f.pid("x") == pid and f.state("x") == "ready"
        assert ("x", "running", "ready") in f.transitions("x")
        assert [to for _, _, to in f.transitions("dep")][:3] == [
            "waiting",
            "starting",
            "ready",
        ]

    run(body())


def test_initial_delay_and_success_threshold(fleet, tmp_path):
    port = free_port()
    log = tmp_path / "requests"
    text = f"""
[services.web]
command = {child("http_status", port, tmp_path / "status", log)}
[services.web.readiness]
http = "http://127.0.0.1:{port}/"
initial_delay = "700ms"
interval = "100ms"
success_threshold = 3
"""

    async def body():
        async with fleet(text) as f:
            await f.wait_state("web", "ready", timeout=5)
            spawned = await f.wait_event(service="web", to="running")
            ready = await f.wait_event(service="web", to="ready")
            first = float(log.read_text().split()[0])
            # The engine's clock is whole milliseconds: allow 2 ms of rounding.
            assert first >= spawned["time"] + 0.7 - 0.002
            assert probe_events(f, "web", "readiness")[0]["time"] >= first
            assert streak_before(f, "web", "readiness", "ready") == [True] * 3
            assert ready["time"] - spawned["time"] >= 0.7 + 2 * 0.1 - 0.002

    run(body())


# -- liveness ----------------------------------------------------------------


@pytest.mark.parametrize("restart", ["on-failure", "never"])
def test_liveness_failure_past_threshold(fleet, restart):
    # A bound socket that never listens: every connect is refused at once.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        text = f"""
[services.svc]
command = ["sleep", "30"]
restart = "{restart}"
backoff = {{ initial = "50ms", jitter = 0.0 }}
[services.svc.liveness]
tcp = "127.0.0.1:{port}"
initial_delay = "200ms"
interval = "100ms"
failure_threshold = 3
"""

        async def body():
            async with fleet(text) as f:
                await f.wait_state("svc", "ready")
                pid = f.pid("svc")
                stop = await f.wait_event(
                    service="svc", to="stopping", reason="liveness_failed"
                )
                assert streak_before(f, "svc", "liveness", "stopping") == [False] * 3
                assert stop["pid"] == pid
                if restart == "never":
                    await f.wait_state("svc", "failed")
                    row = f.sup.service("svc")
                    assert row["pid"] is None and row["restarts"] == 0
                    assert row["last_exit"] == -15
                else:
                    await wait_until(lambda: f.pid("svc") not in (None, pid), 5)
                    row = f.sup.service("svc")
                    assert row["restarts"] == 1 and row["last_exit"] == -15
                    assert not alive(pid)
                detail = probe_events(f, "svc", "liveness")[0]["detail"]
                assert detail == "connect: Connection refused"

        run(body())


def test_tcp_readiness_sees_the_listener_go_away(fleet, tmp_path):
    port = free_port()
    gone = tmp_path / "close-listener"
    text = f"""
[services.srv]
command = {child("tcp_toggle", port, gone)}
readiness = {{ tcp = "127.0.0.1:{port}", interval = "100ms", failure_threshold = 2 }}
"""

    async def body():
        async with fleet(text) as f:
            await f.wait_state("srv", "ready")
            pid = f.pid("srv")
            gone.touch()
            await f.wait_event(service="srv", to="unhealthy")
            assert f.pid("srv") == pid and f.sup.service("srv")["restarts"] == 0
            assert streak_before(f, "srv", "readiness", "unhealthy") == [False] * 2
            failed = [e for e in probe_events(f, "srv", "readiness") if not e["ok"]]
            assert failed[0]["detail"] == "connect: Connection refused"

    run(body())


def test_hung_exec_probe_is_killed_with_its_group_and_counts_as_failure(
    fleet, tmp_path
):
    leader, grandchild = tmp_path / "leader", tmp_path / "grandchild"
    script = f"echo $$ > {leader}; sleep 60 & echo $! > {grandchild}; wait"
    text = f"""
[services.svc]
command = ["sleep", "30"]
[services.svc.readiness]
exec = {toml(["sh", "-c", script])}
interval = "10s"
timeout = "300ms"
failure_threshold = 1
"""

    def pid_in(path: Path) -> int:
        try:
            return int(path.read_text())
        except (OSError, ValueError):
            return 0

    async def body():
        async with fleet(text) as f:
            sid = f.sup._sid("svc")
            await wait_until(lambda: pid_in(leader) and pid_in(grandchild), 5)
            pgid, sleeper = pid_in(leader), pid_in(grandchild)
            started = time.monotonic()
            assert os.getpgid(sleeper) == pgid  # the probe leads its own group
            try:
                await wait_until(lambda: not alive(pgid) and not alive(sleeper), 3)
                assert time.monotonic() - started < 1.0
                info = f.sup.engine.info(sid)
                assert info.probe_failures_total == 1
                assert info.readiness_failures == 1
                assert f.state("svc") == "running"
                assert pgid not in f.sup.table.pids()
            finally:
                for pid in (pgid, sleeper):
                    if alive(pid):
                        os.kill(pid, 9)
        # A cancelled run reports nothing: the engine counted the timeout.
        assert probe_events(f, "svc", "readiness") == []

    run(body())


# -- notify ------------------------------------------------------------------


def test_ready_notify_releases_dependents_and_status_shows(fleet, tmp_path):
    go = tmp_path / "go"
    steps = ("send:STATUS=warming up", f"wait:{go}", "send:READY=1,STATUS=serving")
    text = f"""
[services.db]
command = {child("sd_notify", *steps)}
notify = true
[services.app]
command = ["sleep", "30"]
depends_on = {{ db = "ready" }}
"""

    async def body():
        async with fleet(text) as f:
            await wait_until(
                lambda: f.sup.service("db")["status_text"] == "warming up", 5
            )
            await hold(f, 0.3)
            assert f.state("db") == "running"
            assert f.state("app") == "waiting" and f.pid("app") is None
            assert [r["status_text"] for r in f.sup.services(pattern="db")] == [
                "warming up"
            ]

            go.touch()
            await f.wait_state("app", "ready")
            ready = await f.wait_event(service="db", to="ready")
            assert ready["reason"] == "notify_ready"
            started = await f.wait_event(service="app", to="starting")
            assert started["time"] >= ready["time"]
            assert f.sup.service("db")["status_text"] == "serving"

    run(body())


def test_watchdog_silence_restarts(fleet):
    # Pings every 200 ms for 1.5 s (longer than the 1 s watchdog), then stops.
    text = f"""
[services.svc]
command = {child("sd_notify", "ping:1.5:0.2")}
watchdog = "1s"
backoff = {{ initial = "50ms", jitter = 0.0 }}
"""

    async def body():
        async with fleet(text) as f:
            await f.wait_state("svc", "ready")
            pid = f.pid("svc")
            spawned = time.time()
            stop = await f.wait_event(
                timeout=5, service="svc", to="stopping", reason="watchdog"
            )
            # Kept alive by the pings, then killed about 1 s after the last.
            assert 2.0 <= stop["time"] - spawned <= 3.5
            await wait_until(lambda: f.pid("svc") not in (None, pid), 5)
            assert f.sup.service("svc")["restarts"] == 1

    run(body())


@pytest.mark.parametrize(
    ("configured", "usec", "low", "high"),
    [
        ("300ms", 1_500_000, 1.4, 2.5),  # longer: kept alive past 300 ms
        ("10s", 200_000, 0.15, 1.0),  # shorter: stopped long before 10 s
    ],
)
def test_watchdog_usec_changes_the_interval(fleet, configured, usec, low, high):
    text = f"""
[services.svc]
command = {child("sd_notify", f"send:WATCHDOG_USEC={usec}")}
watchdog = "{configured}"
restart = "never"
"""

    async def body():
        async with fleet(text) as f:
            await f.wait_state("svc", "ready")
            spawned = await f.wait_event(service="svc", to="ready")
            stop = await f.wait_event(
                timeout=5, service="svc", to="stopping", reason="watchdog"
            )
            assert low <= stop["time"] - spawned["time"] <= high

    run(body())


def test_watchdog_usec_zero_turns_the_watchdog_off(fleet):
    text = f"""
[services.svc]
command = {child("sd_notify", "send:WATCHDOG_USEC=0")}
watchdog = "300ms"
"""

    async def body():
        async with fleet(text) as f:
            await f.wait_state("svc", "ready")
            pid = f.pid("svc")
            await hold(f, 1.0)
            row = f.sup.service("svc")
            assert (row["state"], row["pid"], row["restarts"]) == ("ready", pid, 0)

    run(body())


@pytest.mark.parametrize("sender", ["systemd-notify", "python"])
def test_existing_sd_notify_programs_work_unchanged(fleet, sender):
    if sender == "systemd-notify":
        if shutil.which("systemd-notify") is None:
            pytest.skip("systemd-notify is not installed")
        command = ["sh", "-c", "systemd-notify --ready --status=up; exec sleep 30"]
    else:
        code = (
            "import os, socket, time; "
            "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); "
            "s.sendto(b'READY=1\\nSTATUS=up', os.environ['NOTIFY_SOCKET']); "
            "time.sleep(30)"
        )
        command = [PY, "-c", code]
    text = f"""
[services.svc]
command = {toml(command)}
notify = true
[services.dep]
command = ["sleep", "30"]
depends_on = {{ svc = "ready" }}
"""

    async def body():
        async with fleet(text) as f:
            await f.wait_state("dep", "ready")
            row = f.sup.service("svc")
            assert row["state"] == "ready" and row["status_text"] == "up"
            assert row["reason"] == "notify_ready"

    run(body())
