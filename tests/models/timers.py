"""A heapq timer queue with the API of ``fastorch._core.TimerWheel``."""

from __future__ import annotations

import heapq

#: The wheel accepts deadlines up to this far ahead (30 days).
MAX_DURATION_MS = 30 * 24 * 3600 * 1000


class HeapTimers:
    """Timers in a binary heap; cancelled entries are skipped lazily.

    A deadline is rounded up to a multiple of ``tick_ms`` and a timer fires
    at the first ``advance`` whose ``now`` reaches it, never before.
    """

    def __init__(self, now: int = 0, tick_ms: int = 1) -> None:
        self._now = now
        self._tick_ms = tick_ms
        self._heap: list[tuple[int, int, int]] = []
        # handle -> payload of every pending timer
        self._pending: dict[int, int] = {}
        self._next_handle = 1

    @property
    def now(self) -> int:
        """The time of the last ``advance``."""
        return self._now

    def _round(self, deadline: int) -> int:
        tick = self._tick_ms
        return -(-deadline // tick) * tick

    def schedule(self, deadline: int, payload: int = 0) -> int:
        """Add a timer; return its handle."""
        handle = self._next_handle
        self._next_handle += 1
        heapq.heappush(self._heap, (self._round(deadline), handle, payload))
        self._pending[handle] = payload
        return handle

    def cancel(self, handle: int) -> bool:
        """Cancel a pending timer; ``False`` if it fired or was cancelled."""
        return self._pending.pop(handle, None) is not None

    def advance(self, now: int) -> list[int]:
        """Move the clock to *now*; return the payloads of due timers."""
        if now < self._now:
            raise ValueError(f"time went backwards: {now!r} < {self._now!r}")
        self._now = now
        fired = []
        heap = self._heap
        pending = self._pending
        while heap and heap[0][0] <= now:
            _, handle, payload = heapq.heappop(heap)
            if pending.pop(handle, None) is not None:
                fired.append(payload)
        return fired

    def next_deadline(self) -> int | None:
        """The earliest pending deadline (rounded to a tick), or ``None``."""
        heap = self._heap
        while heap and heap[0][1] not in self._pending:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def deadlines(self) -> dict[int, int]:
        """Map every pending handle to its rounded deadline (for tests)."""
        return {h: d for d, h, _ in self._heap if h in self._pending}

    def __len__(self) -> int:
        return len(self._pending)
