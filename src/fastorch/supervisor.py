"""The supervisor: feeds events to the engine and carries out its actions.

One :class:`~fastorch._core.Engine` holds every rule. This module turns the
world's events (a child spawned or exited, a probe answered, a child said
READY=1, time passed) into engine calls, and the engine's actions (SPAWN,
SIGNAL, KILL, PROBE, CANCEL_PROBE, TRANSITION) into I/O. The engine's timers
live on its wheel; the loop has one timer, armed at ``next_deadline()``.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import os
import signal
import tempfile
import time
import tomllib
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastorch import config as configmod
from fastorch._core import (
    MAX_DURATION_MS,
    Action,
    Condition,
    Engine,
    Probe,
    Reason,
    State,
)
from fastorch.errors import (
    ConfigError,
    EngineError,
    FastorchError,
    SpawnError,
    UnknownServiceError,
)
from fastorch.events import Subscription
from fastorch.process import ProcessTable
from fastorch.systemd import MANAGER_ENV_VARS

__all__ = ["Supervisor", "SupervisorStats", "MESSAGE_IDS"]

logger = logging.getLogger(__name__)

# A fixed journal MESSAGE_ID per transition reason, so `journalctl
# MESSAGE_ID=...` finds every event of one kind.
_MESSAGE_NS = uuid.UUID("6f1c3e1a-4b7d-4f0e-9a2c-5d8e7b1f0c3a")
MESSAGE_IDS = {r: uuid.uuid5(_MESSAGE_NS, r.name).hex for r in Reason}

_INACTIVE = frozenset((State.STOPPED, State.COMPLETED, State.FAILED))
_HAS_PROCESS = frozenset((State.RUNNING, State.READY, State.UNHEALTHY, State.STOPPING))
_SETTLED = frozenset((State.READY, State.COMPLETED, State.FAILED))
_STARTED = _SETTLED | {State.RUNNING, State.UNHEALTHY}
_CONDITIONS = {"started": Condition.STARTED, "ready": Condition.READY,
               "completed": Condition.COMPLETED}  # fmt: skip
_DELETED_SUFFIX = ".deleted"


@dataclass(slots=True)
class SupervisorStats:
    """Supervisor-wide counters that metrics read at scrape time."""

    started_at: float = field(default_factory=time.time)  # wall clock
    reloads: int = 0
    failed_reloads: int = 0
    spawns: int = 0
    spawn_failures: int = 0
    exits: int = 0
    transitions: int = 0
    # Event-loop lag samples in seconds, newest last.
    loop_lag: deque[float] = field(default_factory=lambda: deque(maxlen=1024))
    probe_durations: Any = None


# Granularity of the one loop timer, in ms (see _arm_timer).
_TIMER_SLACK_MS = 4

_ALIVE = frozenset((State.RUNNING, State.READY, State.UNHEALTHY, State.STOPPING))
# Transitions that answer a failure fastorch handles (it restarts, or marks
# the service unhealthy): WARNING. Giving up (FAILED) is an ERROR.
_HANDLED_FAILURES = frozenset(
    (Reason.LIVENESS_FAILED, Reason.WATCHDOG, Reason.START_TIMEOUT, Reason.PROBE_FAILED)
)


def _log_level(old: State, new: State, why: Reason) -> int:
    if new == State.FAILED:
        return logging.ERROR
    if why in _HANDLED_FAILURES or (
        why == Reason.EXITED and old in _ALIVE and new == State.BACKOFF
    ):
        return logging.WARNING
    return logging.INFO


@dataclass(slots=True)
class _Service:
    sid: int
    name: str
    cfg: Any
    pid: int = 0
    since: float = field(default_factory=time.time)
    reason: str = ""
    status_text: str = ""
    notify_path: str | None = None
    log_fds: tuple[int | None, int | None] | None = None


class Supervisor:
    """Runs a fleet: the engine, the children, probes, logs, signals.

    Args:
        config: the validated configuration (``fastorch.config.Config``).
        loop: the event loop; by default the running one.
        api: serve the control API (``fastorch.api.serve``) while running.
        handle_signals: install SIGTERM/SIGINT/SIGHUP handlers in ``run``.
        exit_watch: how the process table learns of exits (see
            ``ProcessTable``); ``fastorch run`` owns every child of its
            process and uses ``"waitpid"``.
    """

    def __init__(
        self,
        config: Any,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        api: bool = False,
        handle_signals: bool = True,
        exit_watch: str = "pidfd",
    ) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self.drop_in_dir = Path(config.supervisor.drop_in_dir)
        # Live changes made through the API survive a restart of fastorch.
        try:
            config = merge_drop_ins(config, self.drop_in_dir)
        except ConfigError as exc:
            for where, reason in exc.problems:
                logger.error("drop-in ignored: %s: %s", where, reason)
        self.config = config
        self.stats = SupervisorStats()
        self.engine = Engine(now=self._now(), seed=int.from_bytes(os.urandom(4)))
        self._services: dict[int, _Service] = {}
        self._by_name: dict[str, int] = {}
        self._subscribers: set[Subscription] = set()
        self._waiters: list[tuple[set[int], asyncio.Future[None]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: int | None = None
        self._queue: deque[tuple[int, ...]] = deque()
        self._env_bases: dict[tuple[tuple[str, str], ...], dict[str, str]] = {}
        self._draining = False
        self._shutdown_started = False
        self._done: asyncio.Future[None] = self._loop.create_future()
        self._sigint_count = 0
        self._serve_api = api
        self._handle_signals = handle_signals
        self._api_server: Any = None
        self._ready_sent = False
        self._status_handle: asyncio.TimerHandle | None = None
        self._aux_timers: list[asyncio.TimerHandle] = []
        self._last_lag_check = 0.0
        self._last_now = self._now()

        self.table = ProcessTable(self._loop, exit_watch=exit_watch)
        self._runtime_dir = tempfile.mkdtemp(prefix="fastorch-")
        self.probes: Any = None
        self.notify: Any = None
        self.logs: Any = None
        self.notifier: Any = None
        self._open_components()
        for svc in config.services.values():
            self._add(svc)
        self._add_edges(config.services.values())

    # -- setup -------------------------------------------------------------

    def _open_components(self) -> None:
        # Each component is optional at import time so a fleet without
        # probes or special logs still runs; a service that needs a
        # missing one fails with a clear error at spawn.
        try:
            from fastorch.probes import NotifyServer, ProbeRunner
        except ImportError as exc:
            logger.warning("probes unavailable: %s", exc)
        else:
            self.probes = ProbeRunner(
                self._loop, self._on_probe_result, spawner=self.table
            )
            self.notify = NotifyServer(
                self._loop, self._runtime_dir, self._on_notify_message
            )
            self.stats.probe_durations = getattr(self.probes, "durations", None)
        try:
            from fastorch.logs import LogManager
        except ImportError as exc:
            logger.warning("child log handling unavailable: %s", exc)
        else:
            self.logs = LogManager(self._loop)
        try:
            from fastorch.systemd import SystemdNotifier
        except ImportError:
            self.notifier = None
        else:
            self.notifier = SystemdNotifier()

    def _add(self, cfg: Any) -> int:
        sid = self.engine.add_service(cfg.name, **configmod.engine_options(cfg))
        self._services[sid] = _Service(sid, cfg.name, cfg)
        self._by_name[cfg.name] = sid
        return sid

    def _add_edges(self, cfgs: Iterable[Any]) -> None:
        """Every edge of ``cfgs`` in one call: one cycle check, not one per
        edge (the config was checked for cycles already; this keeps the
        engine's own guard cheap)."""
        by_name = self._by_name
        self.engine.add_dependencies(
            [
                (by_name[cfg.name], by_name[dep], _CONDITIONS[condition.lower()])
                for cfg in cfgs
                for dep, condition in cfg.depends_on
            ]
        )

    def _now(self) -> int:
        return int(self._loop.time() * 1000)

    def _sid(self, name: str) -> int:
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownServiceError(f"unknown service {name!r}") from None

    def _sids(self, names: Iterable[str] | None) -> list[int]:
        if names is None:
            return sorted(self._services)
        if isinstance(names, str):
            names = [names]
        return [self._sid(n) for n in names]

    # -- running -----------------------------------------------------------

    async def run(self) -> None:
        """Start every autostart service; return after a complete shutdown."""
        if self._handle_signals:
            self._install_signals()
        if self._serve_api:
            await self._start_api()
        if self.notifier is not None and self.notifier.watchdog_interval:
            self._schedule_watchdog()
        self._schedule_lag_check()
        logger.info("supervisor started with %d services", len(self._services))
        self._advance_clock()
        self._feed(self.engine.start_all())
        try:
            await self._done
        finally:
            await self._close()
        logger.info("supervisor stopped")

    def _install_signals(self) -> None:
        loop = self._loop
        loop.add_signal_handler(signal.SIGTERM, self._on_sigterm)
        loop.add_signal_handler(signal.SIGINT, self._on_sigint)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        if os.environ.get("FASTORCH_TEST_HOOKS") == "1":
            # Test-only: hang the loop so a watchdog test sees us killed.
            loop.add_signal_handler(signal.SIGUSR2, _hang)

    def _remove_signals(self) -> None:
        sigs = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2]
        for signo in sigs:
            self._loop.remove_signal_handler(signo)

    def _on_sigterm(self) -> None:
        logger.info("SIGTERM: stopping every service")
        self._begin_shutdown()

    def _on_sigint(self) -> None:
        self._sigint_count += 1
        if self._sigint_count == 1:
            logger.info("SIGINT: stopping every service (again to kill)")
            self._begin_shutdown()
        else:
            logger.warning("second SIGINT: killing every process group")
            self.kill_all()

    def _on_sighup(self) -> None:
        logger.info("SIGHUP: reloading %s", getattr(self.config, "path", "?"))
        self._loop.create_task(self._reload_quietly())

    async def _reload_quietly(self) -> None:
        try:
            await self.reload()
        except ConfigError:
            pass  # already logged, the fleet runs on unchanged

    async def _start_api(self) -> None:
        try:
            from fastorch.api import serve
        except ImportError as exc:
            logger.error("control API unavailable: %s", exc)
            return
        try:
            self._api_server = await serve(self)
        except Exception:
            logger.exception("control API failed to start")

    def kill_all(self) -> None:
        """SIGKILL every service's process group at once."""
        items = [(s.pid, int(signal.SIGKILL)) for s in self._services.values() if s.pid]
        self.table.signal_groups(items)

    def _begin_shutdown(self) -> asyncio.Future[None]:
        if not self._shutdown_started:
            self._shutdown_started = True
            if self.notifier is not None:
                self.notifier.stopping()
            self._advance_clock()
            self._feed(self.engine.stop_all())
            self._maybe_done()
        return self._done

    async def shutdown(self) -> None:
        """Ordered stop of everything; returns when every service is inactive."""
        await asyncio.shield(self._begin_shutdown())

    def _maybe_done(self) -> None:
        if self._shutdown_started and not self._done.done():
            if not self.engine.is_active():
                self._done.set_result(None)

    async def _close(self) -> None:
        if self._handle_signals:
            self._remove_signals()
        for handle in (self._timer, self._status_handle, *self._aux_timers):
            if handle is not None:
                handle.cancel()
        if self._api_server is not None:
            await self._api_server.aclose()
        if self.probes is not None:
            await self.probes.aclose()
        if self.notify is not None:
            self.notify.close_all()
        if self.logs is not None:
            await self.logs.aclose()
        for sub in list(self._subscribers):
            sub.close()
        self.table.close()
        _rmtree(self._runtime_dir)

    # -- the engine's actions ----------------------------------------------

    def _feed(self, actions: list[tuple[int, ...]]) -> None:
        """Carry out *actions* and everything they cause, then re-arm."""
        self._queue.extend(actions)
        if self._draining:
            return
        self._draining = True
        try:
            self._drain()
        finally:
            self._draining = False
        self._arm_timer()
        self._check_waiters()
        if not self._ready_sent:
            self._check_settled()
        self._maybe_done()

    def _drain(self) -> None:
        queue = self._queue
        signals: list[tuple[int, int]] = []
        while queue or signals:
            if not queue:
                # Signals go out together after one snapshot of the trees.
                self.table.signal_groups(signals)
                signals = []
                continue
            action = queue.popleft()
            kind = action[0]
            if kind == Action.TRANSITION:
                self._on_transition(*action[1:])
            elif kind == Action.SPAWN:
                self._spawn(action[1])
            elif kind == Action.SIGNAL:
                pid = self._services[action[1]].pid
                if pid:
                    signals.append((pid, action[2]))
            elif kind == Action.KILL:
                svc = self._services[action[1]]
                if svc.pid:
                    logger.warning(
                        "service %s: stop timeout, killing pid %d", svc.name, svc.pid
                    )
                    signals.append((svc.pid, signal.SIGKILL))
            elif kind == Action.PROBE:
                self._probe(*action[1:])
            elif kind == Action.CANCEL_PROBE:
                if self.probes is not None:
                    self.probes.cancel(*action[1:])

    def _spawn(self, sid: int) -> None:
        svc = self._services[sid]
        cfg = svc.cfg
        try:
            env = self._child_env(svc)
            stdout, stderr = self._log_fds(svc)
            pid = self.table.spawn(
                list(cfg.command),
                env=env,
                cwd=cfg.cwd or None,
                user=cfg.user or None,
                group=cfg.group or None,
                umask=cfg.umask,
                rlimits=dict(cfg.rlimits) or None,
                stdout=stdout,
                stderr=stderr,
                on_exit=lambda pid, status: self._on_exit(sid, pid, status),
            )
        except (SpawnError, FastorchError, OSError) as exc:
            self.stats.spawn_failures += 1
            svc.status_text = f"spawn failed: {exc}"
            logger.error("service %s: cannot start: %s", svc.name, exc)
            self._queue.extend(self.engine.spawn_failed(sid))
            return
        self.stats.spawns += 1
        svc.pid = pid
        svc.status_text = ""
        # A start of many services spawns them one after the other: count
        # initial_delay, watchdog and start_timeout from this spawn, not
        # from the event that began the batch.
        self._advance_clock()
        self._queue.extend(self.engine.spawned(sid, pid))

    def _child_env(self, svc: _Service) -> dict[str, str]:
        cfg = svc.cfg
        env = self._base_env(cfg.env).copy()
        env["FASTORCH_SERVICE"] = svc.name
        if cfg.notify or cfg.watchdog_ms:
            if self.notify is None:
                raise SpawnError("notify socket needs fastorch.probes, not available")
            if svc.notify_path is None:
                svc.notify_path = self.notify.open(svc.sid)
            env["NOTIFY_SOCKET"] = svc.notify_path
            if cfg.watchdog_ms:
                env["WATCHDOG_USEC"] = str(cfg.watchdog_ms * 1000)
        return env

    def _base_env(self, extra: dict[str, str]) -> dict[str, str]:
        """Our environment plus a service's ``env``, shared by every service
        with the same ``env``: reading os.environ costs a decode per key, and
        a copy per service would cost kilobytes each."""
        key = tuple(extra.items())
        base = self._env_bases.get(key)
        if base is None:
            base = dict(os.environ)
            # What systemd handed to fastorch itself is not the child's.
            for name in MANAGER_ENV_VARS:
                base.pop(name, None)
            base.update(extra)
            self._env_bases[key] = base
        return base

    def _log_fds(self, svc: _Service) -> tuple[int | None, int | None]:
        if self.logs is None or getattr(svc.cfg, "logs", None) is None:
            return None, None
        if svc.log_fds is None:
            svc.log_fds = self.logs.open(svc.sid, svc.name, svc.cfg.logs)
        return svc.log_fds

    def _probe(self, sid: int, probe: int, seq: int) -> None:
        svc = self._services[sid]
        spec = svc.cfg.readiness if probe == Probe.READINESS else svc.cfg.liveness
        if self.probes is None or spec is None:
            # No way to run it: a failed result keeps the engine honest.
            self._queue.extend(self.engine.probe_result(sid, probe, seq, False))
            return
        # Only an exec probe has an environment; http and tcp run per second
        # by the thousand and must not copy one.
        env = None
        if spec.kind == "exec":
            env = self._base_env(svc.cfg.env).copy()
            env["FASTORCH_SERVICE"] = svc.name
        self.probes.run(sid, probe, seq, spec, env, svc.cfg.cwd)

    def _on_transition(self, sid: int, from_: int, to: int, reason: int) -> None:
        svc = self._services[sid]
        old, new, why = State(from_), State(to), Reason(reason)
        now = time.time()
        svc.since = now
        svc.reason = why.name.lower()
        self.stats.transitions += 1
        level = _log_level(old, new, why)
        if logger.isEnabledFor(level):
            fields = {
                "FASTORCH_SERVICE": svc.name,
                "FASTORCH_FROM": old.name.lower(),
                "FASTORCH_TO": new.name.lower(),
                "FASTORCH_PID": svc.pid,
                "MESSAGE_ID": MESSAGE_IDS[why],
            }
            if old in _ALIVE and new not in _ALIVE:
                # The process is gone: say how it ended.
                fields["FASTORCH_EXIT"] = self.engine.counters(sid)[3]
            logger.log(
                level,
                "service %s: %s -> %s (%s)",
                svc.name,
                old.name.lower(),
                new.name.lower(),
                svc.reason,
                extra=fields,
            )
        self._publish(
            {
                "event": "transition",
                "service": svc.name,
                "from": old.name.lower(),
                "to": new.name.lower(),
                "reason": svc.reason,
                "pid": svc.pid or None,
                "time": now,
            }
        )
        if self.notifier is not None and self._status_handle is None:
            interval = _seconds(self.config, "status_interval_ms", 1.0)
            self._status_handle = self._loop.call_later(interval, self._send_status)

    # -- events from the world ---------------------------------------------

    def _on_exit(self, sid: int, pid: int, status: int) -> None:
        svc = self._services.get(sid)
        if svc is None or svc.pid != pid:
            return
        svc.pid = 0
        self.stats.exits += 1
        logger.debug("service %s: pid %d exited with %d", svc.name, pid, status)
        self._advance_clock()
        self._feed(self.engine.exited(sid, status))

    def _on_probe_result(
        self, sid: int, probe: int, seq: int, ok: bool, detail: str
    ) -> None:
        svc = self._services.get(sid)
        if svc is None:
            return
        self._advance_clock()
        if self._subscribers:
            # Subscribers see cause before effect: timers that came due
            # first, then this result, then the transition it causes.
            self._feed([])
            self._publish(
                {
                    "event": "probe",
                    "service": svc.name,
                    "probe": Probe(probe).name.lower(),
                    "ok": ok,
                    "detail": detail,
                    "time": time.time(),
                }
            )
        self._feed(self.engine.probe_result(sid, probe, seq, ok))

    def _on_notify_message(self, sid: int, fields: dict[str, str]) -> None:
        svc = self._services.get(sid)
        if svc is None:
            return
        self._advance_clock()
        actions: list[tuple[int, ...]] = []
        if "STATUS" in fields:
            svc.status_text = fields["STATUS"]
        if "WATCHDOG_USEC" in fields:
            ms = _watchdog_ms(fields["WATCHDOG_USEC"])
            if ms is None:
                logger.warning(
                    "service %s: ignoring WATCHDOG_USEC=%r",
                    svc.name,
                    fields["WATCHDOG_USEC"][:40],
                )
            else:
                actions += self.engine.set_watchdog(sid, ms)
        if fields.get("READY") == "1":
            actions += self.engine.notify_ready(sid)
        if fields.get("WATCHDOG") == "1":
            actions += self.engine.notify_watchdog(sid)
        self._feed(actions)

    # -- the one timer -----------------------------------------------------

    def _advance_clock(self) -> None:
        # The engine's clock moves only with advance(): bring it to now
        # before each event, so the delays it computes start from now and
        # the timers that came due fire before the event, in time order.
        now = max(self._now(), self._last_now)
        self._last_now = now
        self._queue.extend(self.engine.advance(now))

    def _arm_timer(self) -> None:
        deadline = self.engine.next_deadline()
        if deadline is not None:
            # Round up to the slack: the timers of a few milliseconds fire in
            # one wake-up. Waking the loop costs about as much as a tcp probe
            # itself; with 1000 probes a second this halves fastorch's CPU
            # for at most _TIMER_SLACK_MS of delay (docs/health.md).
            deadline = -(-deadline // _TIMER_SLACK_MS) * _TIMER_SLACK_MS
        if deadline == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is not None:
            self._timer = self._loop.call_at(deadline / 1000, self._on_timer)

    def _on_timer(self) -> None:
        deadline = self._timer_at or 0
        self._timer = None
        self._timer_at = None
        # The loop may wake a fraction of a millisecond early; the timer was
        # armed for `deadline`, so that much time has passed.
        now = max(self._now(), self._last_now, deadline)
        self._last_now = now
        self._feed(self.engine.advance(now))

    # -- readiness and systemd ---------------------------------------------

    def _check_settled(self) -> None:
        if self._ready_sent:
            return
        mode = getattr(getattr(self.config, "supervisor", None), "ready_when", "")
        wanted = _STARTED if mode == "started" else _SETTLED
        for svc in self._services.values():
            if svc.cfg.autostart and self.engine.state(svc.sid) not in wanted:
                return
        self._ready_sent = True
        logger.info("initial start settled: %s", self.summary())
        if self.notifier is not None:
            self.notifier.status(self.summary())
            self.notifier.ready()

    def summary(self) -> str:
        """One line: "412/420 ready, 3 starting, 5 failed"."""
        counts = self.engine.count_by_state()
        ready = counts[State.READY] + counts[State.COMPLETED]
        starting = sum(
            counts[s] for s in (State.WAITING, State.STARTING, State.RUNNING)
        )
        return (
            f"{ready}/{len(self._services)} ready, {starting} starting, "
            f"{counts[State.FAILED]} failed"
        )

    def _send_status(self) -> None:
        self._status_handle = None
        if self.notifier is not None:
            self.notifier.status(self.summary())

    def _schedule_watchdog(self) -> None:
        interval = self.notifier.watchdog_interval

        def ping() -> None:
            self.notifier.watchdog()
            self._aux_timers[0] = self._loop.call_later(interval, ping)

        self._aux_timers.insert(0, self._loop.call_later(interval, ping))

    def _schedule_lag_check(self) -> None:
        # One sample a second: how late the loop ran a callback due now.
        def sample(expected: float) -> None:
            now = self._loop.time()
            self.stats.loop_lag.append(max(0.0, now - expected))
            self._aux_timers[-1] = self._loop.call_at(now + 1.0, sample, now + 1.0)

        start = self._loop.time() + 1.0
        self._aux_timers.append(self._loop.call_at(start, sample, start))

    # -- waiting for services ----------------------------------------------

    def _wait_inactive(self, sids: Iterable[int]) -> asyncio.Future[None]:
        fut = self._loop.create_future()
        self._waiters.append((set(sids), fut))
        self._check_waiters()
        return fut

    def _check_waiters(self) -> None:
        if not self._waiters:
            return
        pending = []
        for sids, fut in self._waiters:
            if fut.done():
                continue
            if all(self.engine.state(s) in _INACTIVE for s in sids):
                fut.set_result(None)
            else:
                pending.append((sids, fut))
        self._waiters = pending

    # -- the control surface -----------------------------------------------

    def services(
        self, state: str | None = None, pattern: str | None = None
    ) -> list[dict[str, Any]]:
        """Status rows, optionally filtered by state name and name glob."""
        rows = []
        for sid, svc in self._services.items():
            if pattern and not fnmatch.fnmatchcase(svc.name, pattern):
                continue
            row = self._row(sid, svc)
            if state and row["state"] != state.lower():
                continue
            rows.append(row)
        return rows

    def service(self, name: str) -> dict[str, Any]:
        """One status row plus ``config``: the effective definition."""
        sid = self._sid(name)
        row = self._row(sid, self._services[sid])
        row["config"] = _to_builtins(self._services[sid].cfg)
        return row

    def _row(self, sid: int, svc: _Service) -> dict[str, Any]:
        info = self.engine.info(sid)
        state = State(info.state)
        alive = svc.pid != 0
        uptime = max(0, self._now() - info.spawned_at_ms) / 1000 if alive else 0.0
        return {
            "name": svc.name,
            "state": state.name.lower(),
            "pid": svc.pid or None,
            "uptime_s": uptime,
            "restarts": info.restarts,
            "last_exit": info.last_exit,
            "ready": bool(info.is_ready),
            "healthy": alive
            and state != State.UNHEALTHY
            and info.liveness_failures == 0,
            "status_text": svc.status_text,
            "since": svc.since,
            "reason": svc.reason,
        }

    def start(self, names: Iterable[str] | None = None) -> list[str]:
        """Start services (and their dependencies); None means all."""
        sids = self._sids(names)
        self._advance_clock()
        self._feed(self.engine.start(sids))
        return [self._services[s].name for s in sids]

    def stop(self, names: Iterable[str] | None = None) -> list[str]:
        """Stop services (and their dependents first); None means all."""
        sids = self._sids(names)
        self._advance_clock()
        self._feed(self.engine.stop(sids))
        return [self._services[s].name for s in sids]

    def restart(self, names: Iterable[str] | None = None) -> list[str]:
        """Restart services; their active dependents come back after them."""
        sids = self._sids(names)
        self._advance_clock()
        self._feed(self.engine.restart(sids))
        return [self._services[s].name for s in sids]

    def signal(self, name: str, signo: int) -> None:
        """Send *signo* to the service's process group.

        Raises:
            EngineError: the service has no process.
        """
        svc = self._services[self._sid(name)]
        if not svc.pid or not self.table.signal_group(svc.pid, signo):
            raise EngineError(f"service {name!r} has no process")

    def subscribe(self, maxsize: int = 1024) -> Subscription:
        """Transitions and probe results from now on."""
        sub = Subscription(maxsize, on_close=self._subscribers.discard)
        self._subscribers.add(sub)
        return sub

    def _publish(self, event: dict[str, Any]) -> None:
        for sub in list(self._subscribers):
            sub.push(event)

    def tail(self, name: str, n: int = 100) -> list[str]:
        """The last *n* lines of the service's output (file mode only)."""
        self._sid(name)
        if self.logs is None:
            return []
        return list(self.logs.tail(name, n))

    def log_source(self, name: str) -> dict[str, Any]:
        """Where the service's output goes, and, for the journal, the
        fields that find its lines there: the stream's identifier (the
        service name) on the stdout transport."""
        self._sid(name)
        destination = None if self.logs is None else self.logs.destination(name)
        source: dict[str, Any] = {"destination": destination}
        if destination == "journal":
            source["journal"] = {"SYSLOG_IDENTIFIER": name, "_TRANSPORT": "stdout"}
        return source

    def follow(self, name: str, maxsize: int = 1024) -> Subscription:
        """New lines of the service's output, as ``{"line": ...}`` items."""
        self._sid(name)
        if self.logs is None:
            return Subscription(maxsize)
        unsubscribe: Callable[[], None] | None = None

        def closed(_: Subscription) -> None:
            if unsubscribe is not None:
                unsubscribe()

        sub = Subscription(maxsize, on_close=closed)
        unsubscribe = self.logs.listen(
            name, lambda line: sub.push({"service": name, "line": line})
        )
        return sub

    def graph(self) -> dict[str, Any]:
        """Nodes (with state), edges (with condition) and start levels."""
        eng = self.engine
        nodes = [
            {"name": s.name, "state": State(eng.state(sid)).name.lower()}
            for sid, s in self._services.items()
        ]
        edges = [
            {
                "from": s.name,
                "to": eng.name(on),
                "condition": Condition(cond).name.lower(),
            }
            for sid, s in self._services.items()
            for on, cond in eng.dependencies(sid)
        ]
        levels = [[eng.name(sid) for sid in level] for level in eng.levels()]
        return {"nodes": nodes, "edges": edges, "levels": levels}

    def graph_dot(self) -> str:
        """The dependency graph in Graphviz DOT."""
        g = self.graph()
        lines = ["digraph fastorch {", "  rankdir=LR;"]
        for node in g["nodes"]:
            lines.append(
                f'  "{node["name"]}" [label="{node["name"]}\\n{node["state"]}"];'
            )
        for e in g["edges"]:
            lines.append(f'  "{e["from"]}" -> "{e["to"]}" [label="{e["condition"]}"];')
        lines.append("}")
        return "\n".join(lines) + "\n"

    # -- live configuration --------------------------------------------------

    def load_config(self) -> Any:
        """Read the config file and merge the drop-in directory over it."""
        cfg = configmod.load(self.config.path)
        return merge_drop_ins(cfg, self.drop_in_dir)

    async def reload(self) -> dict[str, list[str]]:
        """Re-read the file and drop-ins; apply the difference.

        Raises:
            ConfigError: the new configuration is invalid; nothing changed.
        """
        if self.notifier is not None:
            self.notifier.reloading()
        try:
            try:
                new = self.load_config()
            except ConfigError as exc:
                self.stats.failed_reloads += 1
                for path, reason in exc.problems:
                    logger.error("reload refused: %s: %s", path or "config", reason)
                raise
            result = await self._apply(new)
            self.stats.reloads += 1
            logger.info(
                "reloaded: %d added, %d removed, %d changed",
                len(result["added"]),
                len(result["removed"]),
                len(result["changed"]),
            )
            return result
        finally:
            if self.notifier is not None and self._ready_sent:
                self.notifier.ready()

    async def _apply(self, new: Any) -> dict[str, list[str]]:
        d = configmod.diff(self.config, new)
        added, removed, changed = list(d.added), list(d.removed), list(d.changed)
        self.config = new
        eng = self.engine

        # Edges of changed services first, so stopping a removed service
        # does not drag along a service that no longer depends on it.
        for name in changed:
            sid = self._by_name[name]
            for on, _ in eng.dependencies(sid):
                eng.remove_dependency(sid, on)
        for name in added:
            self._add(new.services[name])
        for name in changed:
            sid = self._by_name[name]
            cfg = new.services[name]
            eng.configure(sid, **configmod.engine_options(cfg))
            self._services[sid].cfg = cfg
        self._add_edges(new.services[name] for name in added + changed)

        self._advance_clock()
        if removed:
            sids = [self._by_name[n] for n in removed]
            self._feed(eng.stop(sids))
            await self._wait_inactive(sids)
            for name, sid in zip(removed, sids, strict=True):
                self._forget(name, sid)
        restart = [
            self._by_name[n]
            for n in changed
            if eng.state(self._by_name[n]) not in _INACTIVE
        ]
        start = [self._by_name[n] for n in added if new.services[n].autostart]
        if restart:
            self._feed(eng.restart(restart))
        if start:
            self._feed(eng.start(start))
        return {"added": added, "removed": removed, "changed": changed}

    def _forget(self, name: str, sid: int) -> None:
        self.engine.remove_service(sid)
        svc = self._services.pop(sid)
        del self._by_name[name]
        if svc.notify_path is not None and self.notify is not None:
            self.notify.close(sid)
        if svc.log_fds is not None and self.logs is not None:
            self.logs.release(sid)

    async def put_service(self, name: str, table: dict[str, Any]) -> dict[str, Any]:
        """Add or replace one definition and keep it in the drop-in dir.

        Raises:
            ConfigError: the definition is invalid (nothing changed).
        """
        new = replace_service(self.config, name, table)
        self.drop_in_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.drop_in_dir / f"{name}.toml", dump_toml(table))
        (self.drop_in_dir / f"{name}{_DELETED_SUFFIX}").unlink(missing_ok=True)
        result = await self._apply(new)
        return {**result, "services": [self.service(n) for n in new.groups[name]]}

    async def delete_service(self, name: str) -> None:
        """Stop the service (its instances too), then remove it for good."""
        if name not in self.config.groups:
            raise UnknownServiceError(f"unknown service {name!r}")
        members = set(self.config.groups[name])
        needed_by = sorted(
            {
                svc.group_name
                for svc in self.config.services.values()
                if svc.name not in members
                and any(dep in members for dep, _ in svc.depends_on)
            }
        )
        if needed_by:
            # Removing it would leave them depending on nothing that exists.
            raise EngineError(
                f"service {name!r} is needed by "
                + ", ".join(repr(n) for n in needed_by)
                + ": change or delete them first"
            )
        new = replace_service(self.config, name, None)
        self.drop_in_dir.mkdir(parents=True, exist_ok=True)
        (self.drop_in_dir / f"{name}.toml").unlink(missing_ok=True)
        if name in (self.config.source or {}).get("services", {}):
            # Defined in the main file: a marker keeps it deleted on reload.
            _atomic_write(self.drop_in_dir / f"{name}{_DELETED_SUFFIX}", "")
        await self._apply(new)


