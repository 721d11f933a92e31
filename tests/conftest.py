"""Shared helpers: real children, a supervised fleet, bounded waits."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHILDREN = Path(__file__).parent / "children"
PY = sys.executable

# Test fleets keep child output off the terminal and out of the journal.
HEADER = """
[defaults.logs]
destination = "null"
"""


def child(name: str, *args: object) -> str:
    """A TOML array running tests/children/<name>.py with *args*."""
    argv = [PY, str(CHILDREN / f"{name}.py"), *map(str, args)]
    return "[" + ", ".join(f'"{a}"' for a in argv) + "]"


def processes() -> Iterator[tuple[int, str, str, int]]:
    """``(pid, comm, state, ppid)`` of every process, read from /proc."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        end = data.rindex(b")")
        rest = data[end + 2 :].split()
        comm = data[data.index(b"(") + 1 : end].decode(errors="replace")
        yield int(entry), comm, rest[0].decode(), int(rest[1])


def children_of(pid: int) -> list[int]:
    """The children of *pid*, zombies included."""
    return [p for p, _, _, ppid in processes() if ppid == pid]


def zombies_of(pid: int) -> list[int]:
    """Zombie children of *pid*, read from /proc."""
    return [p for p, _, state, ppid in processes() if state == "Z" and ppid == pid]


def alive(pid: int) -> bool:
    """True if *pid* exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rindex(b")") + 2 :].split()[0] != b"Z"


async def wait_until(predicate: Any, timeout: float = 5.0, step: float = 0.01) -> None:
    """Poll *predicate* until true; fail the test after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(step)


class Fleet:
    """A Supervisor over a config file in *tmp_path*, run as a task."""

    def __init__(self, tmp_path: Path, text: str) -> None:
        self.path = tmp_path / "fleet.toml"
        self.path.write_text(HEADER + text)
        self.events: list[dict[str, Any]] = []

    def rewrite(self, text: str) -> None:
        self.path.write_text(HEADER + text)

    async def __aenter__(self) -> Fleet:
        from fastorch import config
        from fastorch.supervisor import Supervisor

        self.sup = Supervisor(config.load(self.path), handle_signals=False)
        self.sub = self.sup.subscribe(maxsize=100_000)
        self.task = asyncio.get_running_loop().create_task(self.sup.run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await asyncio.wait_for(self.sup.shutdown(), 15)
        finally:
            await asyncio.wait_for(self.task, 15)
        # The subscription is closed now: keep what it still holds.
        async for ev in self.sub:
            ev["t"] = time.monotonic()
            self.events.append(ev)

    def state(self, name: str) -> str:
        return self.sup.service(name)["state"]

    def pid(self, name: str) -> int | None:
        return self.sup.service(name)["pid"]

    async def _pull(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError("timed out waiting for an event")
        try:
            ev = await self.sub.get(timeout=remaining)
        except TimeoutError:
            raise AssertionError("timed out waiting for an event") from None
        ev["t"] = time.monotonic()
        self.events.append(ev)

    async def wait_state(self, name: str, *states: str, timeout: float = 5.0) -> None:
        """Wait until service *name* is in one of *states*."""
        deadline = time.monotonic() + timeout
        while self.state(name) not in states:
            await self._pull(deadline)

    async def wait_event(self, timeout: float = 5.0, **match: Any) -> dict[str, Any]:
        """Wait for (or find already seen) a transition matching *match*."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for ev in self.events[seen:]:
                if all(ev.get(k) == v for k, v in match.items()):
                    return ev
            seen = len(self.events)
            await self._pull(deadline)

    def transitions(self, name: str | None = None) -> list[tuple[str, str, str]]:
        return [
            (e["service"], e["from"], e["to"])
            for e in self.events
            if e["event"] == "transition" and (name is None or e["service"] == name)
        ]


@pytest.fixture
def fleet(tmp_path: Path) -> Any:
    """``fleet(text)`` builds a :class:`Fleet` in this test's directory."""
    return lambda text: Fleet(tmp_path, text)
