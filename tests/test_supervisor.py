"""The Supervisor running real fleets: order, restarts, stop, reload."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time

import pytest
import uvloop

from conftest import PY, alive, child, wait_until, zombies_of
from fastorch.errors import ConfigError, EngineError, UnknownServiceError


def run(coro):
    return uvloop.run(asyncio.wait_for(coro, 30))


def test_dependent_starts_after_dependency_is_ready(fleet):
    text = f"""
[services.db]
command = {child("notify", 0.3)}
notify = true
[services.web]
command = ["sleep", "30"]
depends_on = {{ db = "ready" }}
[services.a]
command = ["sleep", "30"]
[services.b]
command = ["sleep", "30"]
"""

    async def body():
        async with fleet(text) as f:
            await f.wait_state("web", "ready")
            ready = await f.wait_event(service="db", to="ready")
            started = await f.wait_event(service="web", to="starting")
            assert started["t"] >= ready["t"]
            assert f.sup.service("db")["status_text"] == "serving"
            # Independent services start together, before db is ready.
            a = await f.wait_event(service="a", to="ready")
            b = await f.wait_event(service="b", to="ready")
            assert max(a["t"], b["t"]) < ready["t"]
        order = [s for s, _, to in f.transitions() if to == "stopping"]
        assert order.index("web") < order.index("db")
        stopped = [s for s, _, to in f.transitions() if to == "stopped"]
        assert stopped.index("web") < stopped.index("db")

    run(body())


def test_crash_restarts_with_backoff_then_start_limit(fleet):
    text = """
[services.crash]
command = ["sh", "-c", "exit 1"]
backoff = { initial = "200ms", factor = 1.0, jitter = 0.0 }
start_limit = { burst = 3, interval = "30s" }
"""

    async def body():
        async with fleet(text) as f:
            await f.wait_state("crash", "failed")
            row = f.sup.service("crash")
            assert row["reason"] == "start_limit" and row["last_exit"] == 1
            evs = [e for e in f.events if e["service"] == "crash"]
            backoffs = [e["t"] for e in evs if e["to"] == "backoff"]
            restarts = [
                e["t"]
                for e in evs
                if e["to"] == "starting" and e["reason"] == "backoff_elapsed"
            ]
            assert len(restarts) == 2
            for b, r in zip(backoffs, restarts, strict=False):
                assert r - b >= 0.19

    run(body())


def test_oneshot_completion_gates_dependent(fleet):
    text = """
[services.migrate]
command = ["sh", "-c", "sleep 0.3"]
oneshot = true
[services.app]
command = ["sleep", "30"]
depends_on = { migrate = "completed" }
"""

    async def body():
        async with fleet(text) as f:
            await f.wait_state("app", "ready")
            done = await f.wait_event(service="migrate", to="completed")
            start = await f.wait_event(service="app", to="starting")
            assert start["t"] >= done["t"]

    run(body())


def test_child_ignoring_sigterm_is_killed_after_stop_timeout(fleet):
    text = f"""
[services.stubborn]
command = {child("ignore_term")}
stop_timeout = "300ms"
"""

    async def body():
        async with fleet(text) as f:
            await f.wait_state("stubborn", "ready")
            await asyncio.sleep(0.2)  # let it install its SIGTERM handler
            t0 = time.monotonic()
            f.sup.stop(["stubborn"])
            await f.wait_state("stubborn", "stopped")
            assert time.monotonic() - t0 >= 0.29
            assert f.sup.service("stubborn")["last_exit"] == -signal.SIGKILL

    run(body())


@pytest.mark.parametrize("setsid", [False, True])
def test_stop_leaves_no_grandchild(fleet, tmp_path, setsid):
    pidfile = tmp_path / "g.pid"
    extra = ["--setsid"] if setsid else []
    text = f"""
[services.forker]
command = {child("forker", pidfile, *extra)}
stop_timeout = "2s"
"""

    async def body():
        async with fleet(text) as f:
            await wait_until(pidfile.exists)
            grandchild = int(pidfile.read_text())
            f.sup.stop(["forker"])
            await f.wait_state("forker", "stopped")
            await wait_until(lambda: not os.path.exists(f"/proc/{grandchild}"))

    run(body())


def test_no_zombie_after_200_crash_cycles(fleet):
    text = """
[services.crash]
command = ["false"]
backoff = { initial = "0s" }
start_limit = { burst = 0 }
"""

    async def body():
        async with fleet(text) as f:
            await wait_until(lambda: f.sup.service("crash")["restarts"] >= 200, 20)
            f.sup.stop(["crash"])
            await f.wait_state("crash", "stopped", timeout=10)
            await wait_until(lambda: zombies_of(os.getpid()) == [])
            assert len(f.sup.table) == 0

    run(body())


def test_missing_executable_affects_only_its_service(fleet):
    text = """
