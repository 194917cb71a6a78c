"""The router's access log lines (formatted without ``logging`` records)
and its metrics (plain counters collected at scrape time, merged over
worker processes)."""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.common.logs import JsonLineFormatter
from services.router.accesslog import FLUSH_INTERVAL, MAX_PENDING, AccessLog, logger
from services.router.control import LoadTracker
from services.router.metrics import BUCKETS, RouterMetrics
from services.router.table import Route, RoutingState

ROUTE = Route("prj-1", "shop", "env-1", "production", "dep-a")
FALLBACK = Route("prj-1", "shop", "env-1", "production", "dep-old", fallback=True)


@pytest.fixture
def access_info() -> Iterator[None]:
    previous = logger.level
    logger.setLevel(logging.INFO)
    yield
    logger.setLevel(previous)


def record_lines(log: AccessLog, calls: list[tuple[object, ...]]) -> None:
    async def run() -> None:
        for call in calls:
            log.record(*call)  # type: ignore[arg-type]
        log.flush()

    asyncio.run(run())


def test_access_lines_are_the_service_log_envelope_and_leak_nothing(access_info: None) -> None:
    batches: list[list[str]] = []
    log = AccessLog(batches.append)
    assert log.enabled
    record_lines(log, [
        (b"GET", b"/orders/7?token=query-LEAK&x=1", 200, 0.0012345, "127.0.0.1", ROUTE, 1_700_000_000.25),
        (b"POST", b'/we"ird/\\path\x01\xe9', 502, 2.5, "::1", FALLBACK, 1_700_000_000.5),
        (b"GET", b"/healthz", 404, 0.0001, "10.0.0.9", None, 1_700_000_001.0),
    ])
    lines = [line for batch in batches for line in batch]
    assert len(lines) == 3
    first, odd, unrouted = (json.loads(line) for line in lines)
    # the same envelope, field for field, as every other service log line
    reference = logging.LogRecord("berth.router.access", logging.INFO, __file__, 1, "request", (), None)
    reference.created = 1_700_000_000.25
    expected_envelope = json.loads(JsonLineFormatter("router").format(reference))
    for key in ("time", "level", "logger", "event", "service"):
        assert first[key] == expected_envelope[key], key
    assert first == {**{k: expected_envelope[k] for k in ("time", "level", "logger", "event", "service")},
                     "method": "GET", "path": "/orders/7", "status": 200, "ms": 1.23, "peer": "127.0.0.1",
                     "project": "shop", "environment": "production", "deployment": "dep-a", "fallback": False}
    assert "LEAK" not in lines[0] and "token" not in lines[0]
    assert odd["path"] == '/we"ird/\\path\x01\xe9' and odd["fallback"] is True and odd["deployment"] == "dep-old"
    assert odd["status"] == 502 and odd["ms"] == 2500.0 and odd["peer"] == "::1"
    assert unrouted["project"] == unrouted["environment"] == unrouted["deployment"] == ""
    assert unrouted["time"].endswith(",000")


def test_access_lines_are_batched_by_size_and_by_time(access_info: None) -> None:
    batches: list[list[str]] = []
    log = AccessLog(batches.append)

    async def run() -> None:
        for i in range(MAX_PENDING + 3):
            log.record(b"GET", b"/%d" % i, 200, 0.001, "127.0.0.1", ROUTE, 1_700_000_000.0)
        assert [len(b) for b in batches] == [MAX_PENDING]  # a full batch leaves at once
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FLUSH_INTERVAL + 5
        while len(batches) < 2 and loop.time() < deadline:
            await asyncio.sleep(0.01)
        assert [len(b) for b in batches] == [MAX_PENDING, 3]  # the rest by the flush timer

    asyncio.run(run())
    paths = [json.loads(line)["path"] for batch in batches for line in batch]
    assert paths == [f"/{i}" for i in range(MAX_PENDING + 3)]  # in order, none lost


def test_access_log_off_at_warning_level() -> None:
    previous = logger.level
    logger.setLevel(logging.WARNING)
    try:
        assert not AccessLog(lambda lines: None).enabled
    finally:
        logger.setLevel(previous)


def families(metrics: RouterMetrics) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    text = asyncio.run(metrics.handle(None)).body.decode()  # type: ignore[arg-type]
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def labels(**kw: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(kw.items()))


def test_request_metrics_count_every_request_in_the_right_bucket() -> None:
    metrics = RouterMetrics(RoutingState(), LoadTracker())
    for status, seconds in [(200, 0.0004), (200, BUCKETS[0]), (201, 0.3), (204, 100.0), (404, 0.001), (503, 0.02)]:
        metrics.observe("shop", "production", "dep-a", status, seconds)
    metrics.fallback("shop", "production")
    metrics.fallback("shop", "production")
    got = families(metrics)
    two = dict(project="shop", environment="production", deployment="dep-a", status_class="2xx")
    assert got["berth_router_requests_total"] == {
        labels(**two): 4.0,
        labels(**{**two, "status_class": "4xx"}): 1.0,
        labels(**{**two, "status_class": "5xx"}): 1.0,
    }
    buckets = got["berth_router_request_duration_seconds_bucket"]
    assert buckets[labels(**two, le="0.0005")] == 2.0  # 0.0004 and exactly 0.0005 (le: less or equal)
    assert buckets[labels(**two, le="0.25")] == 2.0
    assert buckets[labels(**two, le="0.5")] == 3.0
    assert buckets[labels(**two, le="60.0")] == 3.0
    assert buckets[labels(**two, le="+Inf")] == 4.0
    assert got["berth_router_request_duration_seconds_count"][labels(**two)] == 4.0
    assert got["berth_router_request_duration_seconds_sum"][labels(**two)] == pytest.approx(100.3009)
    assert got["berth_router_fallback_requests_total"] == {labels(project="shop", environment="production"): 2.0}
    assert got["berth_router_workers"] == {(): 1.0}


def test_metrics_add_up_the_snapshots_of_other_worker_processes() -> None:
    state = RoutingState()
    state.revision = 9
    worker_load = LoadTracker()
    other = RouterMetrics(RoutingState(), worker_load)
    other.observe("shop", "production", "dep-a", 200, 0.002)
    other.observe("shop", "production", "dep-a", 500, 0.002)
    other.fallback("shop", "staging")
    worker_load.begin(ROUTE)
    snapshot = json.loads(json.dumps(other.snapshot()))  # what travels through the shared file
    own_load = LoadTracker()
    metrics = RouterMetrics(state, own_load, peers=lambda: [snapshot])
    metrics.observe("shop", "production", "dep-a", 200, 0.2)
    own_load.begin(ROUTE)
    own_load.begin(ROUTE)
    got = families(metrics)
    two = dict(project="shop", environment="production", deployment="dep-a", status_class="2xx")
    assert got["berth_router_requests_total"][labels(**two)] == 2.0
    assert got["berth_router_requests_total"][labels(**{**two, "status_class": "5xx"})] == 1.0
    assert got["berth_router_request_duration_seconds_bucket"][labels(**two, le="0.0025")] == 1.0
    assert got["berth_router_request_duration_seconds_bucket"][labels(**two, le="0.25")] == 2.0
    assert got["berth_router_fallback_requests_total"] == {labels(project="shop", environment="staging"): 1.0}
    assert got["berth_router_in_flight_requests"] == {
        labels(project="shop", environment="production", deployment="dep-a"): 3.0}
    assert got["berth_router_in_flight_total"] == {(): 3.0}
    assert got["berth_router_workers"] == {(): 2.0}
    assert got["berth_router_pointer_table_revision"] == {(): 9.0}
