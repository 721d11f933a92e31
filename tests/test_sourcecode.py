"""The linters and the type checker, run as tests (as uvloop does)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def run(*argv: str) -> None:
    args = list(argv) if argv[0] == "-c" else ["-m", *argv]
    done = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_finds_nothing():
    run("ruff", "check", "src", "tests", "bench")


def test_ruff_format_is_applied():
    run("ruff", "format", "--check", "src", "tests", "bench")


def test_mypy_checks_the_shell_and_the_stubs():
    run("mypy", "--no-incremental", "src/fastorch")


def test_cython_lint_finds_nothing():
    pyx = sorted(
        str(p.relative_to(ROOT))
        for pattern in ("*.pyx", "*.pxi")
        for p in (ROOT / "src").rglob(pattern)
    )
    assert pyx
    # cython-lint has no __main__: call its console entry point.
    entry = "import sys; from cython_lint.cython_lint import main; sys.exit(main())"
    run("-c", entry, "--max-line-length", "88", *pyx)
