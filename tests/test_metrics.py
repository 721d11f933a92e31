"""Prometheus metrics of a real fleet, checked by promtool and by parsing."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from fastorch import config as configmod
from fastorch.metrics import MetricsExporter, exit_kind
from fastorch.supervisor import Supervisor

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool (Debian package prometheus) not installed"
)

FLEET = """
[defaults.logs]
destination = "null"

[services.steady]
command = ["sleep", "600"]

[services.once]
command = ["true"]
oneshot = true

[services.crasher]
command = ["sh", "-c", "exit 3"]
restart = "never"

[services.unready]
command = ["sleep", "600"]
readiness = { tcp = "127.0.0.1:9", interval = "50ms", timeout = "50ms" }
"""


async def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    """Poll ``predicate`` until true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)


def scrape_fleet(tmp_path: Path, text: str, body: Any) -> Any:
    """Run ``body(supervisor, exporter)`` on a running fleet; its result."""
    path = tmp_path / "fleet.toml"
    path.write_text(text)

    async def main() -> Any:
        async with asyncio.timeout(30):
            sup = Supervisor(configmod.load(path), handle_signals=False)
            task = asyncio.get_running_loop().create_task(sup.run())
            exporter = MetricsExporter(sup)
            exporter.start()
            try:
                return await body(sup, exporter)
            finally:
                await exporter.aclose()
                await asyncio.wait_for(sup.shutdown(), 15)
                await asyncio.wait_for(task, 15)

    return uvloop.run(main())


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, keyed by name and label set."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(parsed: dict[Any, float], name: str, **labels: str) -> float:
    return parsed[(name, frozenset(labels.items()))]


def test_exit_kind() -> None:
    assert exit_kind(None) is None
    assert exit_kind(0) == "success"
    assert exit_kind(3) == "failure"
    assert exit_kind(-9) == "signal"


def test_metrics_read_the_fleet(tmp_path: Path) -> None:
    async def body(sup: Supervisor, exporter: MetricsExporter) -> str:
        await wait_until(lambda: sup.service("once")["state"] == "completed")
        await wait_until(lambda: sup.service("crasher")["state"] == "failed")
        await wait_until(lambda: sup.service("steady")["state"] == "ready")
        info = sup.engine.info(sup.engine.sid("unready"))
        await wait_until(lambda: info.probe_failures_total >= 2 or _refresh(sup))
        pid = sup.service("steady")["pid"]
        sup.signal("steady", 9)
        await wait_until(lambda: sup.service("steady")["restarts"] == 1)
        await wait_until(lambda: sup.service("steady")["state"] == "ready")
        # Let the exit counter's task take the events published so far.
        await asyncio.sleep(0.05)
        assert pid != sup.service("steady")["pid"]
        return exporter.render().decode()

    text = scrape_fleet(tmp_path, FLEET, body)
    parsed = samples(text)

    assert value(parsed, "fastorch_service_up", service="steady") == 1
    assert value(parsed, "fastorch_service_up", service="once") == 0
    assert value(parsed, "fastorch_service_ready", service="steady") == 1
    assert value(parsed, "fastorch_service_ready", service="unready") == 0
    assert value(parsed, "fastorch_service_state", service="crasher", state="failed")
    assert value(parsed, "fastorch_service_state", service="unready", state="running")
    # One series per service: the current state only.
    states = [k for k in parsed if k[0] == "fastorch_service_state"]
    assert len(states) == 4

    assert value(parsed, "fastorch_service_restarts_total", service="steady") == 1
    exits = "fastorch_service_exits_total"
    assert value(parsed, exits, service="steady", kind="signal") == 1
    assert value(parsed, exits, service="steady", kind="failure") == 0
    assert value(parsed, exits, service="once", kind="success") == 1
    assert value(parsed, exits, service="crasher", kind="failure") == 1
    probe_failures = "fastorch_service_probe_failures_total"
    assert value(parsed, probe_failures, service="unready") >= 2
    assert value(parsed, probe_failures, service="steady") == 0
    since = value(
        parsed, "fastorch_service_last_transition_timestamp_seconds", service="steady"
    )
    assert abs(since - time.time()) < 30

    by_state = {
        dict(labels)["state"]: v
        for (name, labels), v in parsed.items()
        if name == "fastorch_services"
    }
    assert sum(by_state.values()) == 4
    assert by_state["failed"] == 1 and by_state["completed"] == 1

    assert value(parsed, "fastorch_probe_duration_seconds_count", kind="tcp") >= 2
    assert ("process_resident_memory_bytes", frozenset()) in parsed
    assert ("fastorch_event_loop_lag_seconds_count", frozenset()) in parsed


def _refresh(sup: Supervisor) -> bool:
    # ServiceInfo is a snapshot: read it again on every poll.
    return sup.engine.info(sup.engine.sid("unready")).probe_failures_total >= 2


def test_loop_lag_histogram_only_grows(tmp_path: Path) -> None:
    async def body(sup: Supervisor, exporter: MetricsExporter) -> list[float]:
        counts = []
        for _ in range(2):
            sup.stats.loop_lag.extend([0.0002, 0.003, 0.2])
            parsed = samples(exporter.render().decode())
            counts.append(value(parsed, "fastorch_event_loop_lag_seconds_count"))
            counts.append(
                value(parsed, "fastorch_event_loop_lag_seconds_bucket", le="0.005")
            )
        return counts

    total1, low1, total2, low2 = scrape_fleet(tmp_path, FLEET, body)
    assert total1 >= 3 and low1 >= 2
    assert total2 >= total1 + 3 and low2 >= low1 + 2


@needs_promtool
def test_output_passes_promtool(tmp_path: Path) -> None:
    async def body(sup: Supervisor, exporter: MetricsExporter) -> bytes:
        await wait_until(lambda: sup.service("crasher")["state"] == "failed")
        sup.stats.loop_lag.append(0.001)
        return exporter.render()

    text = scrape_fleet(tmp_path, FLEET, body)
    result = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert b"fastorch_service_exits_total" in text


@needs_promtool
def test_alerting_rules_pass_promtool() -> None:
    result = subprocess.run(
        [PROMTOOL, "check", "rules", str(DEPLOY / "prometheus-rules.yml")],
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    result = subprocess.run(
        [PROMTOOL, "test", "rules", str(DEPLOY / "prometheus-rules.test.yml")],
        capture_output=True,
        timeout=60,
        cwd=DEPLOY,
    )
    assert result.returncode == 0, result.stdout + result.stderr


_METRIC = re.compile(r"\b((?:fastorch|process)_[a-z_]+)")
_SUFFIXES = ("_bucket", "_count", "_sum")


def _exported_names(tmp_path: Path) -> set[str]:
    async def body(sup: Supervisor, exporter: MetricsExporter) -> bytes:
        return exporter.render()

    text = scrape_fleet(tmp_path, FLEET, body).decode()
    return {
        line.split("{")[0].split()[0] for line in text.splitlines() if line[:1] != "#"
    }


def test_dashboard_and_rules_use_only_exported_metrics(tmp_path: Path) -> None:
    exported = _exported_names(tmp_path)
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]
    assert exprs
    rules = (DEPLOY / "prometheus-rules.yml").read_text()
    used = set(_METRIC.findall(rules + "\n".join(exprs)))
    missing = {
        name
        for name in used
        if name not in exported
        and not name.endswith(_SUFFIXES)
        and not any(name + s in exported for s in _SUFFIXES)
    }
    assert missing == set()
