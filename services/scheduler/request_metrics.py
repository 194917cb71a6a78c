"""Request figures per binding, from the routers' load reports.

Every router process sends, with its load report, the requests it answered
per binding over sliding windows (the last 60 s and 300 s: counts by status
class and a latency histogram; ``services/router/metrics.py``). Here the
latest windows of each reporter are kept, and a binding's figures are the
sum over the reporters heard from within ``live_window`` seconds (a router
that stopped reporting drops out, as its load does). Percentiles are read
from the summed histogram, never averaged over reporters.

Once a minute the merged last-minute figures of every binding become a
point of its 15-minute history (``RequestMetrics.history``), so a chart
survives a page reload. Kept in memory by the leader only: a scheduler that
takes over knows what was reported since.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from berth.internal.v1 import scheduler_internal_pb2

BindingKey = tuple[str, str]  # (environment id, deployment id)

LIVE_WINDOW = 5.0  # a reporter not heard from for this long no longer counts (reports come every second)
WINDOW_SECONDS = (60.0, 300.0)  # what last_minute and last_five_minutes cover
HISTORY_MINUTES = 15
MAX_REPORTERS = 1024
MAX_BINDINGS = 10_000


class InvalidWindow(ValueError):
    """A reported window that cannot be right (the servicer answers
    INVALID_ARGUMENT naming ``field``)."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass
class Window:
    """One window's counts, summable across reporters with the same bounds."""

    requests: int = 0
    by_class: list[int] = field(default_factory=lambda: [0, 0, 0, 0])  # 2xx, 3xx, 4xx, 5xx
    latency_sum: float = 0.0
    bounds: tuple[float, ...] = ()
    buckets: list[int] = field(default_factory=list)  # per bound, then +Inf; not cumulative

    @classmethod
    def from_proto(cls, message: scheduler_internal_pb2.RequestWindow, where: str) -> Window:
        counts = (message.requests, message.responses_2xx, message.responses_3xx, message.responses_4xx,
                  message.responses_5xx, *message.latency_buckets)
        if any(n < 0 for n in counts):
            raise InvalidWindow(f"{where}: counts cannot be negative", where)
        bounds = tuple(message.latency_bounds)
        if len(message.latency_buckets) != len(bounds) + 1:
            raise InvalidWindow(
                f"{where}: latency_buckets must have one entry per latency bound plus one "
                f"({len(bounds) + 1}), not {len(message.latency_buckets)}", f"{where}.latency_buckets",
            )
        if any(b <= a for a, b in zip(bounds, bounds[1:], strict=False)) or (bounds and bounds[0] <= 0):
            raise InvalidWindow(f"{where}: latency_bounds must be positive and increasing",
                                f"{where}.latency_bounds")
        return cls(
            requests=message.requests,
            by_class=[message.responses_2xx, message.responses_3xx, message.responses_4xx, message.responses_5xx],
            latency_sum=message.latency_sum_seconds,
            bounds=bounds,
            buckets=list(message.latency_buckets),
        )

    def add(self, other: Window) -> None:
        """Adds ``other`` in; its histogram only when the bounds agree (a
        router of another version with other buckets counts in the totals)."""
        self.requests += other.requests
        self.by_class = [a + b for a, b in zip(self.by_class, other.by_class, strict=True)]
        self.latency_sum += other.latency_sum
        if not self.bounds and not any(self.buckets):
            self.bounds, self.buckets = other.bounds, list(other.buckets)
        elif self.bounds == other.bounds:
            self.buckets = [a + b for a, b in zip(self.buckets, other.buckets, strict=True)]

    @property
    def error_rate(self) -> float:
        return self.by_class[3] / self.requests if self.requests else 0.0

    def quantile(self, q: float) -> float:
        return histogram_quantile(q, self.bounds, self.buckets)


def histogram_quantile(q: float, bounds: Sequence[float], buckets: Sequence[int]) -> float:
    """The ``q`` quantile (0..1) of a histogram of per-bucket counts (one per
    bound, then +Inf), linear within the bucket it falls in, the first
    bucket starting at 0, as Prometheus' histogram_quantile reads it; in the
    +Inf bucket, the last bound. 0 for an empty histogram."""
    total = sum(buckets)
    if total == 0 or not bounds:
        return 0.0
    rank = q * total
    seen = 0
    for i, count in enumerate(buckets):
        if count and seen + count >= rank:
            if i >= len(bounds):
                return float(bounds[-1])
            lower = bounds[i - 1] if i > 0 else 0.0
            return float(lower + (bounds[i] - lower) * (rank - seen) / count)
        seen += count
    return float(bounds[-1])


