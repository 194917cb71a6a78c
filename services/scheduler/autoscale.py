"""Autoscaling: how many replicas a binding wants right now.

``decide()`` is a pure function of plain data (bounds, the replicas that run,
load samples, the last activation, the time) and is unit-tested on tables.
``LoadTracker`` only keeps the recent load signal the router reports
(``ReportLoad``) and the last ``Activate`` per binding: a signal, never
truth. The count that runs is read from the engine on every pass, so a
restarted scheduler starts from the replicas it finds (``current``) and
neither loses nor doubles them.

Policy (knative-like, on in-flight concurrency):
- ``want = ceil(in_flight / target_concurrency)``, the highest over the
  samples of the last ``scale_down_window`` seconds: a burst scales up at
  the next pass, and the count comes down only once the window has stayed
  lower;
- no scale-down before the tracker has watched a whole window (just after a
  restart the scheduler keeps what runs);
- with ``min_replicas == 0``: the floor is 1 while the binding is active
  (requests, in-flight, or an activation within ``idle_window``), and 0
  once it has been idle for the whole idle window; ``Activate`` lifts the
  floor to 1 at once;
- the result is clamped to ``[min_replicas, max_replicas]``.
A binding absent from a report had no load during it.
"""
from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from .plan import BindingKey


@dataclass(frozen=True)
class LoadSample:
    at: float  # seconds (the tracker's clock)
    in_flight: int
    requests: int = 0


@dataclass(frozen=True)
class ScalePolicy:
    target_concurrency: float = 10.0
    scale_down_window: float = 30.0
    idle_window: float = 60.0


@dataclass(frozen=True)
class Bounds:
    min_replicas: int
    max_replicas: int


def decide(
    *,
    bounds: Bounds,
    current: int,
    samples: Iterable[LoadSample],
    now: float,
    observing_since: float,
    policy: ScalePolicy,
    activated_at: float | None = None,
) -> int:
    """The replica count a live (not terminated) binding wants at ``now``.

    ``current``: replica slots that exist on the engine now; ``samples``:
    load reports (any age, older ones are ignored); ``observing_since``:
    when load tracking began (the process start)."""
    low = max(0, bounds.min_replicas)
    high = max(low, bounds.max_replicas)
    if high == 0:
        return 0
    target = policy.target_concurrency if policy.target_concurrency > 0 else 1.0
    window_start = now - policy.scale_down_window
    idle_start = now - policy.idle_window
    want = 0
    active = activated_at is not None and activated_at >= idle_start
    for s in samples:
        if s.at > now:
            continue
        if s.at >= window_start:
            want = max(want, math.ceil(max(0, s.in_flight) / target))
        if s.at >= idle_start and (s.in_flight > 0 or s.requests > 0):
            active = True
    floor = low
    if low == 0:
        watched_idle_window = now - observing_since >= policy.idle_window
        if active or (current > 0 and not watched_idle_window):
            floor = 1
    desired = max(want, floor)
    if desired < current and now - observing_since < policy.scale_down_window:
        desired = current  # not watched long enough to know the load is lower
    return min(high, max(low, desired))


class LoadTracker:
    """Recent load per binding, from ``ReportLoad``; and activations."""

    def __init__(self, policy: ScalePolicy, *, clock=time.monotonic) -> None:  # type: ignore[no-untyped-def]
        self.policy = policy
        self._clock = clock
        self.observing_since = clock()
        self._samples: dict[BindingKey, deque[LoadSample]] = {}
        self._activated: dict[BindingKey, float] = {}

    def now(self) -> float:
        return float(self._clock())

    def report(self, loads: Mapping[BindingKey, tuple[int, int]]) -> None:
        """One report: (in_flight, requests since the last report) per binding."""
        now = self.now()
        keep = max(self.policy.scale_down_window, self.policy.idle_window) + 1.0
        for key, (in_flight, requests) in loads.items():
            self._samples.setdefault(key, deque()).append(LoadSample(now, in_flight, requests))
        for key in list(self._samples):
            samples = self._samples[key]
            while samples and samples[0].at < now - keep:
                samples.popleft()
            if not samples:
                del self._samples[key]

    def activate(self, key: BindingKey) -> None:
        self._activated[key] = self.now()

    def decide(self, key: BindingKey, bounds: Bounds, current: int, *, idle_window: float | None = None) -> int:
        """``idle_window``: this binding's own idle window, if not the policy's."""
        return decide(
            bounds=bounds,
            current=current,
            samples=tuple(self._samples.get(key, ())),
            now=self.now(),
            observing_since=self.observing_since,
            policy=self.policy if idle_window is None else replace(self.policy, idle_window=idle_window),
            activated_at=self._activated.get(key),
        )
