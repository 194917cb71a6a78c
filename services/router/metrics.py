"""Prometheus metrics of the router, served at ``/metrics``.

Per request the proxy makes two dictionary lookups and two increments
(label children are cached); gauges that mirror state (in-flight requests
per binding, the pointer table's revision, ready replicas) are read at
scrape time by a collector instead of being updated on the hot path.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
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
        self.requests = Counter(
            "berth_router_requests", "Requests answered by the router", LABELS, registry=self.registry
        )
        self.latency = Histogram(
            "berth_router_request_duration_seconds", "Time from request head to the end of the response",
            LABELS, buckets=BUCKETS, registry=self.registry,
        )
        self.fallbacks = Counter(
            "berth_router_fallback_requests", "Requests served by the previous deployment because the "
            "current one failed", ("project", "environment"), registry=self.registry,
        )
        self.registry.register(_StateCollector(state, load, held))
        self._children: dict[tuple[str, str, str, int], tuple[Any, Any]] = {}

    def observe(self, project: str, environment: str, deployment: str, status: int, seconds: float) -> None:
        key = (project, environment, deployment, status)  # the status itself: no label formatting per request
        children = self._children.get(key)
        if children is None:
            if len(self._children) > 50_000:  # bounded memory however many deployments come and go
                self._children.clear()
            labels = (project, environment, deployment, status_class(status))
            children = self._children[key] = (self.requests.labels(*labels), self.latency.labels(*labels))
        children[0].inc()
        children[1].observe(seconds)

    async def handle(self, request: PlatformRequest) -> PlatformResponse:
        return PlatformResponse(200, [("Content-Type", CONTENT_TYPE_LATEST)], generate_latest(self.registry))
