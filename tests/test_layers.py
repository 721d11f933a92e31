"""The shape of the house: arrows point inward (docs/architecture.md)."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).parents[1] / "src" / "fastorch"

SHELL = {"supervisor", "process", "probes", "logs", "systemd", "config"}
EDGES = {"api", "metrics", "cli", "client"}


def imports_of(path: pathlib.Path) -> set[str]:
    """Modules of the package that ``path`` imports."""
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            if parts[0] == "fastorch" and len(parts) > 1:
                found.add(parts[1])
            elif parts[0] == "fastorch":
                found.update(alias.name for alias in node.names)
            elif node.level:
                found.add(parts[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "fastorch" and len(parts) > 1:
                    found.add(parts[1])
    return found


def test_core_imports_nothing_of_the_shell():
    source = (PACKAGE / "_core.pyx").read_text()
    assert "from fastorch.errors import" in source
    for name in SHELL | EDGES:
        assert f"fastorch.{name}" not in source, name
        assert f"from . import {name}" not in source, name


def test_errors_module_imports_nothing_of_the_package():
    assert imports_of(PACKAGE / "errors.py") == set()


def test_api_and_metrics_do_not_reach_into_processes():
    for name in ("api", "metrics"):
        path = PACKAGE / f"{name}.py"
        assert "process" not in imports_of(path), name


def test_shell_does_not_import_the_edges():
    for name in SHELL:
        path = PACKAGE / f"{name}.py"
        if path.exists():
            assert not imports_of(path) & (EDGES - {"api"}), name
