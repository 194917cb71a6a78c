"""Prometheus metrics of the router, served at ``/metrics``.

Per request the proxy makes one dictionary lookup, one bisect and three
integer additions on plain Python objects (the event loop is the only
writer, and scrapes run on the same loop, so no lock is needed);
prometheus_client's own metric objects take a lock per increment, which cost
more than a tenth of a proxied request. Everything is turned into metric
families at scrape time by collectors, as are the gauges that mirror state
(in-flight requests per binding, the pointer table's revision, ready
replicas).
"""
from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from services.router.control import LoadTracker
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