[services.ghost]
command = ["/nonexistent/fastorch-ghost"]
[services.fine]
command = ["sleep", "30"]
"""

    async def body():
        async with fleet(text) as f:
            await f.wait_state("ghost", "failed")
            await f.wait_state("fine", "ready")
            row = f.sup.service("ghost")
            assert row["reason"] == "spawn_failed"
            assert "not found" in row["status_text"]

    run(body())


BASE = """
[services.same]
command = ["sleep", "30"]
[services.changed]
command = ["sleep", "30"]
[services.gone]
command = ["sleep", "30"]
"""

NEW = """
[services.same]
command = ["sleep", "30"]
[services.changed]
command = ["sleep", "31"]
[services.added]
command = ["sleep", "30"]
"""


def test_reload_applies_the_difference(fleet):
    async def body():
        async with fleet(BASE) as f:
            for name in ("same", "changed", "gone"):
                await f.wait_state(name, "ready")
            pids = {n: f.pid(n) for n in ("same", "changed", "gone")}
            f.rewrite(NEW)
            result = await f.sup.reload()
            assert result == {
                "added": ["added"],
                "removed": ["gone"],
                "changed": ["changed"],
            }
            await f.wait_state("changed", "ready")
            await f.wait_state("added", "ready")
            assert f.pid("same") == pids["same"]
            assert f.pid("changed") != pids["changed"]
            assert not alive(pids["changed"]) and not alive(pids["gone"])
            with pytest.raises(UnknownServiceError):
                f.sup.service("gone")
            assert f.sup.service("changed")["config"]["command"][-1] == "31"

    run(body())


def test_bad_reload_leaves_the_fleet_running(fleet):
    async def body():
        async with fleet(BASE) as f:
            await f.wait_state("same", "ready")
            pids = {r["name"]: r["pid"] for r in f.sup.services()}
            f.rewrite(BASE + "\n[services.bad]\ncommand = []\nbogus_key = 1\n")
            with pytest.raises(ConfigError) as info:
                await f.sup.reload()
            assert len(info.value.problems) >= 2
            assert f.sup.stats.failed_reloads == 1
            assert {r["name"]: r["pid"] for r in f.sup.services()} == pids

    run(body())


def test_api_changes_persist_in_drop_ins(fleet):
    async def body():
        async with fleet(BASE) as f:
            await f.wait_state("same", "ready")
            await f.sup.put_service("extra", {"command": ["sleep", "30"]})
            await f.wait_state("extra", "ready")
            await f.sup.delete_service("gone")
            assert "gone" not in {r["name"] for r in f.sup.services()}
            # A reload of the unchanged main file keeps both changes.
            result = await f.sup.reload()
            assert result == {"added": [], "removed": [], "changed": []}
            names = {r["name"] for r in f.sup.services()}
            assert "extra" in names and "gone" not in names
            with pytest.raises(ConfigError):
                await f.sup.put_service("broken", {"command": []})

    run(body())


def test_control_surface(fleet):
    text = """
[services.db]
command = ["sleep", "30"]
[services.web]
command = ["sleep", "30"]
depends_on = ["db"]
"""

    async def body():
        async with fleet(text) as f:
            await f.wait_state("web", "ready")
            assert [r["name"] for r in f.sup.services(pattern="w*")] == ["web"]
            assert f.sup.graph()["levels"] == [["db"], ["web"]]
            assert '"web" -> "db"' in f.sup.graph_dot()
            old, old_web = f.pid("db"), f.pid("web")
            assert f.sup.restart(["db"]) == ["db"]
            # The dependent goes down first and comes back after db.
            await f.wait_event(**{"service": "web", "from": "stopping"})
            await f.wait_state("db", "ready")
            await f.wait_state("web", "ready")
            assert f.pid("db") != old and f.pid("web") != old_web
            f.sup.stop(["web"])
            await f.wait_state("web", "stopped")
            with pytest.raises(EngineError):
                f.sup.signal("web", signal.SIGHUP)
            with pytest.raises(UnknownServiceError):
                f.sup.start(["nope"])

    run(body())


def test_tcp_readiness_probe_gates_dependent(fleet):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    text = f"""
[services.srv]
command = {child("listen", port, 0.4)}
readiness = {{ tcp = "127.0.0.1:{port}", interval = "100ms", timeout = "200ms" }}
[services.client]
command = ["sleep", "30"]
depends_on = {{ srv = "ready" }}
"""

    async def body():
        async with fleet(text) as f:
            await f.wait_state("client", "ready")
            ready = await f.wait_event(service="srv", to="ready")
            assert ready["reason"] == "probe_ready"

    run(body())


def test_sigterm_to_real_fastorch_stops_in_order_and_exits_0(tmp_path):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(
        """
[defaults.logs]
destination = "null"
[services.db]
command = ["sleep", "30"]
[services.web]
command = ["sleep", "30"]
depends_on = ["db"]
"""
    )
    log = tmp_path / "out.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [PY, "-m", "fastorch", "run", "--no-api", str(cfg)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 15
        while "initial start settled" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            assert proc.poll() is None, log.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    web = text.index("service web: stopping -> stopped")
    db = text.index("service db: ready -> stopping")
    assert web < db, text
    assert "supervisor stopped" in text
