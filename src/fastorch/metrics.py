"""Prometheus metrics of fastorch, read from the engine at scrape time.

Nothing on the supervisor's hot path touches a metric object: the
collector walks the engine's per-service counters and the supervisor's
:class:`SupervisorStats` when Prometheus scrapes, and only then. The state
of a service is exported as a label of one series (``state="ready"``), so a
service costs a fixed, small number of series (see docs/metrics.md).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from fastorch._core import State

log = logging.getLogger(__name__)

STATE_NAMES = tuple(state.name.lower() for state in State)
# States in which the service has a live process.
_UP_STATES = frozenset({"running", "ready", "unhealthy", "stopping"})
EXIT_KINDS = ("success", "failure", "signal")

# Event-loop lag: the loop is healthy well under a millisecond; anything
# past 100 ms is visible to probes and the API.
LOOP_LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class CumulativeHistogram:
    """Bucket counts, a sum and a count that only grow.

    The collector folds the supervisor's raw samples into one of these at
    scrape time, so the exported histogram stays monotonic even when the
    supervisor keeps only a bounded window of samples.
    """

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Add one sample (seconds)."""
        if value != value or value < 0:  # NaN or negative: a clock glitch
            return
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative ``(le, count)`` pairs, ``+Inf`` last."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            running += n
            out.append((_float_label(bound), running))
        out.append(("+Inf", running + self.counts[-1]))
        return out


def _float_label(value: float) -> str:
    return repr(float(value))


def _drain(source: Any) -> Iterator[float]:
    """Take every new sample out of ``source`` (a deque or list of seconds)."""
    popleft = getattr(source, "popleft", None)
    if popleft is not None:
        while True:
            try:
                yield float(popleft())
            except IndexError:
                return
    elif isinstance(source, list):
        samples = source[:]
        del source[: len(samples)]
        yield from (float(s) for s in samples)


def _histogram_family(
    name: str, doc: str, source: Any, fold: CumulativeHistogram
) -> HistogramMetricFamily:
    """Export ``source``: raw samples (seconds) folded into ``fold``."""
    if source is not None:
        for value in _drain(source):
            fold.observe(value)
    family = HistogramMetricFamily(name, doc)
    family.add_metric([], fold.buckets(), fold.sum)
    return family


def _probe_family(source: Any) -> HistogramMetricFamily:
    """Probe durations by probe kind (http, tcp, exec), kept by the runner."""
    family = HistogramMetricFamily(
        "fastorch_probe_duration_seconds",
        "duration of health probe runs, all services together",
        labels=["kind"],
    )
    for kind in getattr(source, "KINDS", ()):
        family.add_metric([kind], source.buckets(kind), source.sum(kind))
    return family


def _stat(stats: Any, *names: str, default: Any = 0) -> Any:
    for name in names:
        value = (
            stats.get(name) if isinstance(stats, dict) else getattr(stats, name, None)
        )
        if value is not None:
            return value
    return default


def exit_kind(status: int | None) -> str | None:
    """Classify an exit status: ``success`` (0), ``failure`` or ``signal``."""
    if status is None:
        return None
    if status < 0:
        return "signal"
    return "success" if status == 0 else "failure"


