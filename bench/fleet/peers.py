"""How to run each supervisor of the fleet bench with N ``sleep 3600`` services.

A driver writes the supervisor's configuration into a temporary directory
and returns the command that runs it in the foreground. Every control
interface is a Unix socket inside that directory; nothing listens on a
network port. Each supervisor is set to its smallest restart delay.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEERS_VENV = HERE / ".venv-peers"
SERVICE = ["sleep", "3600"]


@dataclass
class Launch:
    """The command line of a supervisor run and where its output goes."""

    argv: list[str]
    env: dict[str, str]
    log: Path


class Driver:
    """One supervisor under test."""

    name = ""
    #: Period of the supervisor's own polling, if any, in seconds. The bench
    #: waits a random fraction of it between kills so that a kill does not
    #: always land at the same phase of the poll.
    poll_period_s = 0.0
    #: Fewer crash samples for supervisors that take ~1 s per respawn.
    slow = False

    def available(self) -> str | None:
        """None when the driver can run, otherwise why not."""
        return None

    def launch(self, n: int, tmp: Path) -> Launch:
        """Write the configuration for ``n`` services under ``tmp``."""
        raise NotImplementedError

    def stop(self, pid: int) -> None:
        """Ask the supervisor to stop everything and exit."""
        os.kill(pid, signal.SIGTERM)


class SpawnLoop(Driver):
    """``os.posix_spawn`` in a loop and a waiter in ``waitpid``: the limit."""

    name = "posix_spawn"

    def launch(self, n: int, tmp: Path) -> Launch:
        argv = [sys.executable, str(HERE / "spawnloop.py"), str(n), *SERVICE]
        return Launch(argv, dict(os.environ), tmp / "spawnloop.log")


class Supervisord(Driver):
    """supervisord 4: no restart delay to set; its loop wakes once a second."""

    name = "supervisord"
    poll_period_s = 1.0
    slow = True

    def available(self) -> str | None:
        exe = PEERS_VENV / "bin" / "supervisord"
        return None if exe.exists() else f"{exe} missing: run setup_peers.sh"

    def launch(self, n: int, tmp: Path) -> Launch:
        lines = [
            "[supervisord]",
            "nodaemon=true",
            "user=root",
            f"logfile={tmp}/supervisord.log",
            f"pidfile={tmp}/supervisord.pid",
            f"childlogdir={tmp}",
            f"minfds={1024 + 4 * n}",
            f"minprocs={256 + 2 * n}",
            "",
            "[unix_http_server]",
            f"file={tmp}/supervisor.sock",
            "",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = "
            "supervisor.rpcinterface:make_main_rpcinterface",
            "",
            "[supervisorctl]",
            f"serverurl=unix://{tmp}/supervisor.sock",
            "",
        ]
        for i in range(n):
            # startsecs=0: RUNNING at spawn; startretries: never give up.
            lines += [
                f"[program:s{i}]",
                f"command={' '.join(SERVICE)}",
                "autostart=true",
                "autorestart=true",
                "startsecs=0",
                "startretries=1000000",
                "stopwaitsecs=10",
                "stdout_logfile=NONE",
                "stderr_logfile=NONE",
                "",
            ]
        conf = tmp / "supervisord.conf"
        conf.write_text("\n".join(lines))
        argv = [str(PEERS_VENV / "bin" / "supervisord"), "-c", str(conf)]
        return Launch(argv, dict(os.environ), tmp / "supervisord.out")


class Circus(Driver):
    """circus: restarts happen in the arbiter's periodic check (check_delay)."""

    name = "circus"
    check_delay_s = 0.1

    def __init__(self, check_delay_s: float = 0.1) -> None:
        self.check_delay_s = check_delay_s
        self.poll_period_s = check_delay_s

    def available(self) -> str | None:
        exe = PEERS_VENV / "bin" / "circusd"
        return None if exe.exists() else f"{exe} missing: run setup_peers.sh"

    def launch(self, n: int, tmp: Path) -> Launch:
        lines = [
            "[circus]",
            f"endpoint = ipc://{tmp}/endpoint.sock",
            f"pubsub_endpoint = ipc://{tmp}/pubsub.sock",
            "statsd = False",
            "httpd = False",
            f"check_delay = {self.check_delay_s}",
            "",
        ]
        for i in range(n):
            lines += [
                f"[watcher:s{i}]",
                f"cmd = {SERVICE[0]}",
                f"args = {' '.join(SERVICE[1:])}",
                "numprocesses = 1",
                "warmup_delay = 0",
                "respawn = True",
                "max_retry = -1",
                "graceful_timeout = 10",
                "copy_env = True",
                "",
            ]
        conf = tmp / "circus.ini"
        conf.write_text("\n".join(lines))
        argv = [
            str(PEERS_VENV / "bin" / "circusd"),
            "--log-output",
            str(tmp / "circus.log"),
            str(conf),
        ]
        return Launch(argv, dict(os.environ), tmp / "circus.out")


class Fastorch(Driver):
    """fastorch: zero backoff, no start limit."""

    name = "fastorch"

    def available(self) -> str | None:
        # In a child, so that a half-built package cannot touch the bench.
        probe = subprocess.run(
            [sys.executable, "-c", "import fastorch.cli, fastorch._core"],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        if probe.returncode != 0:
            last = (probe.stderr.strip().splitlines() or ["?"])[-1]
            return f"fastorch does not import: {last}"
        return None

    @staticmethod
    def _env() -> dict[str, str]:
        # An in-place build (pip install -e) works without it; a source
        # tree with a built _core works with it.
        env = dict(os.environ)
        src = str(HERE.parent.parent / "src")
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (src, env.get("PYTHONPATH")) if p
        )
        return env

    def launch(self, n: int, tmp: Path) -> Launch:
        command = ", ".join(f'"{part}"' for part in SERVICE)
        # Service output goes nowhere, as with the peers' NONE/no stream.
        lines = [
            "[supervisor]",
            f'api_socket = "{tmp}/api.sock"',
            "",
            "[defaults]",
            'restart = "always"',
            'backoff = { initial = "0s", jitter = 0.0 }',
            "start_limit = { burst = 0 }",
            'logs = { destination = "null" }',
            "",
        ]
        for i in range(n):
            lines += [f"[services.s{i}]", f"command = [{command}]", ""]
        conf = tmp / "fleet.toml"
        conf.write_text("\n".join(lines))
        argv = [sys.executable, "-m", "fastorch", "run", str(conf)]
        env = self._env()
        env.pop("NOTIFY_SOCKET", None)
        env["FASTORCH_RUNTIME_DIR"] = str(tmp)
        return Launch(argv, env, tmp / "fastorch.out")


def drivers(circus_check_delay_s: float = 0.1) -> dict[str, Driver]:
    """Every driver by name, the limit first."""
    found: list[Driver] = [
        SpawnLoop(),
        Fastorch(),
        Supervisord(),
        Circus(circus_check_delay_s),
    ]
    return {d.name: d for d in found}
