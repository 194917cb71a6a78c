"""What the per-binding request windows cost the router (issue 16).

The request path is unchanged: ``RouterMetrics.observe`` (one dictionary
lookup, one bisect, three additions). The windows are filled once a second,
when the load report is built: ``RouterMetrics.request_windows`` takes the
difference of the cumulative counters since the previous second, adds it
into that second's bucket and sums the last 60 and 300 buckets per binding.
This prints:

- the time of one ``observe`` (the request path) as it is;
- the time of one report's sampling and summing for 1, 10, 100 and 1000
  bindings, each with traffic in every one of the last 300 seconds (the
  worst case: a window sums 300 buckets), and that as a share of one core
  (it runs once a second) and per request at 1,000 requests/s.

Prints figures; asserts nothing.

    python bench/request_windows.py [--observations 200000]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.router.control import LoadTracker  # noqa: E402
from services.router.metrics import RequestWindows, RouterMetrics  # noqa: E402
from services.router.table import BindingEntry, EnvironmentEntry, RoutingState  # noqa: E402


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def metrics_for(bindings: int, clock: Clock) -> RouterMetrics:
    state = RoutingState()
    for i in range(bindings):
        state.table.upsert_environment(EnvironmentEntry(f"env-{i}", "prj-1", "bench", f"env{i}", f"dep-{i}"))
        state.table.upsert_binding(BindingEntry("prj-1", f"env-{i}", f"dep-{i}", "active", True, 1, 1), "bench")
    metrics = RouterMetrics(state, LoadTracker())
    metrics.windows = RequestWindows(clock)
    return metrics


def observe_cost(observations: int) -> float:
    metrics = metrics_for(1, Clock())
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for i in range(observations):
            metrics.observe("bench", "env0", "dep-0", 200 if i % 10 else 500, 0.002)
        rounds.append((time.perf_counter() - start) / observations)
    return statistics.median(rounds)


def report_cost(bindings: int) -> float:
    clock = Clock()
    metrics = metrics_for(bindings, clock)
    for _ in range(300):  # a full five minutes of busy seconds
        for i in range(bindings):
            metrics.observe("bench", f"env{i}", f"dep-{i}", 200, 0.002)
            metrics.observe("bench", f"env{i}", f"dep-{i}", 503, 0.2)
        metrics.request_windows()
        clock.now += 1
    rounds = []
    for _ in range(5):
        for i in range(bindings):
            metrics.observe("bench", f"env{i}", f"dep-{i}", 200, 0.002)
        start = time.perf_counter()
        found = metrics.request_windows()
        rounds.append(time.perf_counter() - start)
        assert len(found) == bindings
        clock.now += 1
    return statistics.median(rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--observations", type=int, default=200_000)
    args = parser.parse_args()
    per_observe = observe_cost(args.observations)
    print(f"request path: RouterMetrics.observe {per_observe * 1e9:.0f} ns per request (unchanged by the windows)")
    print(f"{'bindings':>9} {'per report':>12} {'share of a core':>16} {'per request at 1k/s':>20}")
    for bindings in (1, 10, 100, 1000):
        cost = report_cost(bindings)
        print(f"{bindings:>9} {cost * 1e3:>9.3f} ms {cost * 100:>15.3f}% {cost / 1000 * 1e9:>17.0f} ns")


if __name__ == "__main__":
    main()
