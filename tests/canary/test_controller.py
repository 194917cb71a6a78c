"""The canary controller's pass (services/scheduler/canary.py) with an
injected clock, its real desired table and event store, and a recording
stand-in for the registry's AdvanceCanary: what it asks for, with which
compare-and-swap values, and the canary_aborted event of an abort."""
from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from berth import enums
from berth.internal.v1 import registry_internal_pb2
from berth.v1 import common_pb2, registry_pb2
from services.router.metrics import BUCKETS
from services.scheduler.canary import Action, CanaryController
from services.scheduler.desired import DesiredTable
from services.scheduler.events import EventStore
from services.scheduler.request_metrics import BindingFigures, Window

T0 = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)


def window(requests: int, errors: int = 0) -> Window:
    buckets = [0] * (len(BUCKETS) + 1)
    buckets[3] = requests
    return Window(requests=requests, by_class=[requests - errors, 0, 0, errors], bounds=BUCKETS, buckets=buckets)


class Metrics:
    def __init__(self, figures: dict[tuple[str, str], Window]) -> None:
        self._figures = figures

    def figures(self, key: tuple[str, str]) -> BindingFigures | None:
        w = self._figures.get(key)
        return BindingFigures(w, w, ()) if w is not None else None


class Registry:
    """Records AdvanceCanary calls; ``refuse`` answers ABORTED (a move applied already)."""

    def __init__(self, refuse: bool = False) -> None:
        self.calls: list[registry_internal_pb2.AdvanceCanaryRequest] = []
        self.refuse = refuse

    async def AdvanceCanary(self, request: registry_internal_pb2.AdvanceCanaryRequest, **_: Any) -> Any:  # noqa: N802
        self.calls.append(request)
        if self.refuse:
            raise grpc.aio.AioRpcError(grpc.StatusCode.ABORTED, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       details="moved meanwhile")
        return registry_pb2.CanaryResponse()


def environment(state: str = "running", step: int = 0, started: datetime = T0) -> common_pb2.Environment:
    ts = Timestamp()
    ts.FromDatetime(started)
    return common_pb2.Environment(
        id="env_1", project_id="prj_1", name="staging", deployment_id="dep_s", sequence=7,
        canary=common_pb2.Canary(
            stable_deployment_id="dep_s", candidate_deployment_id="dep_c", candidate_weight=[10, 50][step],
            steps=[common_pb2.Canary.Step(weight=10, bake_seconds=60), common_pb2.Canary.Step(weight=50,
                                                                                                bake_seconds=60)],
            step=step, step_started_at=ts, state=enums.number(common_pb2.Canary.State, state),
            thresholds=common_pb2.Canary.Thresholds(max_error_rate_increase=0.01, max_latency_ratio=1.2,
                                                    min_requests=100)),
    )


def controller(env: common_pb2.Environment, figures: dict[tuple[str, str], Window], now: datetime,
               registry: Registry, events: EventStore) -> CanaryController:
    table = DesiredTable()
    table.upsert_environment(env)
    table.upsert_environment(common_pb2.Environment(id="env_2", project_id="prj_1", name="plain"))
    c = CanaryController(table, Metrics(figures), events, "127.0.0.1:1", "token",  # type: ignore[arg-type]
                         interval=1, clock=lambda: now)
    c._stub = registry  # type: ignore[assignment]
    return c


def test_advance_abort_wait_and_refused() -> None:
    events = EventStore()
    healthy = {("env_1", "dep_c"): window(200), ("env_1", "dep_s"): window(1000)}
    failing = {("env_1", "dep_c"): window(200, errors=20), ("env_1", "dep_s"): window(1000)}

    registry = Registry()
    done = asyncio.run(controller(environment(), healthy, T0 + timedelta(seconds=61), registry, events).pass_once())
    assert done == [("env_1", Action.ADVANCE)]
    (call,) = registry.calls
    assert (call.project, call.environment, call.expected_sequence, call.step) == ("prj_1", "env_1", 7, 0)
    assert enums.label(registry_internal_pb2.AdvanceCanaryRequest.Action, call.action) == "advance"
    assert not events.list("dep_c")

    registry = Registry()
    done = asyncio.run(controller(environment(), failing, T0 + timedelta(seconds=1), registry, events).pass_once())
    assert done == [("env_1", Action.ABORT)]
    assert "5xx 10.0%" in registry.calls[0].analysis
    (event,) = events.list("dep_c")
    print(event)
    assert event.kind == "canary_aborted" and "5xx" in event.message

    registry = Registry()  # baking: the verdict is recorded, nothing moves
    done = asyncio.run(controller(environment(), healthy, T0 + timedelta(seconds=5), registry, events).pass_once())
    assert done == [("env_1", Action.RECORD)]

    registry = Registry()  # paused: nothing asked
    assert asyncio.run(controller(environment("paused"), failing, T0, registry, events).pass_once()) == []
    assert registry.calls == []

    registry = Registry(refuse=True)  # someone moved it first: nothing counted as applied, no event
    before = len(events.list("dep_c"))
    assert asyncio.run(controller(environment(), failing, T0, registry, events).pass_once()) == []
    assert len(registry.calls) == 1 and len(events.list("dep_c")) == before
