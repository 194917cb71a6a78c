"""The scheduler's request figures (services/scheduler/request_metrics.py):
reporters' windows summed over the live ones, percentiles read from the
merged histogram, a per-minute history; injected clocks."""
from __future__ import annotations

import asyncio

import pytest

from berth import errors
from berth.internal.v1 import scheduler_internal_pb2
from services.scheduler.request_metrics import (
    HISTORY_MINUTES,
    InvalidWindow,
    RequestMetricsStore,
    histogram_quantile,
)
from services.scheduler.servicer import SchedulerInternalServicer

BOUNDS = (0.01, 0.1, 1.0)

# (per-bucket counts: <=10 ms, <=100 ms, <=1 s, +Inf; q; expected)
QUANTILE_CASES = [
    ([0, 0, 0, 0], 0.5, 0.0),             # nothing: 0
    ([100, 0, 0, 0], 0.5, 0.005),         # halfway through the first bucket, from 0
    ([100, 0, 0, 0], 0.99, 0.0099),
    ([50, 50, 0, 0], 0.5, 0.01),          # the rank ends exactly on a bound
    ([50, 50, 0, 0], 0.99, 0.01 + 0.09 * 49 / 50),
    ([98, 0, 2, 0], 0.99, 0.1 + 0.9 * 1 / 2),
    ([98, 0, 0, 2], 0.99, 1.0),           # in +Inf: the last bound
    ([0, 10, 0, 0], 0.5, 0.055),
]


@pytest.mark.parametrize(("buckets", "q", "expected"), QUANTILE_CASES)
def test_histogram_quantile(buckets: list[int], q: float, expected: float) -> None:
    assert histogram_quantile(q, BOUNDS, buckets) == pytest.approx(expected)


def window(requests_by_bucket: list[int], fives: int = 0, bounds: tuple[float, ...] = BOUNDS,
           ) -> scheduler_internal_pb2.RequestWindow:
    total = sum(requests_by_bucket)
    return scheduler_internal_pb2.RequestWindow(
        requests=total, responses_2xx=total - fives, responses_5xx=fives,
        latency_sum_seconds=0.0, latency_buckets=requests_by_bucket, latency_bounds=bounds,
    )


def load(minute: scheduler_internal_pb2.RequestWindow, five: scheduler_internal_pb2.RequestWindow | None = None,
         key: tuple[str, str] = ("env-1", "dep-a")) -> scheduler_internal_pb2.BindingLoad:
    return scheduler_internal_pb2.BindingLoad(
        project_id="prj-1", environment_id=key[0], deployment_id=key[1],
        last_minute=minute, last_five_minutes=five if five is not None else minute,
    )


class Clocks:
    def __init__(self) -> None:
        self.mono = 100.0
        self.wall = 1_700_000_000.0 - 1_700_000_000.0 % 60 + 0.5  # just into a minute

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


def store(clocks: Clocks) -> RequestMetricsStore:
    return RequestMetricsStore(live_window=5.0, clock=lambda: clocks.mono, wall=lambda: clocks.wall)


def test_reporters_are_summed_and_percentiles_come_from_the_merged_histogram() -> None:
    clocks = Clocks()
    metrics = store(clocks)
    # one worker: 99 fast requests; the other: 1 fast, 100 slow ones of which 20 failed
    metrics.record("host:1", metrics.parse([load(window([99, 0, 0, 0]))]))
    metrics.record("host:2", metrics.parse([load(window([1, 0, 100, 0], fives=20))]))
    figures = metrics.figures(("env-1", "dep-a"))
    assert figures is not None
    minute = figures.last_minute
    assert minute.requests == 200 and minute.by_class == [180, 0, 0, 20]
    assert minute.error_rate == pytest.approx(0.1)
    assert minute.buckets == [100, 0, 100, 0]
    # merged p50 sits at the first bucket's bound; averaging the two workers'
    # own p50 (5 ms and ~0.55 s) would say 0.28 s
    assert minute.quantile(0.5) == pytest.approx(0.01)
    assert 0.1 < minute.quantile(0.99) <= 1.0
    assert metrics.figures(("env-1", "other")) is None


def test_a_reporter_replaces_its_own_windows_and_silent_ones_drop_out() -> None:
    clocks = Clocks()
    metrics = store(clocks)
    metrics.record("host:1", metrics.parse([load(window([10, 0, 0, 0]))]))
    metrics.record("host:1", metrics.parse([load(window([12, 0, 0, 0]))]))  # the same reporter, later
    metrics.record("host:2", metrics.parse([load(window([5, 0, 0, 0]))]))
    figures = metrics.figures(("env-1", "dep-a"))
    assert figures is not None and figures.last_minute.requests == 17
    clocks.advance(3)
    metrics.record("host:1", metrics.parse([load(window([12, 0, 0, 0]))]))
    clocks.advance(3)  # host:2 last heard 6 s ago: gone
    figures = metrics.figures(("env-1", "dep-a"))
    assert figures is not None and figures.last_minute.requests == 12
    metrics.record("host:1", metrics.parse([]))  # no requests in five minutes any more
    assert metrics.figures(("env-1", "dep-a")) is None