# -- drop-ins ------------------------------------------------------------


def merge_drop_ins(cfg: Any, directory: Path) -> Any:
    """*cfg* with each ``<name>.toml`` of *directory* defining service *name*.

    A ``<name>.deleted`` marker removes a service of the main file. Every
    error of every drop-in is reported at once.
    """
    if not directory.is_dir():
        return cfg
    problems: list[tuple[str, str]] = []
    for path in sorted(directory.iterdir()):
        name = path.stem
        try:
            if path.suffix == ".toml":
                with path.open("rb") as f:
                    table = tomllib.load(f)
                cfg = replace_service(cfg, name, table)
            elif path.suffix == _DELETED_SUFFIX:
                cfg = replace_service(cfg, name, None)
        except ConfigError as exc:
            problems += [
                (f"{path}: {p}" if p else str(path), r) for p, r in exc.problems
            ]
        except (OSError, tomllib.TOMLDecodeError) as exc:
            problems.append((str(path), str(exc)))
    if problems:
        raise ConfigError(problems)
    return cfg


def replace_service(cfg: Any, name: str, table: dict[str, Any] | None) -> Any:
    """A copy of *cfg* with service *name* (all instances) replaced or removed.

    Raises:
        ConfigError: the result is invalid (bad table, unknown dependency,
            cycle).
    """
    if table is None:
        if name not in cfg.groups:
            return cfg
        return configmod.without_service(cfg, name)
    return configmod.with_service(cfg, name, table)


