"""A dict-based model of the engine's state machine (docs/engine.md).

Every service is a plain object in a dict; timers are a dict of
``(sid, kind, probe) -> (deadline, order)`` scanned linearly; the graph is
a :class:`~tests.models.graph.RefGraph`. Jitter is not modelled: run the
engine with ``backoff_jitter=0`` to compare delays exactly.

Where docs/engine.md leaves a choice open, the choice made here is named in
a comment beginning ``Reading:``.
"""

from __future__ import annotations

from enum import IntEnum

from tests.models.graph import RefGraph

from fastorch.errors import TransitionError


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


S = State
INACTIVE = frozenset({S.STOPPED, S.COMPLETED, S.FAILED})
HAS_PROCESS = frozenset({S.RUNNING, S.READY, S.UNHEALTHY, S.STOPPING})
ALIVE = frozenset({S.RUNNING, S.READY, S.UNHEALTHY})
# a dependency is signalled only when no dependent is in one of these
BLOCKS_STOP = frozenset({S.STARTING, S.RUNNING, S.READY, S.UNHEALTHY, S.STOPPING})

DEFAULTS = dict(
    oneshot=False,
    autostart=True,
    restart=Restart.ON_FAILURE,
    success_codes=(0,),
    backoff_initial_ms=100,
    backoff_factor=2.0,
    backoff_max_ms=30_000,
    backoff_jitter=0.1,
    backoff_reset_ms=60_000,
    start_limit_burst=5,
    start_limit_interval_ms=10_000,
    stop_signal=15,
    stop_timeout_ms=10_000,
    start_timeout_ms=0,
    ready_notify=False,
    watchdog_ms=0,
    readiness=None,
    liveness=None,
)


class ProbeRun:
    """One configured probe of one service."""

    def __init__(self, spec: tuple[int, int, int, int, int]) -> None:
        (
            self.initial_delay_ms,
            self.period_ms,
            self.timeout_ms,
            self.success_threshold,
            self.failure_threshold,
        ) = spec
        self.seq = 0
        self.in_flight = False
        self.started = 0
        self.successes = 0
        self.failures = 0
        self.is_open = False


class Svc:
    """The model's record of one service."""

    def __init__(self, sid: int, name: str, options: dict) -> None:
        self.sid = sid
        self.name = name
        self.cfg = dict(DEFAULTS)
        self.cfg.update(options)
        self.state = S.STOPPED
        self.pid = 0
        self.is_wanted = False
        self.restarts = 0
        self.last_exit: int | None = None
        self.probe_failures_total = 0
        self.last_transition_ms = 0
        self.spawned_at_ms = 0
        self.backoff_count = 0
        self.window_start = 0
        self.window_count = 0
        self.stop_pending = False
        # the reason of a stop we asked for: a requested stop or a failure
        self.stop_reason: Reason | None = None
        self.notify_open = False
        self.watchdog_override: int | None = None
        self.probes: dict[int, ProbeRun] = {}

    @property
    def has_gate(self) -> bool:
        return bool(
            self.cfg["readiness"] is not None
            or self.cfg["ready_notify"]
            or self.cfg["oneshot"]
        )

    def failures(self, probe: Probe) -> int:
        run = self.probes.get(probe)
        return run.failures if run else 0


