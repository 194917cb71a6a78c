"""Prometheus metrics of the router, served at ``/metrics``.

Per request the proxy makes one dictionary lookup, one bisect and three
integer additions on plain Python objects (the event loop is the only
writer, and scrapes run on the same loop, so no lock is needed);
prometheus_client's own metric objects take a lock per increment, which cost
more than a tenth of a proxied request. Everything is turned into metric
families at scrape time by collectors, as are the gauges that mirror state
(in-flight requests per binding, the pointer table's revision, ready
replicas).

Sliding windows per binding (the last minute and the last five minutes,
reported to the scheduler with every load report) cost the request path
nothing either: once a second ``RequestWindows.sample`` takes the
difference of those cumulative counters since the previous sample and puts
it into a per-second bucket (``BindingWindows``); a window's figures are the
sum of its buckets. Each router process reports its own windows; the
scheduler adds up the reporters' histograms (``services/scheduler/
request_metrics.py``), so figures are merged across worker processes and
routers, and percentiles come from the merged histogram.
"""
from __future__ import annotations

import time
from array import array
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterator, MutableSequence, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from berth.internal.v1 import scheduler_internal_pb2
from services.router.control import BindingKey, LoadTracker
from services.router.platform import PlatformRequest, PlatformResponse
from services.router.table import RoutingState

LABELS = ("project", "environment", "deployment", "status_class")
# Proxy latencies span sub-millisecond to long streams.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else "error"


class RequestStats:
    """Count, sum and per-bucket counts (not cumulative) of one label set's
    requests."""

    __slots__ = ("labels", "count", "total_seconds", "buckets")

    def __init__(self, labels: tuple[str, str, str, str]) -> None:
        self.labels = labels
        self.count = 0
        self.total_seconds = 0.0
        self.buckets = [0] * (len(BUCKETS) + 1)  # the last one is +Inf

    def observe(self, seconds: float) -> None:
        self.count += 1
        self.total_seconds += seconds
        # bisect_left: a value equal to a bound belongs to that bucket (le)
        self.buckets[bisect_left(BUCKETS, seconds)] += 1


WINDOWS = (60, 300)  # seconds: the last minute and the last five minutes
# One bucket's (or window's) figures as a flat vector, summed element-wise:
# requests, responses 2xx, 3xx, 4xx, 5xx, latency sum (seconds), then the
# requests per latency bucket (BUCKETS, then +Inf; not cumulative). Other
# statuses (1xx, a failure before any status) count as requests only.
REQUESTS, SUM = 0, 5
HISTOGRAM = 6
VECTOR_LENGTH = HISTOGRAM + len(BUCKETS) + 1
Vector = list[float]
WindowKey = tuple[str, str, str]  # (project name, environment name, deployment id) as the proxy observes them


def empty_vector() -> Vector:
    return [0] * VECTOR_LENGTH


def add_into(total: MutableSequence[float], other: Sequence[float]) -> None:
    for i, value in enumerate(other):
        total[i] += value


class BindingWindows:
    """One binding's requests in per-second buckets, with a running total
    per window (``lengths`` seconds): adding a second's requests and
    dropping the seconds that left a window cost a few additions each,
    however long the windows. Only seconds that had requests take memory."""

    __slots__ = ("lengths", "_seconds", "_buckets", "_totals")

    def __init__(self, lengths: tuple[int, ...] = WINDOWS) -> None:
        self.lengths = lengths
        # Per window: the seconds inside it and their figures, as arrays
        # (objects the garbage collector never has to walk).
        self._seconds: list[deque[int]] = [deque() for _ in lengths]
        self._buckets: list[deque[array[float]]] = [deque() for _ in lengths]
        self._totals: list[array[float]] = [array("d", empty_vector()) for _ in lengths]

    def add(self, second: int, vector: Vector) -> None:
        """Adds requests finished in ``second`` (a clock read going backwards
        counts in the latest bucket)."""
        for seconds, buckets, total in zip(self._seconds, self._buckets, self._totals, strict=True):
            if seconds and seconds[-1] >= second:
                add_into(buckets[-1], vector)
            else:
                seconds.append(second)
                buckets.append(array("d", vector))
            add_into(total, vector)
        self.expire(second)

    def expire(self, now: int) -> None:
        """Drops the seconds that are no longer in their window at ``now``."""
        for length, seconds, buckets, total in zip(self.lengths, self._seconds, self._buckets, self._totals,
                                                   strict=True):
            while seconds and seconds[0] <= now - length:
                seconds.popleft()
                gone = buckets.popleft()
                for i, value in enumerate(gone):
                    total[i] -= value
            if not seconds:  # no rounding left over in the latency sum
                total[:] = array("d", empty_vector())

    @property
    def empty(self) -> bool:
        return not any(self._seconds)

    def window(self, now: int, length: int) -> Vector:
        """The requests of the last ``length`` seconds (one of ``lengths``):
        seconds ``now - length + 1`` to ``now``, the current, partial one
        included."""
        self.expire(now)
        return list(self._totals[self.lengths.index(length)])


