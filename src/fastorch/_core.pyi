"""Typed API of the compiled core, ``fastorch._core``.

The core is a sans-I/O engine: events go in, actions come out, and time is
an integer count of milliseconds passed in by the caller.
"""

from collections.abc import Iterable
from enum import IntEnum
from typing import TypeAlias

class State(IntEnum):
    STOPPED = 0
    WAITING = 1
    STARTING = 2
    RUNNING = 3
    READY = 4
    UNHEALTHY = 5
    STOPPING = 6
    COMPLETED = 7
    BACKOFF = 8
    FAILED = 9

class Condition(IntEnum):
    STARTED = 0
    READY = 1
    COMPLETED = 2

class Restart(IntEnum):
    NEVER = 0
    ON_FAILURE = 1
    ALWAYS = 2

class Probe(IntEnum):
    READINESS = 0
    LIVENESS = 1

class Action(IntEnum):
    SPAWN = 0
    SIGNAL = 1
    KILL = 2
    PROBE = 3
    CANCEL_PROBE = 4
    TRANSITION = 5

class Reason(IntEnum):
    START_REQUESTED = 0
    DEPENDENCIES_MET = 1
    SPAWNED = 2
    SPAWN_FAILED = 3
    PROBE_READY = 4
    NOTIFY_READY = 5
    PROBE_FAILED = 6
    EXITED = 7
    RESTARTING = 8
    BACKOFF_ELAPSED = 9
    START_LIMIT = 10
    STOP_REQUESTED = 11
    STOPPED = 12
    LIVENESS_FAILED = 13
    WATCHDOG = 14
    START_TIMEOUT = 15
    RESTART_REQUESTED = 16
    DEPENDENCY_LOST = 17

# (Action.SPAWN, sid)
# (Action.SIGNAL, sid, signo)          signal the process group
# (Action.KILL, sid)                   SIGKILL the process group
# (Action.PROBE, sid, probe, seq)      run a probe; answer with probe_result
# (Action.CANCEL_PROBE, sid, probe, seq)
# (Action.TRANSITION, sid, from_state, to_state, reason)
ActionTuple: TypeAlias = tuple[int, ...]

# (initial_delay_ms, period_ms, timeout_ms, success_threshold,
#  failure_threshold)
ProbeSpec: TypeAlias = tuple[int, int, int, int, int]

MAX_DURATION_MS: int  # 30 days

class ServiceInfo:
    sid: int
    name: str
    state: State
    pid: int  # 0 when no process
    restarts: int
    last_exit: int | None  # exit code, or -signal
    readiness_failures: int  # consecutive
    liveness_failures: int  # consecutive
    probe_failures_total: int
    last_transition_ms: int
    spawned_at_ms: int  # 0 before the first spawn
    is_wanted: bool
    is_ready: bool
    reason: Reason  # of the last transition

class TimerWheel:
    """A hierarchical timing wheel: 6 levels of 64 slots of ``tick_ms``."""

    def __init__(self, now: int = 0, tick_ms: int = 1) -> None: ...
    @property
    def now(self) -> int: ...
    def schedule(self, deadline: int, payload: int = 0) -> int: ...
    def cancel(self, handle: int) -> bool: ...
    def advance(self, now: int) -> list[int]: ...
    def next_deadline(self) -> int | None: ...
    def __len__(self) -> int: ...
    @property
    def tick_ms(self) -> int: ...
    def memory_bytes(self) -> int: ...

class Engine:
    """Graph, timer wheel and state machine of every service."""

    def __init__(self, now: int = 0, seed: int = 0, tick_ms: int = 1) -> None: ...
    @property
    def now(self) -> int: ...

    # services and edges
    def add_service(
        self,
        name: str,
        *,
        oneshot: bool = False,
        autostart: bool = True,
        restart: Restart | int = Restart.ON_FAILURE,
        success_codes: Iterable[int] = (0,),
        backoff_initial_ms: int = 100,
        backoff_factor: float = 2.0,
        backoff_max_ms: int = 30_000,
        backoff_jitter: float = 0.1,
        backoff_reset_ms: int = 60_000,
        start_limit_burst: int = 5,
        start_limit_interval_ms: int = 10_000,
        stop_signal: int = 15,
        stop_timeout_ms: int = 10_000,
        start_timeout_ms: int = 0,
        ready_notify: bool = False,
        watchdog_ms: int = 0,
        readiness: ProbeSpec | None = None,
        liveness: ProbeSpec | None = None,
    ) -> int: ...
    def add_services(self, names: Iterable[str], **options: object) -> list[int]: ...
    def configure(self, sid: int, **options: object) -> None: ...
    def options(self, sid: int) -> dict[str, object]: ...
    def remove_service(self, sid: int) -> None: ...
    def add_dependency(
        self, sid: int, on: int, condition: Condition | int = Condition.STARTED
    ) -> None: ...
    def add_dependencies(
        self, edges: Iterable[tuple[int, int, Condition | int]]
    ) -> None: ...
    def remove_dependency(self, sid: int, on: int) -> bool: ...
    def sid(self, name: str) -> int: ...
    def name(self, sid: int) -> str: ...
    def names(self) -> list[str]: ...
    def sids(self) -> list[int]: ...
    def __len__(self) -> int: ...
    def __contains__(self, name: object) -> bool: ...

    # graph queries
    def dependencies(self, sid: int) -> list[tuple[int, Condition]]: ...
    def dependents(self, sid: int) -> list[tuple[int, Condition]]: ...
    def find_cycle(self) -> list[str] | None: ...
    def levels(self) -> list[list[int]]: ...
    def startable(self) -> list[int]: ...
    def stop_order(self, sids: Iterable[int] | None = None) -> list[int]: ...
    def affected(self, sid: int) -> list[int]: ...
    def condition_holds(self, on: int, condition: Condition | int) -> bool: ...

    # requests
    def start(self, sids: int | Iterable[int]) -> list[ActionTuple]: ...
    def stop(self, sids: int | Iterable[int]) -> list[ActionTuple]: ...
    def restart(self, sids: int | Iterable[int]) -> list[ActionTuple]: ...
    def start_all(self) -> list[ActionTuple]: ...
    def stop_all(self) -> list[ActionTuple]: ...

    # what happened
    def spawned(self, sid: int, pid: int) -> list[ActionTuple]: ...
    def spawn_failed(self, sid: int) -> list[ActionTuple]: ...
    def exited(self, sid: int, status: int) -> list[ActionTuple]: ...
    def probe_result(
        self, sid: int, probe: Probe | int, seq: int, ok: bool
    ) -> list[ActionTuple]: ...
    def notify_ready(self, sid: int) -> list[ActionTuple]: ...
    def notify_watchdog(self, sid: int) -> list[ActionTuple]: ...
    def set_watchdog(self, sid: int, watchdog_ms: int) -> list[ActionTuple]: ...
    def advance(self, now: int) -> list[ActionTuple]: ...
    def next_deadline(self) -> int | None: ...

    # reading
    def state(self, sid: int) -> State: ...
    def info(self, sid: int) -> ServiceInfo: ...
    def states(self) -> bytes: ...
    def counters(self, sid: int) -> tuple[int, int, int, int, int, int]: ...
    def count_by_state(self) -> list[int]: ...
    def is_active(self) -> bool: ...
    def pending_timers(self) -> int: ...
    def check_invariants(self) -> None: ...
    def memory_bytes(self) -> int: ...
