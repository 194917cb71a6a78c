"""The router's sliding request windows (services/router/metrics.py): per-
second buckets filled from the cumulative counters by difference, summed
over the last 60 and 300 seconds, with an injected clock."""
from __future__ import annotations

import pytest

from services.router.control import LoadTracker
from services.router.metrics import (
    BUCKETS,
    HISTOGRAM,
    REQUESTS,
    BindingWindows,
    RequestWindows,
    RouterMetrics,
    empty_vector,
)
from services.router.table import BindingEntry, EnvironmentEntry, RoutingState


def vector(requests: int, bucket: int = 0) -> list[float]:
    v = empty_vector()
    v[REQUESTS] = requests
    v[HISTOGRAM + bucket] = requests
    return v


# (seconds with requests added, the second asked at, window length, requests expected)
WINDOW_CASES = [
    ([(100, 5)], 100, 60, 5),                          # the current second counts
    ([(100, 5)], 159, 60, 5),                          # 59 s later: still inside
    ([(100, 5)], 160, 60, 0),                          # 60 s later: out of the minute
    ([(100, 5)], 160, 300, 5),                         # ... but in the five minutes
    ([(100, 5)], 399, 300, 5),
    ([(100, 5)], 400, 300, 0),
    ([(100, 1), (130, 2), (159, 4), (160, 8)], 160, 60, 14),  # 100 fell out
    ([(100, 1), (100, 2)], 100, 60, 3),                # one bucket per second
    ([(100, 1), (99, 2)], 100, 60, 3),                 # a clock read going back counts in the latest bucket
]


@pytest.mark.parametrize(("adds", "now", "length", "expected"), WINDOW_CASES)
def test_binding_window_sums_the_seconds_inside_it(
    adds: list[tuple[int, int]], now: int, length: int, expected: int
) -> None:
    windows = BindingWindows()
    for second, requests in adds:
        windows.add(second, vector(requests))
    assert windows.window(now, length)[REQUESTS] == expected


def test_seconds_leave_each_window_in_turn() -> None:
    windows = BindingWindows()
    windows.add(0, vector(1, bucket=2))
    windows.add(10, vector(2, bucket=3))
    assert windows.window(59, 60)[REQUESTS] == 3 and windows.window(59, 300)[REQUESTS] == 3
    minute = windows.window(60, 60)  # second 0 left the minute, not the five minutes
    assert minute[REQUESTS] == 2 and minute[HISTOGRAM + 2] == 0 and minute[HISTOGRAM + 3] == 2
    assert windows.window(60, 300)[HISTOGRAM + 2] == 1
    windows.expire(300)
    assert not windows.empty and windows.window(300, 300)[REQUESTS] == 2
    windows.expire(310)
    assert windows.empty and windows.window(310, 300) == empty_vector()


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def metrics_with_clock(clock: Clock) -> RouterMetrics:
    state = RoutingState()
    state.table.upsert_environment(EnvironmentEntry("env-1", "prj-1", "shop", "production", "dep-a"))
    state.table.upsert_binding(BindingEntry("prj-1", "env-1", "dep-a", "active", True, 1, 1), "shop")
    metrics = RouterMetrics(state, LoadTracker())
    metrics.windows = RequestWindows(clock)
    return metrics


def test_samples_take_differences_of_the_cumulative_counters() -> None:
    clock = Clock()
    metrics = metrics_with_clock(clock)
    for status, seconds in [(200, 0.003)] * 6 + [(500, 0.2)] * 2 + [(404, 0.0004), (302, 0.001)]:
        metrics.observe("shop", "production", "dep-a", status, seconds)
    metrics.observe("", "", "", 404, 0.001)  # unrouted: no binding
    found = metrics.request_windows()
    assert list(found) == [("env-1", "dep-a")]
    project_id, (minute, five) = found[("env-1", "dep-a")]
    assert project_id == "prj-1"
    assert (minute.requests, minute.responses_2xx, minute.responses_3xx, minute.responses_4xx,
            minute.responses_5xx) == (10, 6, 1, 1, 2)
    assert minute.latency_sum_seconds == pytest.approx(6 * 0.003 + 2 * 0.2 + 0.0004 + 0.001)
    assert list(minute.latency_bounds) == list(BUCKETS)
    by_bound = dict(zip([*BUCKETS, float("inf")], minute.latency_buckets, strict=True))
    assert by_bound[0.0005] == 1 and by_bound[0.001] == 1 and by_bound[0.005] == 6 and by_bound[0.25] == 2
    assert five == minute

    # 30 s later, 3 more: the minute has 13; nothing counted twice
    clock.now += 30
    for _ in range(3):
        metrics.observe("shop", "production", "dep-a", 200, 0.003)
    _, (minute, five) = metrics.request_windows()[("env-1", "dep-a")]
    assert (minute.requests, five.requests) == (13, 13)

    # 45 s after that, the first 10 left the minute, not the five minutes
    clock.now += 45
    _, (minute, five) = metrics.request_windows()[("env-1", "dep-a")]
    assert (minute.requests, minute.responses_5xx, five.requests, five.responses_5xx) == (3, 0, 13, 2)

    # five minutes of quiet: the binding is no longer reported
    clock.now += 300
    assert metrics.request_windows() == {}


def test_a_cleared_counter_table_counts_from_zero_again() -> None:
    clock = Clock()
    metrics = metrics_with_clock(clock)
    for _ in range(4):
        metrics.observe("shop", "production", "dep-a", 200, 0.003)
    metrics.request_windows()
    metrics._stats.clear()  # what observe does past its bound
    metrics.observe("shop", "production", "dep-a", 200, 0.003)
    clock.now += 1
    _, (minute, _) = metrics.request_windows()[("env-1", "dep-a")]
    assert minute.requests == 5


def test_load_report_carries_the_windows_also_for_a_binding_gone_quiet() -> None:
    clock = Clock()
    metrics = metrics_with_clock(clock)
    metrics.observe("shop", "production", "dep-a", 200, 0.003)
    report = metrics.load.drain_report()  # the proxy's LoadTracker had nothing in flight
    assert [(b.environment_id, b.deployment_id, b.project_id, b.last_minute.requests, b.last_five_minutes.requests)
            for b in report] == [("env-1", "dep-a", "prj-1", 1, 1)]


def test_unknown_environment_is_left_out() -> None:
    metrics = metrics_with_clock(Clock())
    metrics.observe("shop", "gone", "dep-a", 200, 0.003)
    assert metrics.request_windows() == {}