def window_proto(vector: Vector) -> scheduler_internal_pb2.RequestWindow:
    return scheduler_internal_pb2.RequestWindow(
        requests=int(vector[REQUESTS]),
        responses_2xx=int(vector[1]), responses_3xx=int(vector[2]),
        responses_4xx=int(vector[3]), responses_5xx=int(vector[4]),
        latency_sum_seconds=float(vector[SUM]),
        latency_buckets=[int(n) for n in vector[HISTOGRAM:]],
        latency_bounds=BUCKETS,
    )


@dataclass
class _Seen:
    """A cumulative counter's values at the previous sample."""

    stats: RequestStats
    count: int
    total_seconds: float
    buckets: list[int] = field(default_factory=list)


class RequestWindows:
    """Sliding windows per binding, filled once a second from the cumulative
    per-status counters (``RouterMetrics._stats``) by difference, so the
    request path does no extra work. A counter that was replaced (the
    bounded table was cleared) or went down counts from zero again."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._seen: dict[tuple[str, str, str, int], _Seen] = {}
        self.bindings: dict[WindowKey, BindingWindows] = {}

    def sample(self, stats: dict[tuple[str, str, str, int], RequestStats]) -> int:
        """Moves what the counters gained since the last sample into the
        current second's bucket; returns that second."""
        second = int(self._clock())
        gained: dict[WindowKey, Vector] = {}
        for key, current in list(stats.items()):
            project, environment, deployment, status = key
            if not deployment:
                continue  # unrouted requests belong to no binding
            seen = self._seen.get(key)
            if seen is None or seen.stats is not current or current.count < seen.count:
                seen = _Seen(current, 0, 0.0, [0] * len(current.buckets))
            if current.count == seen.count:
                continue
            vector = gained.get((project, environment, deployment))
            if vector is None:
                vector = gained[(project, environment, deployment)] = empty_vector()
            requests = current.count - seen.count
            vector[REQUESTS] += requests
            status_class_index = status // 100
            if 2 <= status_class_index <= 5:
                vector[status_class_index - 1] += requests
            vector[SUM] += current.total_seconds - seen.total_seconds
            for i, (now_n, then_n) in enumerate(zip(current.buckets, seen.buckets, strict=True)):
                vector[HISTOGRAM + i] += now_n - then_n
            self._seen[key] = _Seen(current, current.count, current.total_seconds, list(current.buckets))
        if len(self._seen) > len(stats):  # counters cleared: forget the ones gone
            self._seen = {k: v for k, v in self._seen.items() if stats.get(k) is v.stats}
        for binding, vector in gained.items():
            windows = self.bindings.get(binding)
            if windows is None:
                windows = self.bindings[binding] = BindingWindows()
            windows.add(second, vector)
        for binding, windows in list(self.bindings.items()):
            windows.expire(second)
            if windows.empty:
                del self.bindings[binding]
        return second

    def windows(self, second: int) -> dict[WindowKey, tuple[Vector, ...]]:
        """Each binding's windows at ``second``, in ``WINDOWS`` order."""
        return {key: tuple(w.window(second, length) for length in WINDOWS) for key, w in self.bindings.items()}


Snapshot = dict[str, Any]  # one process's figures as JSON (see RouterMetrics.snapshot)


class _Collector(Collector):
    """Turns this process's figures, and those other router worker processes
    published (``peers``), into metric families at scrape time."""

    def __init__(self, metrics: RouterMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Any]:
        metrics = self._metrics
        snapshots = [metrics.snapshot(), *metrics.peers()]
        requests: dict[tuple[str, ...], tuple[int, float, list[int]]] = {}
        fallbacks: dict[tuple[str, ...], int] = {}
        in_flight: dict[tuple[str, ...], int] = {}
        for snap in snapshots:
            for *labels, count, total, buckets in snap["requests"]:
                key = tuple(labels)
                had_count, had_total, had_buckets = requests.get(key, (0, 0.0, [0] * len(buckets)))
                requests[key] = (had_count + count, had_total + total,
                                 [a + b for a, b in zip(had_buckets, buckets, strict=True)])
            for *labels, count in snap["fallbacks"]:
                fallbacks[tuple(labels)] = fallbacks.get(tuple(labels), 0) + count
            for *labels, count in snap["in_flight"]:
                in_flight[tuple(labels)] = in_flight.get(tuple(labels), 0) + count

        request_family = CounterMetricFamily("berth_router_requests", "Requests answered by the router",
                                             labels=LABELS)
        latency = HistogramMetricFamily(
            "berth_router_request_duration_seconds", "Time from request head to the end of the response",
            labels=LABELS,
        )
        bounds = [*(repr(float(b)) for b in BUCKETS), "+Inf"]
        for labels, (count, total, buckets) in requests.items():
            request_family.add_metric(list(labels), count)
            cumulative, running = [], 0
            for bound, n in zip(bounds, buckets, strict=True):
                running += n
                cumulative.append((bound, running))
            latency.add_metric(list(labels), cumulative, total)
        yield request_family
        yield latency
        fallback_family = CounterMetricFamily(
            "berth_router_fallback_requests",
            "Requests served by the previous deployment because the current one failed",
            labels=["project", "environment"],
        )
        for labels, count in fallbacks.items():
            fallback_family.add_metric(list(labels), count)
        yield fallback_family
        in_flight_family = GaugeMetricFamily(
            "berth_router_in_flight_requests", "Requests being served now, per binding",
            labels=["project", "environment", "deployment"],
        )
        for labels, count in in_flight.items():
            in_flight_family.add_metric(list(labels), count)
        yield in_flight_family
        yield GaugeMetricFamily("berth_router_in_flight_total", "Requests being served now",
                                value=sum(snap["in_flight_total"] for snap in snapshots))
        yield GaugeMetricFamily("berth_router_held_requests", "Requests held waiting for a ready replica",
                                value=sum(snap["held"] for snap in snapshots))
        yield GaugeMetricFamily("berth_router_workers", "Router worker processes whose figures are included",
                                value=len(snapshots))
        # What this process's own view of the platform is (the workers' views converge).
        state = metrics.state
        yield GaugeMetricFamily(
            "berth_router_pointer_table_revision", "Registry revision the routing table reflects",
            value=state.revision,
        )
        yield GaugeMetricFamily(
            "berth_router_environments", "Environments in the routing table", value=len(state.table.environments)
        )
        ready = sum(len(a) for a in state.endpoints.snapshot().values())
        yield GaugeMetricFamily("berth_router_ready_replicas", "Ready replica addresses known", value=ready)


