"""Bounded event streams from the supervisor to its readers (API, CLI)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["Subscription"]


class Subscription:
    """An async iterator of event dicts with a bounded buffer.

    The supervisor calls :meth:`push` on its loop and never waits: when the
    buffer is full the subscriber is dropped (its iteration ends, ``dropped``
    is true) rather than slowing the supervisor down.
    """

    def __init__(
        self,
        maxsize: int = 1024,
        on_close: Callable[[Subscription], None] | None = None,
    ) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self._items: deque[dict[str, Any]] = deque()
        self._maxsize = maxsize
        self._waiter: asyncio.Future[None] | None = None
        self._on_close = on_close
        self.closed = False
        self.dropped = False

    def __len__(self) -> int:
        return len(self._items)

    def push(self, item: dict[str, Any]) -> bool:
        """Queue *item*; False when closed, or dropped because full."""
        if self.closed:
            return False
        if len(self._items) >= self._maxsize:
            # A reader this far behind has lost events anyway: end its
            # stream so it can resubscribe and re-read the state.
            self.dropped = True
            self._items.clear()
            self.close()
            return False
        self._items.append(item)
        self._wake()
        return True

    def close(self) -> None:
        """End the iteration once the queued items are read."""
        if self.closed:
            return
        self.closed = True
        self._wake()
        if self._on_close is not None:
            self._on_close(self)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> dict[str, Any]:
        while not self._items:
            if self.closed:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()

    async def get(self, timeout: float | None = None) -> dict[str, Any]:
        """The next item; raises StopAsyncIteration when closed."""
        return await asyncio.wait_for(self.__anext__(), timeout)
