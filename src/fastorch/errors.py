"""The one tree of fastorch's exceptions.

This module imports nothing from the package, so the compiled core and the
shell raise the same classes.
"""

from __future__ import annotations


class FastorchError(Exception):
    """Base class of every error fastorch raises on purpose."""


class ConfigError(FastorchError):
    """A configuration is invalid; ``problems`` lists every (path, reason)."""

    def __init__(self, problems: list[tuple[str, str]] | str) -> None:
        if isinstance(problems, str):
            problems = [("", problems)]
        self.problems = list(problems)
        super().__init__(self._render())

    def _render(self) -> str:
        lines = []
        for path, reason in self.problems:
            lines.append(f"{path}: {reason}" if path else reason)
        return "\n".join(lines)


class CycleError(ConfigError):
    """The dependency graph has a cycle; ``cycle`` holds its names in order.

    The first name is repeated at the end: ``["a", "b", "c", "a"]``.
    """

    def __init__(self, cycle: list[str], path: str = "") -> None:
        self.cycle = list(cycle)
        super().__init__([(path, "dependency cycle: " + " -> ".join(cycle))])


class UnknownServiceError(FastorchError, KeyError):
    """A name or id names no service."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown service"


class EngineError(FastorchError, ValueError):
    """A request to the engine is invalid (bad value, wrong state, ...)."""


class TransitionError(FastorchError, RuntimeError):
    """An illegal state transition: a bug, never swallowed."""

    def __init__(self, service: str, state: str, event: str) -> None:
        self.service = service
        self.state = state
        self.event = event
        super().__init__(
            f"service {service!r}: illegal event {event!r} in state {state!r}"
        )


class SpawnError(FastorchError, OSError):
    """A child could not be started; chained from the ``OSError``."""


class ApiError(FastorchError):
    """An API request failed; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(message)