class RouterMetrics:
    def __init__(
        self,
        state: RoutingState,
        load: LoadTracker,
        held: Callable[[], int] = lambda: 0,
        peers: Callable[[], list[Snapshot]] = list,
    ) -> None:
        """``peers``: the latest snapshots of the other router worker
        processes serving the same port (none when there is one process)."""
        self.state = state
        self.load = load
        self.held = held
        self.peers = peers
        self._stats: dict[tuple[str, str, str, int], RequestStats] = {}
        self._fallbacks: dict[tuple[str, str], int] = {}
        self.windows = RequestWindows()
        # The load reports carry the windows (LoadTracker.drain_report).
        load.request_windows = self.request_windows
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_Collector(self))

    def observe(self, project: str, environment: str, deployment: str, status: int, seconds: float) -> None:
        key = (project, environment, deployment, status)  # the status itself: no label formatting per request
        stats = self._stats.get(key)
        if stats is None:
            if len(self._stats) > 50_000:  # bounded memory however many deployments come and go (a counter reset)
                self._stats.clear()
            stats = self._stats[key] = RequestStats((project, environment, deployment, status_class(status)))
        stats.observe(seconds)

    def request_windows(self) -> dict[BindingKey, tuple[str, tuple[scheduler_internal_pb2.RequestWindow, ...]]]:
        """Samples the counters, then per binding (environment id,
        deployment id) its project id and its windows as sent with a load
        report. Names the routing table no longer knows (an environment
        deleted) are left out."""
        second = self.windows.sample(self._stats)
        table = self.state.table
        found: dict[BindingKey, tuple[str, tuple[scheduler_internal_pb2.RequestWindow, ...]]] = {}
        for (project, environment, deployment), vectors in self.windows.windows(second).items():
            project_id = table.project_id(project)
            env = table.environment(project_id, environment) if project_id else None
            if env is None or project_id is None:
                continue
            found[(env.id, deployment)] = (project_id, tuple(window_proto(v) for v in vectors))
        return found

    def fallback(self, project: str, environment: str) -> None:
        """A request served by the previous deployment (the current one failed)."""
        key = (project, environment)
        self._fallbacks[key] = self._fallbacks.get(key, 0) + 1

    def snapshot(self) -> Snapshot:
        """This process's figures as JSON, for ``/metrics`` of any worker."""
        requests: dict[tuple[str, str, str, str], list[Any]] = {}
        for stats in list(self._stats.values()):  # statuses of one class are summed
            entry = requests.get(stats.labels)
            if entry is None:
                requests[stats.labels] = [*stats.labels, stats.count, stats.total_seconds, list(stats.buckets)]
            else:
                entry[4] += stats.count
                entry[5] += stats.total_seconds
                entry[6] = [a + b for a, b in zip(entry[6], stats.buckets, strict=True)]
        return {
            "requests": list(requests.values()),
            "fallbacks": [[*key, count] for key, count in self._fallbacks.items()],
            "in_flight": [[load.project_name, load.environment_name, deployment_id, load.in_flight]
                          for (_, deployment_id), load in list(self.load.bindings.items())],
            "in_flight_total": self.load.in_flight,
            "held": self.held(),
        }

    async def handle(self, request: PlatformRequest) -> PlatformResponse:
        return PlatformResponse(200, [("Content-Type", CONTENT_TYPE_LATEST)], generate_latest(self.registry))