# Per-service families: (name, type, help). Rendered as text directly, see
# ServiceMetrics.
SERVICE_FAMILIES = (
    ("fastorch_service_up", "gauge", "1 when the service has a live process"),
    (
        "fastorch_service_state",
        "gauge",
        "current state of the service as the state label (value always 1)",
    ),
    ("fastorch_service_ready", "gauge", "1 when the service is ready"),
    (
        "fastorch_service_restarts_total",
        "counter",
        "restarts fastorch made after an exit",
    ),
    (
        "fastorch_service_exits_total",
        "counter",
        "process exits by kind (success, failure, signal)",
    ),
    (
        "fastorch_service_probe_failures_total",
        "counter",
        "failed readiness and liveness probe runs",
    ),
    (
        "fastorch_service_last_transition_timestamp_seconds",
        "gauge",
        "wall-clock time of the last state change",
    ),
)


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class ServiceMetrics:
    """Renders the per-service families in the Prometheus text format.

    A fleet of thousands makes these most of a scrape, and building a
    ``Metric`` object and a ``Sample`` tuple per series, then formatting
    each through prometheus-client, costs several times more than writing
    the lines here. Escaped label sets are cached per service name.
    """

    def __init__(self, supervisor: Any, exits: ExitCounter) -> None:
        self.supervisor = supervisor
        self.exits = exits
        self._labels: dict[str, str] = {}

    def _label(self, name: str) -> str:
        label = self._labels.get(name)
        if label is None:
            if len(self._labels) > 4 * len(self.supervisor.engine) + 64:
                # Renamed and removed services: start the cache afresh.
                self._labels.clear()
            label = self._labels[name] = 'service="' + _escape_label(name) + '"'
        return label

    def render(self) -> str:
        """The per-service families as one text block."""
        sup = self.supervisor
        engine = sup.engine
        rows = sup.services()
        exits_seen = self.exits.counts
        up: list[str] = []
        state: list[str] = []
        ready: list[str] = []
        restarts: list[str] = []
        exits: list[str] = []
        probe_failures: list[str] = []
        since: list[str] = []

        for row in rows:
            name = row["name"]
            try:
                info = engine.info(engine.sid(name))
            except KeyError:
                # Removed between the two reads: gone at the next scrape.
                continue
            label = self._label(name)
            current = row["state"]
            up.append(f"{{{label}}} {1 if current in _UP_STATES else 0}\n")
            state.append(f'{{{label},state="{current}"}} 1\n')
            ready.append(f"{{{label}}} {1 if row['ready'] else 0}\n")
            restarts.append(f"{{{label}}} {row['restarts']}\n")
            probe_failures.append(f"{{{label}}} {info.probe_failures_total}\n")
            since.append(f"{{{label}}} {float(row['since'] or 0.0)!r}\n")
            counts: Sequence[int] = _NO_EXITS
            kept = _exits_of(info)
            if kept is not None:
                counts = kept
            elif name in exits_seen:
                counts = exits_seen[name]
            for kind, count in zip(EXIT_KINDS, counts, strict=True):
                exits.append(f'{{{label},kind="{kind}"}} {count}\n')

        if len(exits_seen) > len(rows):
            self.exits.prune(row["name"] for row in rows)
        out = []
        series = (up, state, ready, restarts, exits, probe_failures, since)
        for (family, kind, doc), lines in zip(SERVICE_FAMILIES, series, strict=True):
            out.append(f"# HELP {family} {doc}\n# TYPE {family} {kind}\n")
            if lines:
                out.append(family + family.join(lines))
        return "".join(out)


class FastorchCollector(Collector):
    """Supervisor-wide metrics, read when Prometheus scrapes."""

    def __init__(self, supervisor: Any) -> None:
        self.supervisor = supervisor
        self._loop_lag = CumulativeHistogram(LOOP_LAG_BUCKETS)

    def describe(self) -> Iterable[Metric]:
        # Not describing keeps registration from running a full collect.
        return []

    def collect(self) -> Iterable[Metric]:
        """Yield every supervisor-wide metric family."""
        try:
            yield from self._supervisor()
        except Exception:
            # A failed scrape must not take the supervisor down.
            log.error("metrics: reading supervisor stats failed", exc_info=True)

    def _supervisor(self) -> Iterator[Metric]:
        sup = self.supervisor
        stats = sup.stats
        engine = sup.engine

        by_state = GaugeMetricFamily(
            "fastorch_services", "services in each state", labels=["state"]
        )
        counts = engine.count_by_state()
        for index, label in enumerate(STATE_NAMES):
            by_state.add_metric([label], float(counts[index]))
        yield by_state
        yield CounterMetricFamily(
            "fastorch_reloads",
            "configuration reloads carried out",
            value=float(_stat(stats, "reloads")),
        )
        yield CounterMetricFamily(
            "fastorch_reload_failures",
            "configuration reloads refused (invalid config)",
            value=float(_stat(stats, "failed_reloads", "reload_failures")),
        )
        yield _histogram_family(
            "fastorch_event_loop_lag_seconds",
            "delay of the supervisor's event loop behind its schedule",
            _stat(stats, "loop_lag", "loop_lag_samples", default=None),
            self._loop_lag,
        )
        probes = _stat(stats, "probe_durations", default=None)
        yield _probe_family(probes)
        if probes is not None and hasattr(probes, "failures"):
            failed = CounterMetricFamily(
                "fastorch_probe_failures",
                "failed health probe runs by probe kind",
                labels=["kind"],
            )
            for kind in probes.KINDS:
                failed.add_metric([kind], float(probes.failures(kind)))
            yield failed
        yield GaugeMetricFamily(
            "fastorch_engine_timers",
            "timers pending in the engine's wheel",
            value=float(engine.pending_timers()),
        )
        yield GaugeMetricFamily(
            "fastorch_engine_memory_bytes",
            "memory held by the engine's C structures",
            value=float(engine.memory_bytes()),
        )
        started = _stat(stats, "started_at", "start_time", default=None)
        if started:
            yield GaugeMetricFamily(
                "fastorch_start_time_seconds",
                "wall-clock time fastorch started",
                value=float(started),
            )


