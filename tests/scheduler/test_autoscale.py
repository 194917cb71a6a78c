"""Table-driven tests of the pure autoscaling decision."""
from __future__ import annotations

import time

import pytest
from google.protobuf import timestamp_pb2

from berth.v1 import common_pb2
from services.scheduler.autoscale import Bounds, LoadSample, LoadTracker, ScalePolicy, decide
from services.scheduler.desired import DesiredTable
from services.scheduler.events import EventStore
from services.scheduler.reconciler import Reconciler, SchedulerConfig

POLICY = ScalePolicy(target_concurrency=10, scale_down_window=30, idle_window=60)
LONG_AGO = -1000.0  # the tracker has been observing for a long time


def s(at: float, in_flight: int, requests: int = 0) -> LoadSample:
    return LoadSample(at=at, in_flight=in_flight, requests=requests)


CASES = [
    # (bounds, current, samples, now, observing_since, activated_at, expected)
    pytest.param(Bounds(1, 5), 0, [], 100, LONG_AGO, None, 1, id="no-load-runs-min"),
    pytest.param(Bounds(2, 2), 5, [], 100, LONG_AGO, None, 2, id="fixed-bounds-win-over-current"),
    pytest.param(Bounds(1, 5), 1, [s(99, 35)], 100, LONG_AGO, None, 4, id="scale-up-at-once-ceil"),
    pytest.param(Bounds(1, 5), 1, [s(99, 31)], 100, LONG_AGO, None, 4, id="ceil-rounds-up"),
    pytest.param(Bounds(1, 5), 1, [s(99, 400)], 100, LONG_AGO, None, 5, id="clamped-to-max"),
    pytest.param(Bounds(3, 5), 1, [s(99, 5)], 100, LONG_AGO, None, 3, id="clamped-to-min"),
    pytest.param(Bounds(1, 5), 4, [s(75, 40), s(99, 5)], 100, LONG_AGO, None, 4, id="peak-in-window-holds"),
    pytest.param(Bounds(1, 5), 4, [s(65, 40), s(99, 5)], 100, LONG_AGO, None, 1, id="window-passed-scale-down"),
    pytest.param(Bounds(1, 5), 4, [s(65, 40), s(80, 15)], 100, LONG_AGO, None, 2, id="down-to-window-peak"),
    pytest.param(Bounds(1, 5), 4, [], 100, 90, None, 4, id="just-restarted-keeps-what-runs"),
    pytest.param(Bounds(1, 5), 4, [], 100, 60, None, 1, id="watched-a-whole-window-then-down"),
    pytest.param(Bounds(1, 5), 2, [s(99, 50)], 100, 99, None, 5, id="restarted-still-scales-up"),
    pytest.param(Bounds(1, 5), 9, [], 100, 99, None, 5, id="over-max-after-bounds-change"),
    pytest.param(Bounds(0, 3), 0, [], 100, LONG_AGO, None, 0, id="min0-idle-stays-at-zero"),
    pytest.param(Bounds(0, 3), 0, [], 100, LONG_AGO, 99.5, 1, id="min0-activation-wakes"),
    pytest.param(Bounds(0, 3), 1, [s(50, 0, 3)], 100, LONG_AGO, None, 1, id="min0-requests-in-idle-window-keep-one"),
    pytest.param(Bounds(0, 3), 1, [s(30, 0, 3)], 100, LONG_AGO, None, 0, id="min0-idle-window-passed-to-zero"),
    pytest.param(Bounds(0, 3), 1, [], 100, LONG_AGO, 30.0, 0, id="min0-old-activation-expires"),
    pytest.param(Bounds(0, 3), 1, [], 100, 80, None, 1, id="min0-restarted-keeps-one-for-idle-window"),
    pytest.param(Bounds(0, 3), 0, [], 100, 80, None, 0, id="min0-restarted-at-zero-stays"),
    pytest.param(Bounds(0, 3), 0, [s(99, 25)], 100, LONG_AGO, None, 3, id="min0-load-scales-up"),
    pytest.param(Bounds(0, 0), 2, [s(99, 25)], 100, LONG_AGO, 99.0, 0, id="max0-is-zero"),
    pytest.param(Bounds(1, 5), 1, [s(101, 50)], 100, LONG_AGO, None, 1, id="future-samples-ignored"),
]


@pytest.mark.parametrize(("bounds", "current", "samples", "now", "since", "activated", "expected"), CASES)
def test_decide_table(bounds, current, samples, now, since, activated, expected):
    got = decide(
        bounds=bounds,
        current=current,
        samples=samples,
        now=now,
        observing_since=since,
        policy=POLICY,
        activated_at=activated,
    )
    assert got == expected


def test_target_concurrency_is_configurable():
    policy = ScalePolicy(target_concurrency=2, scale_down_window=30, idle_window=60)
    got = decide(bounds=Bounds(1, 10), current=1, samples=[s(99, 7)], now=100, observing_since=0, policy=policy)
    assert got == 4


def test_tracker_forgets_old_samples_and_keeps_activation():
    clock = [0.0]
    tracker = LoadTracker(ScalePolicy(target_concurrency=10, scale_down_window=2, idle_window=3), clock=lambda: clock[0])
    key = ("env", "dep")
    clock[0] = 5.0
    tracker.report({key: (30, 4)})
    assert tracker.decide(key, Bounds(0, 5), current=1) == 3
    clock[0] = 6.0
    tracker.report({key: (0, 0)})
    assert tracker.decide(key, Bounds(0, 5), current=3) == 3  # peak still inside the 2 s window
    clock[0] = 7.5
    tracker.report({key: (0, 0)})
    assert tracker.decide(key, Bounds(0, 5), current=3) == 1  # down, but requests 2.5 s ago keep one
    clock[0] = 9.0
    tracker.report({key: (0, 0)})
    assert tracker.decide(key, Bounds(0, 5), current=1) == 0  # idle for the whole idle window
    tracker.activate(key)
    assert tracker.decide(key, Bounds(0, 5), current=0) == 1


def _binding_for_warmth(*, serving: bool, changed_ago: float | None) -> common_pb2.Binding:
    b = common_pb2.Binding(
        project_id="p", environment_id="env-warm", deployment=common_pb2.Deployment(id="dep-warm", state=common_pb2.Deployment.STATE_ACTIVE),
        min_replicas=2, max_replicas=3, state=common_pb2.Binding.STATE_ACTIVE, serving=serving,
    )
    if changed_ago is not None:
        b.updated_at.CopyFrom(timestamp_pb2.Timestamp(seconds=int(time.time() - changed_ago)))
    return b


@pytest.mark.parametrize(
    ("serving", "changed_ago", "wanted"),
    [
        (True, 10_000, 2),      # serving: always its minimum
        (False, 30, 2),         # just replaced: warm, a rollback is a pure pointer move
        (False, 10_000, 0),     # past the keep-warm window and idle: scaled to zero
        (False, None, 2),       # no change time known: stay warm
    ],
)
def test_previous_binding_stays_warm_for_the_window(serving, changed_ago, wanted):
    config = SchedulerConfig(keep_warm=600, idle_window=0, scale_down_window=0)
    reconciler = Reconciler(None, DesiredTable(), None, EventStore(), config)  # type: ignore[arg-type]
    binding = _binding_for_warmth(serving=serving, changed_ago=changed_ago)
    reconciler.load.report({("env-warm", "dep-warm"): (0, 0)})
    assert reconciler._decide(binding, 2) == wanted
