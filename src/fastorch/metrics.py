"""Prometheus metrics of fastorch, read from the engine at scrape time.

Nothing on the supervisor's hot path touches a metric object: the
collector walks the engine's per-service counters and the supervisor's
:class:`SupervisorStats` when Prometheus scrapes, and only then. The state
of a service is exported as a label of one series (``state="ready"``), so a
service costs a fixed, small number of series (see docs/metrics.md).
"""

from __future__ import annotations

import bisect
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
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

STATE_NAMES = (
    "stopped",
    "waiting",
    "starting",
    "running",
    "ready",
    "unhealthy",
    "stopping",
    "completed",
    "backoff",
    "failed",
)
# States in which the service has a live process.
_UP_STATES = frozenset({"running", "ready", "unhealthy", "stopping"})
EXIT_KINDS = ("success", "failure", "signal")

# Event-loop lag: the loop is healthy well under a millisecond; anything
# past 100 ms is visible to probes and the API.
LOOP_LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
# Probes: a local check answers in a millisecond, a slow one hits its
# timeout (seconds).
PROBE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


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
        out = []
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
    """Export ``source``: ready buckets, or raw samples folded into ``fold``."""
    bounds = getattr(source, "bounds", None) or getattr(source, "buckets", None)
    counts = getattr(source, "counts", None)
    if bounds is not None and counts is not None and not callable(bounds):
        # Already a histogram kept by the supervisor: export as it is.
        running = 0
        pairs = []
        for bound, n in zip(bounds, counts, strict=False):
            running += n
            pairs.append((_float_label(bound), running))
        total = running + sum(counts[len(bounds) :])
        pairs.append(("+Inf", total))
        family = HistogramMetricFamily(name, doc)
        family.add_metric([], pairs, float(getattr(source, "sum", 0.0)))
        return family
    if source is not None:
        for value in _drain(source):
            fold.observe(value)
    family = HistogramMetricFamily(name, doc)
    family.add_metric([], fold.buckets(), fold.sum)
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


class FastorchCollector(Collector):
    """Reads the engine and the supervisor's stats when Prometheus scrapes."""

    def __init__(self, supervisor: Any) -> None:
        self.supervisor = supervisor
        self._loop_lag = CumulativeHistogram(LOOP_LAG_BUCKETS)
        self._probe = CumulativeHistogram(PROBE_BUCKETS)

    def describe(self) -> Iterable[Metric]:
        # Not describing keeps registration from running a full collect.
        return []

    def collect(self) -> Iterable[Metric]:
        """Yield every fastorch metric family."""
        try:
            yield from self._services()
        except Exception:
            # A failed scrape must not take the supervisor down.
            log.error("metrics: reading services failed", exc_info=True)
        try:
            yield from self._supervisor()
        except Exception:
            log.error("metrics: reading supervisor stats failed", exc_info=True)

    def _services(self) -> Iterator[Metric]:
        sup = self.supervisor
        engine = sup.engine
        rows = sup.services()

        up = GaugeMetricFamily(
            "fastorch_service_up",
            "1 when the service has a live process",
            labels=["service"],
        )
        state = GaugeMetricFamily(
            "fastorch_service_state",
            "current state of the service, as the state label (value always 1)",
            labels=["service", "state"],
        )
        ready = GaugeMetricFamily(
            "fastorch_service_ready",
            "1 when the service is ready",
            labels=["service"],
        )
        restarts = CounterMetricFamily(
            "fastorch_service_restarts",
            "restarts fastorch made after an exit",
            labels=["service"],
        )
        exits = CounterMetricFamily(
            "fastorch_service_exits",
            "process exits by kind (success, failure, signal)",
            labels=["service", "kind"],
        )
        probe_failures = CounterMetricFamily(
            "fastorch_service_probe_failures",
            "failed readiness and liveness probe runs",
            labels=["service"],
        )
        since = GaugeMetricFamily(
            "fastorch_service_last_transition_timestamp_seconds",
            "wall-clock time of the last state change",
            labels=["service"],
        )

        exit_counts = _stat(sup.stats, "exits", default=None)
        for row in rows:
            name = row["name"]
            current = row["state"]
            labels = [name]
            up.add_metric(labels, 1.0 if current in _UP_STATES else 0.0)
            state.add_metric([name, current], 1.0)
            ready.add_metric(labels, 1.0 if row.get("ready") else 0.0)
            restarts.add_metric(labels, float(row.get("restarts") or 0))
            since.add_metric(labels, float(row.get("since") or 0.0))
            try:
                info = engine.info(engine.sid(name))
            except KeyError:
                # Removed between the two reads: it will be gone next time.
                continue
            probe_failures.add_metric(labels, float(info.probe_failures_total))
            per_kind = _exits_of(info, exit_counts, name)
            for kind in EXIT_KINDS:
                exits.add_metric([name, kind], float(per_kind.get(kind, 0)))

        yield from (up, state, ready, restarts, exits, probe_failures, since)

        by_state = GaugeMetricFamily(
            "fastorch_services", "services in each state", labels=["state"]
        )
        counts = engine.count_by_state()
        for index, label in enumerate(STATE_NAMES):
            by_state.add_metric([label], float(counts[index]))
        yield by_state

    def _supervisor(self) -> Iterator[Metric]:
        sup = self.supervisor
        stats = sup.stats
        engine = sup.engine

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
        yield _histogram_family(
            "fastorch_probe_duration_seconds",
            "duration of health probe runs (all services)",
            _stat(stats, "probe_durations", "probe_duration", default=None),
            self._probe,
        )
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


def _exits_of(info: Any, exit_counts: Any, name: str) -> dict[str, int]:
    """Exit counts by kind from the engine, else from the supervisor's stats."""
    fields = {kind: getattr(info, f"exits_{kind}", None) for kind in EXIT_KINDS}
    if all(v is not None for v in fields.values()):
        return {k: int(v) for k, v in fields.items()}  # type: ignore[arg-type]
    if exit_counts is not None:
        found = exit_counts.get(name)
        if found:
            return dict(found)
    return {}


class MetricsExporter:
    """A registry with fastorch's collector and the process collector."""

    def __init__(self, supervisor: Any, *, process: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = FastorchCollector(supervisor)
        self.registry.register(self.collector)
        if process:
            ProcessCollector(registry=self.registry)
        self.last_scrape_s = math.nan

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """Render every metric; returns ``(body, content type)``.

        ``accept`` is the request's Accept header: OpenMetrics when the
        scraper asks for it, the text format otherwise.
        """
        encoder, content_type = choose_encoder(accept or "")
        started = time.perf_counter()
        body = encoder(self.registry)
        self.last_scrape_s = time.perf_counter() - started
        return body, content_type