class RefEngine:
    """The engine's rules, written the plain way."""

    def __init__(self, now: int = 0) -> None:
        self.now = now
        self.svcs: dict[int, Svc] = {}
        self.graph = RefGraph()
        self.timers: dict[tuple, tuple[int, int]] = {}
        self._order = 0
        self.out: list[tuple] = []
        # docs/engine.md: a start clears the start-limit window and the
        # backoff count, a start in BACKOFF included
        self.backoff_start_clears = True

    # -- set up ----------------------------------------------------------

    def add_service(self, sid: int, name: str, **options: object) -> None:
        """Register a service under the engine's *sid*."""
        self.svcs[sid] = Svc(sid, name, options)
        self.graph.add_node(sid, name)

    def add_dependency(self, sid: int, on: int, condition: int = 0) -> None:
        self.graph.add_dependency(sid, on, condition)

    # -- helpers ---------------------------------------------------------

    def _emit(self, *action: int) -> None:
        self.out.append(tuple(int(a) for a in action))

    def _take(self) -> list[tuple]:
        out, self.out = self.out, []
        return out

    def _arm(self, sid: int, kind: str, deadline: int, probe: int = -1) -> None:
        self._order += 1
        self.timers[(sid, kind, probe)] = (deadline, self._order)

    def _disarm(self, sid: int, kind: str, probe: int = -1) -> None:
        self.timers.pop((sid, kind, probe), None)

    def _disarm_all(self, sid: int) -> None:
        for key in [k for k in self.timers if k[0] == sid]:
            del self.timers[key]

    def _go(self, s: Svc, to: State, reason: Reason) -> None:
        self._emit(Action.TRANSITION, s.sid, s.state, to, reason)
        s.state = to
        s.last_transition_ms = self.now

    def holds(self, on: int, condition: int) -> bool:
        """Whether *condition* on service *on* holds now."""
        s = self.svcs[on]
        if s.stop_pending:
            # Reading: a service on its way down satisfies nothing, so no
            # dependent starts on top of it (a restart brings dependents
            # back only once it is up again).
            return False
        oneshot_done = s.cfg["oneshot"] and s.state == S.COMPLETED
        if condition == Condition.STARTED:
            return s.state in ALIVE or oneshot_done
        if condition == Condition.READY:
            return s.state == S.READY or oneshot_done
        return s.state == S.COMPLETED

    def _conditions_hold(self, s: Svc) -> bool:
        return all(self.holds(on, c) for on, c in self.graph.deps[s.sid].items())

    def _count_start(self, s: Svc) -> None:
        interval = s.cfg["start_limit_interval_ms"]
        if s.window_count == 0 or self.now - s.window_start > interval:
            s.window_start = self.now
            s.window_count = 1
        else:
            s.window_count += 1

    def _to_starting(self, s: Svc, reason: Reason) -> None:
        self._count_start(s)
        self._go(s, S.STARTING, reason)
        self._emit(Action.SPAWN, s.sid)

    def _wake(self, s: Svc, reason: Reason) -> None:
        """Go to STARTING if the conditions hold, else WAITING."""
        if self._conditions_hold(s):
            self._to_starting(s, reason)
        else:
            self._go(s, S.WAITING, reason)

    def _begin_stop(self, s: Svc, reason: Reason) -> None:
        # Reading: probes, watchdog and start timeout end with the stop
        # request, and a probe in flight is cancelled then.
        s.stop_pending = False
        s.stop_reason = reason
        self._quiet(s)
        self._go(s, S.STOPPING, reason)
        self._emit(Action.SIGNAL, s.sid, s.cfg["stop_signal"])
        self._arm(s.sid, "stop", self.now + s.cfg["stop_timeout_ms"])

    def _quiet(self, s: Svc) -> None:
        self._disarm_all(s.sid)
        for probe, run in sorted(s.probes.items()):
            if run.in_flight:
                run.in_flight = False
                self._emit(Action.CANCEL_PROBE, s.sid, probe, run.seq)

    def _may_signal(self, s: Svc) -> bool:
        return not any(
            self.svcs[d].state in BLOCKS_STOP for d in self.graph.rdeps[s.sid]
        )

    def _settle(self) -> None:
        """Signal pending stops whose dependents are down; start waiters."""
        changed = True
        while changed:
            changed = False
            for s in self.svcs.values():
                if s.stop_pending and s.state in ALIVE and self._may_signal(s):
                    reason = (
                        Reason.STOP_REQUESTED
                        if not s.is_wanted
                        else (Reason.RESTART_REQUESTED)
                    )
                    self._begin_stop(s, reason)
                    changed = True
            for s in self.svcs.values():
                if s.state == S.WAITING and s.is_wanted and self._conditions_hold(s):
                    self._to_starting(s, Reason.DEPENDENCIES_MET)
                    changed = True

    def _ids(self, sids) -> list[int]:
        return [sids] if isinstance(sids, int) else list(sids)

    # -- requests --------------------------------------------------------

    def start(self, sids) -> list[tuple]:
        named = set(self._ids(sids))
        todo = set(named)
        stack = list(named)
        while stack:
            for dep in self.graph.deps[stack.pop()]:
                if dep not in todo:
                    todo.add(dep)
                    stack.append(dep)
        # dependencies first, so each finds its own dependencies settled
        for level in self.graph.levels():
            for sid in level:
                if sid in todo:
                    self._start_one(self.svcs[sid], sid in named)
        self._settle()
        return self._take()

    def _start_one(self, s: Svc, named: bool) -> None:
        s.is_wanted = True
        s.stop_pending = False
        if s.state == S.COMPLETED and not named:
            # Reading: a finished dependency stays done; only a start that
            # names it runs it again (and start_all leaves it done).
            return
        if s.state in INACTIVE:
            s.window_count = 0
            s.backoff_count = 0
            self._wake(s, Reason.START_REQUESTED)
        elif s.state == S.BACKOFF and named:
            # docs: "A start clears the start-limit window and the backoff
            # count. In BACKOFF the delay is cut short"
            if self.backoff_start_clears:
                s.window_count = 0
                s.backoff_count = 0
            self._disarm(s.sid, "backoff")
            self._wake(s, Reason.START_REQUESTED)

    def stop(self, sids) -> list[tuple]:
        for sid in sorted(self.graph.dependents_closure(self._ids(sids))):
            s = self.svcs[sid]
            s.is_wanted = False
            if s.state in (S.WAITING, S.BACKOFF, S.COMPLETED, S.FAILED):
                self._disarm(sid, "backoff")
                self._go(s, S.STOPPED, Reason.STOP_REQUESTED)
            elif s.state in ALIVE or s.state == S.STARTING:
                s.stop_pending = True
        self._settle()
        return self._take()

    def restart(self, sids) -> list[tuple]:
        named = set(self._ids(sids))
        for sid in sorted(self.graph.dependents_closure(named)):
            s = self.svcs[sid]
            if not (s.is_wanted or sid in named):
                continue
            s.is_wanted = True
            if s.state in ALIVE or s.state == S.STARTING:
                s.stop_pending = True
            elif s.state != S.STOPPING and sid in named:
                self._start_one(s, True)
        self._settle()
        return self._take()

    def start_all(self) -> list[tuple]:
        wanted = [s.sid for s in self.svcs.values() if s.cfg["autostart"]]
        todo = set(wanted)
        stack = list(wanted)
        while stack:
            for dep in self.graph.deps[stack.pop()]:
                if dep not in todo:
                    todo.add(dep)
                    stack.append(dep)
        for sid in (x for level in self.graph.levels() for x in level):
            if sid in todo and self.svcs[sid].state != S.COMPLETED:
                self._start_one(self.svcs[sid], False)
        self._settle()
        return self._take()

    def stop_all(self) -> list[tuple]:
        return self.stop(list(self.svcs))

    # -- process events --------------------------------------------------

    def spawned(self, sid: int, pid: int) -> list[tuple]:
        s = self.svcs[sid]
        if s.state != S.STARTING:
            raise TransitionError(s.name, s.state.name, "spawned")
        s.pid = pid
        s.spawned_at_ms = self.now
        s.notify_open = False
        # Reading: probe seqs keep counting across spawns, so a late result
        # for the previous process can never pass for a current one.
        old = s.probes
        s.probes = {}
        self._go(s, S.RUNNING if s.has_gate else S.READY, Reason.SPAWNED)
        for probe in (Probe.READINESS, Probe.LIVENESS):
            spec = s.cfg["readiness" if probe == Probe.READINESS else "liveness"]
            if spec is not None:
                run = s.probes[probe] = ProbeRun(spec)
                run.seq = old[probe].seq if probe in old else 0
                self._arm(sid, "probe_due", self.now + run.initial_delay_ms, probe)
        s.watchdog_override = None  # WATCHDOG_USEC= is per process
        if s.cfg["watchdog_ms"] > 0:
            self._arm(sid, "watchdog", self.now + s.cfg["watchdog_ms"])
        if s.cfg["start_timeout_ms"] > 0 and s.state != S.READY:
            self._arm(sid, "start_timeout", self.now + s.cfg["start_timeout_ms"])
        self._settle()
        return self._take()

    def spawn_failed(self, sid: int) -> list[tuple]:
        s = self.svcs[sid]
        if s.state != S.STARTING:
            raise TransitionError(s.name, s.state.name, "spawn_failed")
        s.stop_pending = False
        s.is_wanted = False
        self._go(s, S.FAILED, Reason.SPAWN_FAILED)
        self._settle()
        return self._take()

    def exited(self, sid: int, status: int) -> list[tuple]:
        s = self.svcs[sid]
        if s.state not in HAS_PROCESS:
            raise TransitionError(s.name, s.state.name, "exited")
        s.pid = 0
        s.last_exit = status
        self._quiet(s)
        self._after_exit(s, status)
        s.stop_reason = None
        s.stop_pending = False
        self._settle()
        return self._take()

    def _after_exit(self, s: Svc, status: int) -> None:
        requested = s.stop_reason in (Reason.STOP_REQUESTED, Reason.RESTART_REQUESTED)
        if s.state == S.STOPPING and (requested or not s.is_wanted):
            if s.is_wanted:
                # STOPPING -> WAITING/STARTING: a restart
                self._wake(s, Reason.RESTARTING)
            else:
                self._go(s, S.STOPPED, Reason.STOPPED)
            return
        if not s.is_wanted:
            # Reading: a crash while a stop waits for dependents ends the
            # stop: nothing is restarted.
            self._go(s, S.STOPPED, Reason.EXITED)
            return
        success = status in s.cfg["success_codes"] and s.stop_reason is None
        if s.cfg["oneshot"] and success:
            self._go(s, S.COMPLETED, Reason.EXITED)
            return
        policy = s.cfg["restart"]
        if policy == Restart.ALWAYS or (policy == Restart.ON_FAILURE and not success):
            self._restart_path(s)
        elif success:
            self._go(s, S.COMPLETED, Reason.EXITED)
        else:
            s.is_wanted = False
            self._go(s, S.FAILED, Reason.EXITED)

    def _restart_path(self, s: Svc) -> None:
        cfg = s.cfg
        if self.now - s.spawned_at_ms >= cfg["backoff_reset_ms"]:
            s.backoff_count = 0
        burst = cfg["start_limit_burst"]
        in_window = self.now - s.window_start <= cfg["start_limit_interval_ms"]
        if burst and in_window and s.window_count >= burst:
            s.is_wanted = False
            self._go(s, S.FAILED, Reason.START_LIMIT)
            return
        base = cfg["backoff_initial_ms"] * cfg["backoff_factor"] ** s.backoff_count
        delay = int(min(cfg["backoff_max_ms"], base))
        s.backoff_count += 1
        s.restarts += 1
        if delay == 0:
            self._wake(s, Reason.RESTARTING)
        else:
            self._go(s, S.BACKOFF, Reason.EXITED)
            self._arm(s.sid, "backoff", self.now + delay)

    # -- health ----------------------------------------------------------

    def probe_result(self, sid: int, probe: int, seq: int, ok: bool) -> list[tuple]:
        s = self.svcs[sid]
        run = s.probes.get(probe)
        if (
            s.state not in HAS_PROCESS
            or s.state == S.STOPPING
            or run is None
            or not run.in_flight
            or run.seq != seq
        ):
            return []
        self._disarm(sid, "probe_timeout", probe)
        self._finish_run(s, Probe(probe), run, ok)
        self._settle()
        return self._take()

    def _finish_run(self, s: Svc, probe: Probe, run: ProbeRun, ok: bool) -> None:
        run.in_flight = False
        due = max(run.started + run.period_ms, self.now)
        self._arm(s.sid, "probe_due", due, probe)
        if ok:
            run.successes += 1
            run.failures = 0
        else:
            run.failures += 1
            run.successes = 0
            s.probe_failures_total += 1
        if probe == Probe.LIVENESS:
            if run.failures >= run.failure_threshold:
                self._begin_stop(s, Reason.LIVENESS_FAILED)
            return
        if not run.is_open and run.successes >= run.success_threshold:
            run.is_open = True
            self._gate_opened(s, Reason.PROBE_READY)
        elif run.is_open and run.failures >= run.failure_threshold:
            run.is_open = False
            if s.state == S.READY:
                self._go(s, S.UNHEALTHY, Reason.PROBE_FAILED)

    def _gates_open(self, s: Svc) -> bool:
        run = s.probes.get(Probe.READINESS)
        if run is not None and not run.is_open:
            return False
        return not s.cfg["ready_notify"] or s.notify_open

    def _gate_opened(self, s: Svc, reason: Reason) -> None:
        if s.state in (S.RUNNING, S.UNHEALTHY) and self._gates_open(s):
            if s.state == S.UNHEALTHY:
                reason = Reason.PROBE_READY
            self._go(s, S.READY, reason)
            self._disarm(s.sid, "start_timeout")

    def notify_ready(self, sid: int) -> list[tuple]:
        s = self.svcs[sid]
        if s.state not in ALIVE or not s.cfg["ready_notify"] or s.notify_open:
            return []
        s.notify_open = True
        self._gate_opened(s, Reason.NOTIFY_READY)
        self._settle()
        return self._take()

    def notify_watchdog(self, sid: int) -> list[tuple]:
        s = self.svcs[sid]
        wd = s.cfg["watchdog_ms"]
        if s.watchdog_override is not None:
            wd = s.watchdog_override
        if s.state in ALIVE and wd > 0 and (sid, "watchdog", -1) in self.timers:
            self._arm(sid, "watchdog", self.now + wd)
        return []

    def set_watchdog(self, sid: int, watchdog_ms: int) -> list[tuple]:
        s = self.svcs[sid]
        s.watchdog_override = watchdog_ms
        self._disarm(sid, "watchdog")
        if s.state in ALIVE and watchdog_ms > 0:
            self._arm(sid, "watchdog", self.now + watchdog_ms)
        return []

    # -- time ------------------------------------------------------------

    def next_deadline(self) -> int | None:
        return min((d for d, _ in self.timers.values()), default=None)

    def due(self, now: int) -> list[tuple]:
        """The timers due at the earliest deadline <= *now*, in arming
        order."""
        nd = self.next_deadline()
        if nd is None or nd > now:
            return []
        keys = [(o, k) for k, (d, o) in self.timers.items() if d == nd]
        return [k for _, k in sorted(keys)]

    def set_now(self, now: int) -> None:
        if now < self.now:
            raise ValueError("time went backwards")
        self.now = now

    def fire(self, key: tuple) -> list[tuple]:
        """Fire one due timer (it may have been cancelled meanwhile)."""
        if key not in self.timers:
            return []
        due = self.timers.pop(key)[0]
        sid, kind, probe = key
        s = self.svcs[sid]
        if kind == "probe_due":
            run = s.probes[probe]
            run.seq += 1
            run.in_flight = True
            # A run counts from when it was due (docs: no drift), unless
            # it is served later than its whole timeout.
            run.started = due if due + run.timeout_ms > self.now else self.now
            self._emit(Action.PROBE, sid, probe, run.seq)
            self._arm(sid, "probe_timeout", run.started + run.timeout_ms, probe)
        elif kind == "probe_timeout":
            run = s.probes[probe]
            self._emit(Action.CANCEL_PROBE, sid, probe, run.seq)
            self._finish_run(s, Probe(probe), run, False)
        elif kind == "backoff":
            if self._conditions_hold(s):
                self._to_starting(s, Reason.BACKOFF_ELAPSED)
            else:
                self._go(s, S.WAITING, Reason.DEPENDENCY_LOST)
        elif kind == "stop":
            self._emit(Action.KILL, sid)
        elif kind == "watchdog":
            self._begin_stop(s, Reason.WATCHDOG)
        elif kind == "start_timeout":
            if s.state == S.RUNNING:
                self._begin_stop(s, Reason.START_TIMEOUT)
        self._settle()
        return self._take()

    def advance(self, now: int) -> list[tuple]:
        """Fire every timer due by *now*, earliest first, in arming order
        within one deadline."""
        self.set_now(now)
        out: list[tuple] = []
        while batch := self.due(now):
            for key in batch:
                out += self.fire(key)
        return out

    # -- reading ---------------------------------------------------------

    def state(self, sid: int) -> State:
        return self.svcs[sid].state

    def startable(self) -> list[int]:
        return self.graph.startable(
            (s.sid for s in self.svcs.values() if s.state in (S.STOPPED, S.WAITING)),
            self.holds,
        )