def test_windows_with_other_bounds_count_but_do_not_mix_histograms() -> None:
    clocks = Clocks()
    metrics = store(clocks)
    metrics.record("new", metrics.parse([load(window([4, 0, 0, 0]))]))
    metrics.record("old", metrics.parse([load(window([0, 6], bounds=(0.5,)))]))
    figures = metrics.figures(("env-1", "dep-a"))
    assert figures is not None
    assert figures.last_minute.requests == 10 and figures.last_minute.buckets == [4, 0, 0, 0]


# (a window that cannot be right, the field named)
INVALID_CASES = [
    (scheduler_internal_pb2.RequestWindow(requests=-1, latency_buckets=[0, 0, 0, 0], latency_bounds=BOUNDS),
     "bindings[0].last_minute"),
    (scheduler_internal_pb2.RequestWindow(requests=1, latency_buckets=[1, 0, 0], latency_bounds=BOUNDS),
     "bindings[0].last_minute.latency_buckets"),
    (scheduler_internal_pb2.RequestWindow(requests=1, latency_buckets=[1, 0, 0, 0], latency_bounds=(0.1, 0.1, 1)),
     "bindings[0].last_minute.latency_bounds"),
    (scheduler_internal_pb2.RequestWindow(requests=1, latency_buckets=[1, 0], latency_bounds=(0.0,)),
     "bindings[0].last_minute.latency_bounds"),
]


@pytest.mark.parametrize(("bad", "field"), INVALID_CASES)
def test_invalid_windows_are_refused_naming_the_field(
    bad: scheduler_internal_pb2.RequestWindow, field: str
) -> None:
    with pytest.raises(InvalidWindow) as caught:
        RequestMetricsStore.parse([load(bad, window([1, 0, 0, 0]))])
    assert caught.value.field == field


def test_history_keeps_a_point_per_minute_for_fifteen_minutes() -> None:
    clocks = Clocks()
    metrics = store(clocks)
    for minute in range(20):  # reports come every second or two; two per minute are enough here
        report = [load(window([60 + minute, 0, 0, 0], fives=minute))]
        metrics.record("host:1", metrics.parse(report))
        clocks.advance(59)
        metrics.record("host:1", metrics.parse(report))
        clocks.advance(1)  # into the next minute: its first report rolls this one into the history
    metrics.record("host:1", metrics.parse([load(window([6, 0, 0, 0]))]))
    figures = metrics.figures(("env-1", "dep-a"))
    assert figures is not None
    history = figures.history
    assert len(history) == HISTORY_MINUTES
    # oldest first, one per whole minute, the last the minute that just ended with the last report
    assert [p.minute_end % 60 for p in history] == [0.0] * HISTORY_MINUTES
    assert [b.minute_end - a.minute_end for a, b in zip(history, history[1:], strict=False)] == [60.0] * 14
    assert history[-1].requests == 79 and history[-1].requests_per_second == pytest.approx(79 / 60)
    assert history[-1].error_rate == pytest.approx(19 / 79)
    assert history[-1].p99_seconds == pytest.approx(0.01 * 0.99)
    # fifteen quiet minutes later nothing is left
    clocks.advance(16 * 60)
    assert metrics.figures(("env-1", "dep-a")) is None


class RecordingRuntime:
    """The one runtime call ReportLoad makes, recorded."""

    def __init__(self) -> None:
        self.reports: list[dict[tuple[str, str], tuple[int, int]]] = []

    def report_load(self, loads: dict[tuple[str, str], tuple[int, int]], reporter: str = "") -> None:
        self.reports.append(dict(loads))


def report_load(servicer: object, request: scheduler_internal_pb2.ReportLoadRequest) -> None:
    asyncio.run(servicer.ReportLoad(request, None))  # type: ignore[attr-defined]


def test_report_load_refuses_a_bad_window_whole_and_keeps_good_ones() -> None:
    runtime = RecordingRuntime()
    servicer = SchedulerInternalServicer(None, runtime)  # type: ignore[arg-type]
    good = load(window([3, 0, 0, 0]))
    bad = load(scheduler_internal_pb2.RequestWindow(requests=1, latency_buckets=[1], latency_bounds=BOUNDS),
               key=("env-2", "dep-b"))
    with pytest.raises(errors.InvalidArgument) as caught:
        report_load(servicer, scheduler_internal_pb2.ReportLoadRequest(bindings=[good, bad], reporter="host:1"))
    assert caught.value.field == "bindings[1].last_minute.latency_buckets"
    assert runtime.reports == []  # nothing of the refused report was applied
    assert servicer.request_metrics.figures(("env-1", "dep-a")) is None

    report_load(servicer, scheduler_internal_pb2.ReportLoadRequest(bindings=[good], reporter="host:1"))
    figures = servicer.request_metrics.figures(("env-1", "dep-a"))
    assert runtime.reports == [{("env-1", "dep-a"): (0, 0)}]
    assert figures is not None and figures.last_minute.requests == 3
