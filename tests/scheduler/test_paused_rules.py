"""The paused tier's shared rules (runtime.ScalingRuntime), on an injected
clock: when a min-0 binding is paused, woken, kept, stopped; that a runtime
which cannot pause (swarm) stops it after the pause window instead; the
binding's own windows over the scheduler's."""
from __future__ import annotations

import pytest

from berth.v1 import common_pb2
from services.scheduler.autoscale import LoadTracker, ScalePolicy
from services.scheduler.desired import DesiredTable
from services.scheduler.plan import Rest
from services.scheduler.runtime import ScalingRuntime, SchedulerConfig

KEY = ("env-p", "dep-p")


class Runtime(ScalingRuntime):
    """ScalingRuntime with ``slots`` replicas on a fake engine and a clock."""

    def __init__(self, *, pauses: bool, config: SchedulerConfig, binding: common_pb2.Binding) -> None:
        table = DesiredTable()
        table.replace([], [binding])
        super().__init__(table, config)
        self.PAUSES = pauses
        self.clock = [1000.0]
        self.load = LoadTracker(
            ScalePolicy(scale_down_window=config.scale_down_window, idle_window=config.idle_window),
            clock=lambda: self.clock[0],
        )
        self.slots = 1

    @property
    def _slots(self) -> dict[tuple[str, str], int]:
        return {KEY: self.slots}

    def at(self, seconds: float) -> Runtime:
        self.clock[0] = 1000.0 + seconds
        return self


def binding(*, min_replicas: int = 0, pause: int = 0, stop: int = 0) -> common_pb2.Binding:
    return common_pb2.Binding(
        environment_id=KEY[0], deployment=common_pb2.Deployment(id=KEY[1]), min_replicas=min_replicas,
        max_replicas=3, state=common_pb2.Binding.STATE_ACTIVE, serving=True,
        idle_pause_seconds=pause, idle_stop_seconds=stop,
    )


CONFIG = SchedulerConfig(idle_pause=60, idle_window=900, scale_down_window=30)


@pytest.mark.parametrize(
    ("b", "events", "at", "rest", "count"),
    [
        pytest.param(binding(), [], 10, Rest.KEEP, 1, id="just-started-keeps-what-it-finds"),
        pytest.param(binding(), [], 61, Rest.PAUSE, 1, id="idle-for-the-pause-window-pauses-keeps-one"),
        pytest.param(binding(), [("load", 50, (0, 1))], 100, Rest.WAKE, 1, id="a-request-50-s-ago-wakes"),
        pytest.param(binding(), [("load", 50, (0, 1))], 111, Rest.PAUSE, 1, id="pause-window-after-the-last-request"),
        pytest.param(binding(), [("load", 100, (1, 0))], 150, Rest.WAKE, 1, id="in-flight-counts-as-busy"),
        pytest.param(binding(), [("activate", 120, None)], 170, Rest.WAKE, 1, id="an-activation-wakes"),
        pytest.param(binding(), [], 901, Rest.PAUSE, 0, id="idle-for-the-stop-window-stops"),
        pytest.param(binding(pause=5, stop=20), [], 6, Rest.PAUSE, 1, id="binding-windows-win-pause"),
        pytest.param(binding(pause=5, stop=20), [], 31, Rest.PAUSE, 0, id="binding-windows-win-stop"),
        # (no scale-down before the tracker watched a whole scale-down window, 30 s)
        pytest.param(binding(pause=5, stop=20), [], 21, Rest.PAUSE, 1, id="no-stop-before-a-scale-down-window"),
        pytest.param(binding(pause=900), [], 1000, Rest.WAKE, 0, id="pause-not-below-stop-never-pauses"),
        pytest.param(binding(min_replicas=1), [], 1000, Rest.WAKE, 1, id="min-1-is-never-paused"),
    ],
)
def test_rules(b, events, at, rest, count):  # type: ignore[no-untyped-def]
    rt = Runtime(pauses=True, config=CONFIG, binding=b)
    for kind, when, load in events:
        rt.at(when)
        if kind == "load":
            rt.report_load({KEY: load}, reporter="router-a")
        else:
            rt.activate(KEY)
    rt.at(at)
    assert rt._rest(b) is rest
    assert rt._decide(b, rt.slots) == count


def test_in_flight_on_one_reporter_holds_the_binding_awake_across_the_window():
    b = binding(pause=5, stop=600)
    rt = Runtime(pauses=True, config=CONFIG, binding=b)
    for second in range(0, 30):  # a request held open on router-b for 30 s, both routers reporting
        rt.at(second).report_load({KEY: (0, 0)}, reporter="router-a")
        rt.report_load({KEY: (1, 0)}, reporter="router-b")
        assert rt._rest(b) is Rest.WAKE, second
    rt.at(30).report_load({KEY: (0, 1)}, reporter="router-b")  # it completed
    assert rt.at(34)._rest(b) is Rest.WAKE
    assert rt.at(35)._rest(b) is Rest.PAUSE


def test_memory_pressure_stops_an_idle_paused_binding_only():
    b = binding(pause=5, stop=600)
    rt = Runtime(pauses=True, config=CONFIG, binding=b)
    rt._memory_low = True
    assert rt.at(4)._decide(b, 1) == 1  # not idle for the pause window yet
    assert rt.at(6)._decide(b, 1) == 0  # would be paused: stopped, the host needs the memory
    rt._memory_low = False
    assert rt._decide(b, 1) == 1


@pytest.mark.parametrize(("at", "count"), [(59, 1), (61, 0)])
def test_a_runtime_that_cannot_pause_stops_after_the_pause_window(at, count):  # type: ignore[no-untyped-def]
    b = binding()
    rt = Runtime(pauses=False, config=CONFIG, binding=b)
    rt.at(at)
    assert rt._rest(b) is Rest.WAKE  # never asked to pause
    assert rt._decide(b, 1) == count


def test_pause_and_unpause_are_fenced_like_every_engine_write():
    import asyncio

    from services.scheduler import docker_adapter as da
    from services.scheduler.lease import LeaseLost
    from tests.scheduler.test_lease import NoEngine, StubFence

    fence = StubFence(epoch=7, leading=False)
    adapter = da.DockerAdapter(NoEngine(), fence=fence, workers=1)  # type: ignore[arg-type]

    async def scenario() -> None:
        for write in (adapter.pause("c"), adapter.unpause("c"), adapter.remove("c", paused=True),
                      adapter.stop("c", paused=True)):
            with pytest.raises(LeaseLost):
                await write  # refused before the engine is touched (NoEngine fails the test otherwise)

    try:
        asyncio.run(scenario())
    finally:
        adapter.close()