def dump_toml(table: dict[str, Any]) -> str:
    """A TOML document for a service table (scalars, lists, nested tables)."""
    lines = []
    nested = []
    for key, value in table.items():
        if isinstance(value, dict):
            nested.append((key, value))
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in nested:
        lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_key(key: str) -> str:
    ok = key and all(c.isalnum() or c in "-_" for c in key)
    return key if ok else _toml_string(key)


def _toml_string(s: str) -> str:
    out = s.replace("\\", "\\\\").replace('"', '\\"')
    for ch, esc in (("\n", "\\n"), ("\t", "\\t"), ("\r", "\\r")):
        out = out.replace(ch, esc)
    return f'"{out}"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(
            f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()
        )
        return "{ " + items + " }" if items else "{}"
    raise ConfigError([("", f"cannot store value {value!r} in TOML")])


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _to_builtins(obj: Any) -> Any:
    try:
        import msgspec

        return msgspec.to_builtins(obj)
    except (ImportError, TypeError):
        return repr(obj)


def _watchdog_ms(value: str) -> int | None:
    """A child's WATCHDOG_USEC= in whole ms; None when it is not a number.

    As under systemd, 0 and USEC_INFINITY turn the watchdog off. A value
    below a millisecond rounds up to one (the engine's tick), and a value
    past the engine's horizon is cut to it.
    """
    value = value.strip()
    if not (value.isascii() and value.isdigit()):
        return None
    usec = int(value)
    if usec == 0 or usec >= 2**64 - 1:  # USEC_INFINITY
        return 0
    return min(MAX_DURATION_MS, -(-usec // 1000))


def _seconds(cfg: Any, attr: str, default: float) -> float:
    value = getattr(getattr(cfg, "supervisor", None), attr, None)
    return default if value is None else value / 1000


def _rmtree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _hang() -> None:
    time.sleep(3600)
