"""The fastorch command: check, graph, run's refusal of a bad config."""

from __future__ import annotations

import subprocess
import sys

from fastorch.cli import demo_config_path, main

GOOD = """
[defaults.logs]
destination = "null"
[services.db]
command = ["sleep", "30"]
[services.web]
command = ["sleep", "30"]
depends_on = { db = "ready" }
"""

BAD = """
[services.a]
command = []
[services.b]
command = ["sleep", "1"]
depends_on = ["nope"]
"""


def test_check_prints_start_levels(tmp_path, capsys):
    cfg = tmp_path / "good.toml"
    cfg.write_text(GOOD)
    assert main(["check", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "level 0: db" in out and "level 1: web" in out


def test_check_reports_every_error(tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(BAD)
    assert main(["check", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "services.a.command" in err
    assert "services.b.depends_on.nope" in err


def test_graph_prints_dot(tmp_path, capsys):
    cfg = tmp_path / "good.toml"
    cfg.write_text(GOOD)
    assert main(["graph", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("digraph") and "web" in out and "db" in out


def test_run_refuses_a_bad_config_before_starting(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(BAD)
    proc = subprocess.run(
        [sys.executable, "-m", "fastorch", "run", "--no-api", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1
    assert "services.a.command" in proc.stderr


def test_demo_config_is_packaged_and_valid(capsys):
    assert main(["check", demo_config_path()]) == 0