def _exits_of(info: Any) -> tuple[int, ...] | None:
    """Exit counts by kind kept by the engine, when it keeps them."""
    counts = [getattr(info, f"exits_{kind}", None) for kind in EXIT_KINDS]
    if any(c is None for c in counts):
        return None
    return tuple(counts)  # type: ignore[arg-type]


_NO_EXITS = (0,) * len(EXIT_KINDS)
# A fleet start publishes a few transitions per service in one go; the
# counter must hold them all until its task runs.
EXIT_QUEUE = 1 << 16


class ExitCounter:
    """Counts each service's exits by kind from the supervisor's events.

    An exit is a transition out of a state with a process into one
    without; its kind comes from the engine's ``last_exit``. The counter
    reads a subscription in its own task, so the supervisor only queues
    the event it publishes anyway.
    """

    def __init__(self, supervisor: Any) -> None:
        self.supervisor = supervisor
        self.counts: dict[str, list[int]] = {}
        self._subscription: Any = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start counting (on the supervisor's running loop)."""
        if self._task is None:
            loop = asyncio.get_running_loop()
            self._task = loop.create_task(self._run(), name="fastorch-exit-counter")

    async def aclose(self) -> None:
        """Stop counting."""
        task, self._task = self._task, None
        if self._subscription is not None:
            self._subscription.close()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            subscription = self.supervisor.subscribe(maxsize=EXIT_QUEUE)
            self._subscription = subscription
            async for event in subscription:
                self.note(event)
            if not getattr(subscription, "dropped", False):
                return
            log.warning("metrics: exit counter fell behind, some exits not counted")

    def note(self, event: dict[str, Any]) -> None:
        """Count ``event`` if it is an exit."""
        if event.get("event") != "transition":
            return
        if event.get("from") not in _UP_STATES or event.get("to") in _UP_STATES:
            return
        name = event["service"]
        engine = self.supervisor.engine
        try:
            status = engine.info(engine.sid(name)).last_exit
        except KeyError:
            return
        kind = exit_kind(status)
        if kind is None:
            return
        counts = self.counts.setdefault(name, [0] * len(EXIT_KINDS))
        counts[EXIT_KINDS.index(kind)] += 1

    def prune(self, names: Iterable[str]) -> None:
        """Forget services that are gone."""
        for name in set(self.counts) - set(names):
            del self.counts[name]


class MetricsExporter:
    """Everything ``GET /metrics`` answers with.

    The per-service families come from :class:`ServiceMetrics`; the
    supervisor-wide ones and the standard process metrics go through a
    prometheus-client registry.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, supervisor: Any, *, process: bool = True) -> None:
        self.exits = ExitCounter(supervisor)
        self.services = ServiceMetrics(supervisor, self.exits)
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = FastorchCollector(supervisor)
        self.registry.register(self.collector)
        if process:
            ProcessCollector(registry=self.registry)
        self.last_scrape_s = math.nan

    def start(self) -> None:
        """Start what must run beside the scrapes (the exit counter)."""
        self.exits.start()

    async def aclose(self) -> None:
        """Stop what :meth:`start` started."""
        await self.exits.aclose()

    def render(self) -> bytes:
        """Every metric in the Prometheus text format (version 0.0.4).

        The text format is what every Prometheus accepts; OpenMetrics would
        add nothing fastorch uses (no exemplars) and costs more to write.
        """
        started = time.perf_counter()
        try:
            head = self.services.render().encode()
        except Exception:
            # A failed scrape must not take the supervisor down.
            log.error("metrics: reading services failed", exc_info=True)
            head = b""
        body = head + generate_latest(self.registry)
        self.last_scrape_s = time.perf_counter() - started
        return body
