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

from prometheus_client import CollectorRegistry, Counter, generate_latest
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


class _RequestCollector(Collector):
    def __init__(self, stats: dict[tuple[str, str, str, int], RequestStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Any]:
        # Several statuses share a status class: sum them per label set.
        merged: dict[tuple[str, str, str, str], tuple[int, float, list[int]]] = {}
        for stats in list(self._stats.values()):
            count, total, buckets = merged.get(stats.labels, (0, 0.0, [0] * len(stats.buckets)))
            merged[stats.labels] = (count + stats.count, total + stats.total_seconds,
                                    [a + b for a, b in zip(buckets, stats.buckets, strict=True)])
        requests = CounterMetricFamily("berth_router_requests", "Requests answered by the router", labels=LABELS)
        latency = HistogramMetricFamily(
            "berth_router_request_duration_seconds", "Time from request head to the end of the response",
            labels=LABELS,
        )
        bounds = [*(repr(float(b)) for b in BUCKETS), "+Inf"]
        for labels, (count, total, buckets) in merged.items():
            requests.add_metric(list(labels), count)
            cumulative, running = [], 0
            for bound, n in zip(bounds, buckets, strict=True):
                running += n
                cumulative.append((bound, running))
            latency.add_metric(list(labels), cumulative, total)
        yield requests
        yield latency


class _StateCollector(Collector):
    def __init__(self, state: RoutingState, load: LoadTracker, held: Callable[[], int]) -> None:
        self._state = state
        self._load = load
        self._held = held

    def collect(self) -> Iterator[Any]:
        in_flight = GaugeMetricFamily(
            "berth_router_in_flight_requests", "Requests being served now, per binding",
            labels=["project", "environment", "deployment"],
        )
        for (_, deployment_id), load in list(self._load.bindings.items()):
            in_flight.add_metric([load.project_name, load.environment_name, deployment_id], load.in_flight)
        yield in_flight
        yield GaugeMetricFamily("berth_router_in_flight_total", "Requests being served now", value=self._load.in_flight)
        yield GaugeMetricFamily(
            "berth_router_pointer_table_revision", "Registry revision the routing table reflects",
            value=self._state.revision,
        )
        yield GaugeMetricFamily(
            "berth_router_environments", "Environments in the routing table", value=len(self._state.table.environments)
        )
        ready = sum(len(a) for a in self._state.endpoints.snapshot().values())
        yield GaugeMetricFamily("berth_router_ready_replicas", "Ready replica addresses known", value=ready)
        yield GaugeMetricFamily(
            "berth_router_held_requests", "Requests held waiting for a ready replica", value=self._held()
        )


class RouterMetrics:
    def __init__(self, state: RoutingState, load: LoadTracker, held: Callable[[], int] = lambda: 0) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._stats: dict[tuple[str, str, str, int], RequestStats] = {}
        self.registry.register(_RequestCollector(self._stats))
        self.fallbacks = Counter(
            "berth_router_fallback_requests", "Requests served by the previous deployment because the "
            "current one failed", ("project", "environment"), registry=self.registry,
        )
        self.registry.register(_StateCollector(state, load, held))

    def observe(self, project: str, environment: str, deployment: str, status: int, seconds: float) -> None:
        key = (project, environment, deployment, status)  # the status itself: no label formatting per request
        stats = self._stats.get(key)
        if stats is None:
            if len(self._stats) > 50_000:  # bounded memory however many deployments come and go (a counter reset)
                self._stats.clear()
            stats = self._stats[key] = RequestStats((project, environment, deployment, status_class(status)))
        stats.observe(seconds)

    async def handle(self, request: PlatformRequest) -> PlatformResponse:
        return PlatformResponse(200, [("Content-Type", CONTENT_TYPE_LATEST)], generate_latest(self.registry))