@dataclass
class _Reported:
    at: float
    windows: dict[BindingKey, tuple[Window, Window]]


@dataclass(frozen=True)
class Point:
    minute_end: float  # unix time of the end of the minute
    requests: int
    requests_per_second: float
    error_rate: float
    p99_seconds: float


@dataclass(frozen=True)
class BindingFigures:
    last_minute: Window
    last_five_minutes: Window
    history: tuple[Point, ...]


class RequestMetricsStore:
    def __init__(
        self,
        *,
        live_window: float = LIVE_WINDOW,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.live_window = live_window
        self._clock = clock
        self._wall = wall
        self._reports: dict[str, _Reported] = {}
        self._history: dict[BindingKey, deque[Point]] = {}
        self._minute = int(wall() // 60)

    @staticmethod
    def parse(bindings: Iterable[scheduler_internal_pb2.BindingLoad]) -> dict[BindingKey, tuple[Window, Window]]:
        """The windows of a load report, checked (``InvalidWindow``); a
        binding reported twice in one report is summed."""
        windows: dict[BindingKey, tuple[Window, Window]] = {}
        for i, load in enumerate(bindings):
            if not load.HasField("last_minute") and not load.HasField("last_five_minutes"):
                continue  # an older router, or no request in five minutes
            minute = Window.from_proto(load.last_minute, f"bindings[{i}].last_minute")
            five = Window.from_proto(load.last_five_minutes, f"bindings[{i}].last_five_minutes")
            key = (load.environment_id, load.deployment_id)
            had = windows.get(key)
            if had is not None:
                had[0].add(minute)
                had[1].add(five)
            else:
                windows[key] = (minute, five)
        return windows

    def record(self, reporter: str, windows: dict[BindingKey, tuple[Window, Window]]) -> None:
        """A reporter's current windows (replacing what it sent before)."""
        self._roll_minute()
        now = self._clock()
        self._reports[reporter] = _Reported(now, windows)
        if len(self._reports) > MAX_REPORTERS:
            self._reports = {k: r for k, r in self._reports.items() if now - r.at < self.live_window}

    def _live(self) -> list[_Reported]:
        now = self._clock()
        return [r for r in self._reports.values() if now - r.at < self.live_window]

    def _merged(self, only: BindingKey | None = None) -> dict[BindingKey, tuple[Window, Window]]:
        """Every binding's windows summed over the live reporters (or just
        ``only``'s)."""
        merged: dict[BindingKey, tuple[Window, Window]] = {}
        for report in self._live():
            items = report.windows.items() if only is None else (
                [(only, report.windows[only])] if only in report.windows else [])
            for key, (minute, five) in items:
                total = merged.get(key)
                if total is None:
                    total = merged[key] = (Window(), Window())
                total[0].add(minute)
                total[1].add(five)
        return merged

    def _roll_minute(self) -> None:
        """At the first call in a new minute, every binding's merged last
        minute becomes a history point of the minute that ended."""
        minute = int(self._wall() // 60)
        if minute <= self._minute:
            return
        ended = float(minute) * 60  # the end of the minute just finished
        self._minute = minute
        for key, (last_minute, _) in self._merged().items():
            if last_minute.requests == 0:
                continue
            points = self._history.get(key)
            if points is None:
                if len(self._history) >= MAX_BINDINGS:
                    continue
                points = self._history[key] = deque(maxlen=HISTORY_MINUTES)
            points.append(Point(ended, last_minute.requests, last_minute.requests / WINDOW_SECONDS[0],
                                last_minute.error_rate, last_minute.quantile(0.99)))
        oldest = ended - HISTORY_MINUTES * 60
        for key in [k for k, points in self._history.items() if not points or points[-1].minute_end <= oldest]:
            del self._history[key]

    def figures(self, key: BindingKey) -> BindingFigures | None:
        """A binding's merged windows and history; None when no live
        reporter has requests for it and it has no history."""
        self._roll_minute()
        merged = self._merged(key).get(key)
        oldest = self._wall() - HISTORY_MINUTES * 60
        history = tuple(p for p in self._history.get(key, ()) if p.minute_end > oldest)
        if merged is None and not history:
            return None
        minute, five = merged if merged is not None else (Window(), Window())
        return BindingFigures(minute, five, history)
