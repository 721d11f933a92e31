"""The ``fastorch`` command: run, check, graph (and the API client's verbs).

Subcommands register themselves on one argparse parser: each is a function
``add_<name>(subparsers)`` that sets ``func`` (returning the exit code).
The API client adds its own through ``fastorch.client.add_subcommands``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from importlib import resources

from fastorch.errors import ConfigError

__all__ = ["main", "build_parser"]

logger = logging.getLogger(__name__)


def demo_config_path() -> str:
    """Path of the packaged demo, ``fastorch/examples/demo.toml``."""
    ref = resources.files("fastorch") / "examples" / "demo.toml"
    return str(ref)


def _load(path: str):  # -> fastorch.config.Config
    from fastorch import config as configmod

    return configmod.load(path)


def _print_problems(path: str, exc: ConfigError) -> None:
    print(f"{path}: invalid configuration", file=sys.stderr)
    for where, reason in exc.problems:
        print(f"  {where}: {reason}" if where else f"  {reason}", file=sys.stderr)


# -- run ---------------------------------------------------------------------


def add_run(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("run", help="supervise the services of a config")
    p.add_argument("config", nargs="?", help="TOML file (default: the demo)")
    p.add_argument("--log-level", default=None, help="debug, info, warning, ...")
    p.add_argument("--no-api", action="store_true", help="do not serve the control API")
    p.set_defaults(func=cmd_run)


def _setup_logging(level: str) -> None:
    try:
        from fastorch.systemd import setup_logging
    except ImportError:
        logging.basicConfig(
            level=level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
    else:
        setup_logging(level)


def cmd_run(args: argparse.Namespace) -> int:
    """Load, validate, then supervise until SIGTERM/SIGINT; exit 0."""
    import uvloop

    path = args.config or demo_config_path()
    try:
        cfg = _load(path)
    except ConfigError as exc:
        _print_problems(path, exc)
        return 1
    _setup_logging(args.log_level or cfg.supervisor.log_level)

    async def main() -> None:
        from fastorch.supervisor import Supervisor

        # This process starts no child but through the supervisor's table,
        # so exits are reaped with waitpid(-1): no descriptor per child.
        sup = Supervisor(cfg, api=not args.no_api, exit_watch="waitpid")
        await sup.run()

    uvloop.run(main())
    # Everything is stopped, reaped and closed. Skip the interpreter's
    # teardown of every module (about 40 ms with the API loaded), which a
    # stop under systemd or in the fleet bench would wait for.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# -- check, graph ------------------------------------------------------------


def add_check(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("check", help="validate a config, show start order")
    p.add_argument("config")
    p.set_defaults(func=cmd_check)


def cmd_check(args: argparse.Namespace) -> int:
    """Validate; print the start order by levels; 1 with every error."""
    from fastorch import config as configmod

    try:
        cfg = _load(args.config)
    except ConfigError as exc:
        _print_problems(args.config, exc)
        return 1
    print(f"{args.config}: ok, {len(cfg.services)} services")
    for i, level in enumerate(configmod.levels(cfg)):
        print(f"level {i}: {' '.join(level)}")
    return 0


def add_graph(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "graph",
        help="print the dependency graph as DOT (of CONFIG, or of the running fleet)",
    )
    p.add_argument("config", nargs="?")
    p.add_argument("--socket", help="API Unix socket of the running supervisor")
    p.add_argument("--url", help="API base URL (TCP)")
    p.add_argument("--token-file", dest="token_file", help="bearer token file")
    p.add_argument("--json", action="store_true", help="the live graph as JSON")
    p.set_defaults(func=cmd_graph)


def cmd_graph(args: argparse.Namespace) -> int:
    """Print the dependency graph in Graphviz DOT."""
    from fastorch import config as configmod

    if args.config is None:
        from fastorch.client import live_graph_command

        return live_graph_command(args)
    try:
        cfg = _load(args.config)
    except ConfigError as exc:
        _print_problems(args.config, exc)
        return 1
    sys.stdout.write(configmod.to_dot(cfg))
    return 0


# -- the parser --------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="fastorch", description="A fast process supervisor."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for add in (add_run, add_check, add_graph):
        add(subparsers)
    # The API client's verbs (status, start, stop, logs, ...), when present.
    try:
        from fastorch import client
    except ImportError:
        pass
    else:
        client.add_subcommands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fastorch`` and ``python -m fastorch``."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
