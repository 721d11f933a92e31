"""systemd/fastorch.service under a real ``systemd --user`` manager.

The repo's unit is linked as is; a drop-in replaces ExecStart with this
interpreter running ``python -m fastorch run`` on a small fleet, and
shortens the watchdog and the restart delay.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator

import pytest

from harness.usermanager import REPO, UserManager, skip_reason

pytestmark = pytest.mark.systemd

UNIT = "fastorch.service"
UNIT_FILE = os.path.join(REPO, "systemd", UNIT)

# A fleet member: notes its start and its SIGTERM in a shared file; with
# "notify" it sends READY=1 after a second, so READY of fastorch must wait.
SERVICE_SCRIPT = r"""
import os, signal, socket, sys, time

name = os.environ["FASTORCH_SERVICE"]
events = sys.argv[1]

def note(what):
    with open(events, "a") as f:
        f.write(f"{what} {name} {os.getpid()}\n")

def term(*_):
    note("stop")
    sys.exit(0)

signal.signal(signal.SIGTERM, term)
note("start")
if sys.argv[2:] == ["notify"]:
    time.sleep(1.0)
    addr = os.environ["NOTIFY_SOCKET"]
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(b"READY=1", addr)
while True:
    time.sleep(1)
"""


def fleet_toml(root: str, extra: str = "") -> str:
    cmd = f'["{sys.executable}", "{root}/svc.py", "{root}/events.log"'
    return textwrap.dedent(
        f"""\
        [defaults]
        restart = "on-failure"
        stop_timeout = "5s"
        logs = {{ destination = "null" }}

        [services.db]
        command = {cmd}]

        [services.cache]
        command = {cmd}, "notify"]
        notify = true

        [services.api]
        command = {cmd}]
        depends_on = {{ db = "ready", cache = "ready" }}

        [services.web]
        command = {cmd}]
        depends_on = {{ api = "ready" }}
        """
    ) + textwrap.dedent(extra)


class Fleet:
    """The manager, the unit and the files of the fleet under test."""

    def __init__(self, manager: UserManager) -> None:
        self.m = manager
        self.root = os.path.join(manager.root, "fleet")
        os.makedirs(self.root)
        with open(os.path.join(self.root, "svc.py"), "w") as f:
            f.write(SERVICE_SCRIPT)
        self.config = os.path.join(self.root, "fleet.toml")

    def write_config(self, extra: str = "") -> None:
        with open(self.config, "w") as f:
            f.write(fleet_toml(self.root, extra))

    def events(self) -> list[tuple[str, str, int]]:
        try:
            with open(os.path.join(self.root, "events.log")) as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return []
        return [(w, n, int(p)) for w, n, p in (line.split() for line in lines)]

    def wait_events(
        self, what: str, names: set[str], timeout: float = 10.0
    ) -> list[tuple[str, str, int]]:
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events() if e[0] == what and e[1] in names]
            if {e[1] for e in found} >= names:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} of {names}: {self.events()}")
            time.sleep(0.05)

    def reset(self) -> None:
        with open(os.path.join(self.root, "events.log"), "w"):
            pass
        self.write_config()

    def props(self, *names: str) -> dict[str, str]:
        return self.m.show(UNIT, *names)


def unit_drop_in(config: str, pythonpath: str) -> str:
    text = textwrap.dedent(
        f"""\
        [Service]
        ExecStart=
        ExecStart={sys.executable} -m fastorch run {config}
        Environment=FASTORCH_TEST_HOOKS=1 PYTHONPATH={pythonpath}
        WatchdogSec=2s
        RestartSec=200ms
        TimeoutStartSec=30s
        TimeoutStopSec=30s
        LimitCORE=0
        """
    )
    # The shipped PrivateTmp=yes gives the unit an empty /tmp: a checkout,
    # a virtualenv or this fleet's files living there would vanish.
    paths = (sys.executable, os.path.realpath(sys.executable), config, pythonpath)
    if any(p.startswith(("/tmp/", "/var/tmp/")) for p in paths):
        text += "PrivateTmp=no\n"
    return text


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    with UserManager() as m:
        f = Fleet(m)
        f.write_config()
        m.link(UNIT_FILE)
        m.drop_in(UNIT, "50-test", unit_drop_in(f.config, f"{REPO}/src"))
        yield f


@pytest.fixture
def unit(fleet: Fleet) -> Iterator[Fleet]:
    """The unit stopped, its failure state cleared and the fleet reset."""
    fleet.m.systemctl("stop", UNIT)
    fleet.m.systemctl("reset-failed", UNIT, check=False)
    fleet.reset()
    yield fleet
    fleet.m.systemctl("stop", UNIT, check=False)


def test_unit_file_verifies_without_a_word(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("needs systemd-analyze")
    with open(UNIT_FILE) as f:
        text = f.read()
    # verify checks that ExecStart's binary exists; keep the rest as shipped.
    assert "ExecStart=/usr/local/bin/fastorch run /etc/fastorch/fastorch.toml" in text
    good = text.replace("/usr/local/bin/fastorch", sys.executable)
    bad = good.replace("ProtectSystem=full", "ProtectSystm=full")
    assert _verify(tmp_path, good) == ""
    assert "ProtectSystm" in _verify(tmp_path, bad)


def _verify(tmp_path, text: str) -> str:
    d = tempfile.mkdtemp(dir=tmp_path)
    path = os.path.join(d, UNIT)
    with open(path, "w") as f:
        f.write(text)
    argv = ["systemd-analyze", "verify", "--man=no", path]
    if os.geteuid() == 0 and shutil.which("unshare"):
        # verify touches /run/systemd/systemd-units-load: keep it private.
        script = 'mount -t tmpfs tmpfs /run/systemd && exec "$@"'
        argv = ["unshare", "--mount", "sh", "-c", script, "verify", *argv]
    env = {**os.environ, "LIBMOUNT_UTAB": os.path.join(d, "utab")}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env)
    return (done.stdout + done.stderr).strip()


def test_start_returns_after_ready_with_the_summary(unit):
    t0 = time.monotonic()
    unit.m.systemctl("start", UNIT)
    elapsed = time.monotonic() - t0

    # cache sends READY=1 after 1 s; api and web wait for it, fastorch too.
    assert elapsed >= 1.0
    props = unit.props("ActiveState", "SubState", "StatusText", "NRestarts")
    assert props["ActiveState"] == "active"
    assert props["SubState"] == "running"
    assert props["NRestarts"] == "0"
    assert re.fullmatch(r"4/4 ready, 0 starting, 0 failed", props["StatusText"])
    unit.wait_events("start", {"db", "cache", "api", "web"})
    # RuntimeDirectory= and FASTORCH_RUNTIME_DIR put the API socket in %t.
    unit.m.run(["test", "-S", "/run/systemd/user/fastorch/api.sock"])


def test_own_log_lands_in_the_journal_with_fields(unit):
    unit.m.systemctl("start", UNIT)
    main_pid = unit.props("MainPID")["MainPID"]

    # The journal is shared by the module's tests: match this run's PID.
    (entry,) = unit.m.wait_for(
        _SYSTEMD_USER_UNIT=UNIT,
        _PID=main_pid,
        FASTORCH_SERVICE="web",
        FASTORCH_TO="ready",
    )
    assert entry["SYSLOG_IDENTIFIER"] == "fastorch"
    assert entry["FASTORCH_FROM"] in ("starting", "running")
    assert entry["PRIORITY"] == "6"
    assert re.fullmatch(r"[0-9a-f]{32}", entry["MESSAGE_ID"])
    assert entry["FASTORCH_PID"].isdigit()
    assert "web" in entry["MESSAGE"]


def test_reload_applies_the_new_config_in_place(unit):
    unit.m.systemctl("start", UNIT)
    before = unit.props("MainPID", "NRestarts")
    unit.write_config(
        f"""
        [services.extra]
        command = ["{sys.executable}", "{unit.root}/svc.py", "{unit.root}/events.log"]
        """
    )

    unit.m.systemctl("reload", UNIT)

    unit.wait_events("start", {"extra"})
    after = unit.m.wait_for_state(UNIT, ActiveState="active", SubState="running")
    assert unit.props("MainPID", "NRestarts") == before
    unit.m.wait_for(
        _SYSTEMD_USER_UNIT=UNIT, _PID=before["MainPID"], FASTORCH_SERVICE="extra"
    )
    assert after["ActiveState"] == "active"
    # The old services kept their processes.
    assert [e[1] for e in unit.events() if e[0] == "stop"] == []


def test_reload_with_a_broken_config_keeps_the_fleet(unit):
    unit.m.systemctl("start", UNIT)
    unit.wait_events("start", {"db", "cache", "api", "web"})
    before = unit.props("MainPID", "NRestarts")
    with open(unit.config, "a") as f:
        f.write('\n[services.web2]\ncommand = ["x"]\nrestart = "sometimes"\n')

    unit.m.systemctl("reload", UNIT)

    (entry,) = unit.m.wait_for(
        _SYSTEMD_USER_UNIT=UNIT, _PID=before["MainPID"], PRIORITY="3"
    )
    assert entry["MESSAGE"].startswith("reload refused: services.web2.restart")
    # RELOADING=1 was answered by READY=1: the unit is back to running.
    unit.m.wait_for_state(UNIT, ActiveState="active", SubState="running")
    assert unit.props("MainPID", "NRestarts") == before
    assert [e for e in unit.events() if e[0] == "stop"] == []


def test_stop_is_ordered_and_leaves_no_process(unit):
    unit.m.systemctl("start", UNIT)
    unit.wait_events("start", {"db", "cache", "api", "web"})
    pids = unit.m.unit_pids(UNIT)
    assert len(pids) == 5  # fastorch and its four children
    main_pid = unit.props("MainPID")["MainPID"]

    unit.m.systemctl("stop", UNIT)

    props = unit.props("ActiveState", "Result")
    assert props == {"ActiveState": "inactive", "Result": "success"}
    stops = [e[1] for e in unit.events() if e[0] == "stop"]
    assert stops.index("web") < stops.index("api")
    assert stops.index("api") < min(stops.index("db"), stops.index("cache"))
    assert sorted(stops) == ["api", "cache", "db", "web"]
    assert [p for p in pids if _alive(p)] == []
    assert unit.m.unit_pids(UNIT) == []
    # The transition that ended web's process says how it ended.
    (entry,) = unit.m.wait_for(
        _SYSTEMD_USER_UNIT=UNIT,
        _PID=main_pid,
        FASTORCH_SERVICE="web",
        FASTORCH_TO="stopped",
    )
    assert entry["FASTORCH_FROM"] == "stopping"
    assert int(entry["FASTORCH_EXIT"]) in (0, -15)


def test_hung_loop_is_killed_by_the_watchdog_and_restarted(unit):
    unit.m.systemctl("start", UNIT)
    first = unit.props("MainPID")["MainPID"]
    unit.wait_events("start", {"db", "cache", "api", "web"})
    old_pids = unit.m.unit_pids(UNIT)  # host view, fastorch and its children
    assert len(old_pids) == 5

    # FASTORCH_TEST_HOOKS=1: SIGUSR2 blocks fastorch's event loop.
    unit.m.systemctl("kill", "--kill-who=main", "--signal=SIGUSR2", UNIT)

    _wait_manager_says(unit.m, "Watchdog timeout (limit 2s)!")
    props = unit.m.wait_for_state(
        UNIT, timeout=20, NRestarts="1", ActiveState="active", SubState="running"
    )
    assert unit.props("MainPID")["MainPID"] != first
    assert props["NRestarts"] == "1"
    # The fleet came back with new processes, and the old ones are gone.
    deadline = time.monotonic() + 10
    while True:
        starts = [e for e in unit.events() if e[0] == "start"]
        if len(starts) >= 8 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    names = sorted(e[1] for e in starts)
    assert names == sorted(["db", "cache", "api", "web"] * 2)
    assert [p for p in old_pids if _alive(p)] == []
    new_pids = unit.m.unit_pids(UNIT)
    assert len(new_pids) == 5
    assert not set(new_pids) & set(old_pids)


def _wait_manager_says(m: UserManager, text: str, timeout: float = 10.0) -> None:
    # The manager's own lines about a unit carry USER_UNIT=.
    deadline = time.monotonic() + timeout
    while True:
        messages = [e.get("MESSAGE", "") for e in m.entries(USER_UNIT=UNIT)]
        if any(text in msg for msg in messages if isinstance(msg, str)):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"manager never said {text!r}: {messages[-10:]}")
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    # A host PID (from the cgroup files), not one from inside the namespace.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_child_output_goes_straight_to_the_journal(unit):
    tag = f"talk-{time.monotonic_ns()}"
    code = (
        f"import sys; print('{tag} out', flush=True); "
        f"print('{tag} err', file=sys.stderr)"
    )
    unit.write_config(
        f"""
        [services.talker]
        command = ["{sys.executable}", "-c", "{code}"]
        oneshot = true
        logs = {{ destination = "journal" }}
        """
    )
    unit.m.systemctl("start", UNIT)

    err, out = sorted(_wait_messages(unit.m, tag, count=2), key=lambda e: e["MESSAGE"])
    assert out["MESSAGE"] == f"{tag} out"
    assert err["MESSAGE"] == f"{tag} err"
    for entry in (out, err):
        assert entry["SYSLOG_IDENTIFIER"] == "talker"
        assert entry["_TRANSPORT"] == "stdout"
        # The child's own stream, in the unit's cgroup: not copied by fastorch.
        assert entry["_SYSTEMD_USER_UNIT"] == UNIT
        assert entry["_PID"] != unit.props("MainPID")["MainPID"]
    assert int(err["PRIORITY"]) < int(out["PRIORITY"])

    # `fastorch logs` reads those lines back from the journal.
    done = unit.m.run(
        [sys.executable, "-m", "fastorch", "logs", "talker", "-n", "10",
         "--socket", "/run/systemd/user/fastorch/api.sock"]
    )  # fmt: skip
    assert f"{tag} out" in done.stdout.splitlines()
    assert f"{tag} err" in done.stdout.splitlines()


def _wait_messages(m: UserManager, prefix: str, count: int, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        found = [
            e
            for e in m.entries(_SYSTEMD_USER_UNIT=UNIT, _TRANSPORT="stdout")
            if isinstance(e.get("MESSAGE"), str) and e["MESSAGE"].startswith(prefix)
        ]
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(found)} of {count} lines {prefix!r}")
        time.sleep(0.05)


def test_own_protocol_code_satisfies_the_manager(unit):
    # A "systemd" package that fails to import, ahead of systemd-python on
    # the path, makes fastorch use its own sd_notify sender.
    shim = os.path.join(unit.root, "no-systemd-python")
    os.makedirs(os.path.join(shim, "systemd"), exist_ok=True)
    with open(os.path.join(shim, "systemd", "__init__.py"), "w") as f:
        f.write("raise ImportError('systemd-python hidden for this test')\n")
    probe = "import fastorch.systemd as s; assert s._sd_daemon is None"
    env = {**os.environ, "PYTHONPATH": f"{shim}:{REPO}/src"}
    subprocess.run([sys.executable, "-c", probe], env=env, check=True, timeout=30)
    path = unit.m.drop_in(
        UNIT, "60-no-library", unit_drop_in(unit.config, env["PYTHONPATH"])
    )
    try:
        unit.m.systemctl("start", UNIT)
        props = unit.props("SubState", "StatusText", "MainPID")
        assert props["SubState"] == "running"
        assert props["StatusText"] == "4/4 ready, 0 starting, 0 failed"
        environ = unit.m.run(["cat", f"/proc/{props['MainPID']}/environ"]).stdout
        assert f"PYTHONPATH={shim}:" in environ

        # Pings keep it alive past WatchdogSec=2s.
        time.sleep(3.0)
        assert unit.props("NRestarts", "MainPID", "SubState") == {
            "NRestarts": "0",
            "MainPID": props["MainPID"],
            "SubState": "running",
        }

        unit.m.systemctl("stop", UNIT)
        assert unit.props("Result")["Result"] == "success"
    finally:
        os.unlink(path)
        unit.m.systemctl("daemon-reload")
