"""The Scheduler gRPC services (berth.v1.Scheduler and
berth.internal.v1.SchedulerInternal) on an in-process server (port 0), backed
by a real reconciler on Docker."""
from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from berth import errors, shapes
from berth.internal.v1 import scheduler_internal_pb2, scheduler_internal_pb2_grpc
from berth.v1 import scheduler_pb2, scheduler_pb2_grpc
from services.common.auth import SERVICE_PRINCIPAL, Principal
from services.common.remote import credentials
from services.common.server import start_server
from services.scheduler.desired import DesiredTable
from services.scheduler.events import EventStore
from services.scheduler.reconciler import Reconciler, SchedulerConfig
from services.scheduler.servicer import SERVICE_NAME, SERVICE_NAMES, add_to_server

from .conftest import FakeSecrets, make_binding

pytestmark = pytest.mark.docker

KEYS = {
    "svc-token": SERVICE_PRINCIPAL,
    "key-owner": Principal(project_id="proj-1", project_name="shop", key_name="ci"),
    "key-other": Principal(project_id="proj-2", project_name="other", key_name="ci"),
}


async def fake_authenticate(api_key: str) -> Principal:
    if api_key not in KEYS:
        raise errors.Unauthenticated("unknown key")
    return KEYS[api_key]


def _details(error: grpc.aio.AioRpcError) -> tuple[str, str, str, str]:
    """(ErrorInfo.reason, BadRequest field, ErrorInfo hint, ResourceInfo type) of a refusal."""
    status = rpc_status.from_call(error)
    assert status is not None
    reason = field = hint = resource_type = ""
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, hint = info.reason, info.metadata.get("hint", "")
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            field = bad.field_violations[0].field
        elif detail.Is(error_details_pb2.ResourceInfo.DESCRIPTOR):
            resource = error_details_pb2.ResourceInfo()
            detail.Unpack(resource)
            resource_type = resource.resource_type
    return reason, field, hint, resource_type


def test_watch_endpoints_and_status_over_grpc(adapter, instance, worker_image):
    tag, image_id = worker_image
    binding = make_binding(image=tag, image_id=image_id, min_replicas=2)
    dep = binding.deployment.id

    async def scenario() -> None:
        table = DesiredTable()
        table.replace([], [binding])
        events = EventStore()
        reconciler = Reconciler(
            adapter, table, FakeSecrets(), events, SchedulerConfig(instance=instance, reconcile_interval=0.5)
        )
        server = await start_server(
            host="127.0.0.1",
            port=0,
            service_names=SERVICE_NAMES,
            register=lambda s: add_to_server(s, table, reconciler, events),
            authenticate=fake_authenticate,
        )
        loop_task = asyncio.create_task(reconciler.run())
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = scheduler_pb2_grpc.SchedulerStub(channel)
                internal = scheduler_internal_pb2_grpc.SchedulerInternalStub(channel)

                # Only Berth's own services may watch endpoints.
                with pytest.raises(grpc.aio.AioRpcError) as denied:
                    async for _ in internal.WatchEndpoints(
                        scheduler_internal_pb2.WatchEndpointsRequest(), metadata=credentials("key-owner"), timeout=5
                    ):
                        pass
                assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED

                stream = internal.WatchEndpoints(
                    scheduler_internal_pb2.WatchEndpointsRequest(), metadata=credentials("svc-token"), timeout=60
                )
                ready: list[str] = []
                async for snapshot in stream:
                    mine = [s for s in snapshot.sets if s.deployment_id == dep]
                    if mine and len(mine[0].addresses) == 2:
                        assert mine[0].project_id == "proj-1"
                        assert mine[0].environment_id == binding.environment_id
                        ready = list(mine[0].addresses)
                        break
                stream.cancel()
                assert all(a.endswith(":8080") for a in ready)

                status = await stub.GetDeploymentStatus(
                    scheduler_pb2.GetDeploymentStatusRequest(project="shop", latest=True),
                    metadata=credentials("key-owner"), timeout=5,
                )
                assert status.deployment.id == dep  # latest: the newest deployment
                # An empty id means nothing by itself; latest with an id is ambiguous.
                for method, request_type in (
                    (stub.GetDeploymentStatus, scheduler_pb2.GetDeploymentStatusRequest),
                    (stub.ListDeploymentErrors, scheduler_pb2.ListDeploymentErrorsRequest),
                ):
                    for request, field in ((request_type(project="shop"), "deployment_id"),
                                           (request_type(deployment_id=dep, latest=True), "latest")):
                        with pytest.raises(grpc.aio.AioRpcError) as unnamed:
                            await method(request, metadata=credentials("key-owner"), timeout=5)
                        assert unnamed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                        assert _details(unnamed.value)[1] == field
                latest_errors = await stub.ListDeploymentErrors(
                    scheduler_pb2.ListDeploymentErrorsRequest(latest=True), metadata=credentials("key-owner"), timeout=5
                )
                assert list(latest_errors.errors) == []
                [b] = status.bindings
                assert shapes.binding_status(b) == "running" and b.environment == "staging"
                assert sorted(r.address for r in b.replicas) == sorted(ready)
                assert {shapes.replica_state(r) for r in b.replicas} == {"ready"}
                # the count the scheduler drives the binding to: its target (the minimum, no load)
                assert (b.min_replicas, b.desired_replicas) == (binding.min_replicas, 2)

                with pytest.raises(grpc.aio.AioRpcError) as other:
                    await stub.GetDeploymentStatus(
                        scheduler_pb2.GetDeploymentStatusRequest(deployment_id=dep),
                        metadata=credentials("key-other"),
                        timeout=5,
                    )
                # Another project's deployment is answered as one that does
                # not exist (the registry's wording): ids are not confirmed.
                assert other.value.code() == grpc.StatusCode.NOT_FOUND
                assert other.value.details() == f"deployment {dep!r} not found in project 'other'"
                with pytest.raises(grpc.aio.AioRpcError) as absent:
                    await stub.GetDeploymentStatus(
                        scheduler_pb2.GetDeploymentStatusRequest(deployment_id="dep_0123456789ab"),
                        metadata=credentials("key-other"),
                        timeout=5,
                    )
                assert absent.value.code() == grpc.StatusCode.NOT_FOUND
                assert absent.value.details() == "deployment 'dep_0123456789ab' not found in project 'other'"
                assert _details(absent.value)[1:] == _details(other.value)[1:]  # same reason, hint, resource type
                with pytest.raises(grpc.aio.AioRpcError) as other_errors:
                    await stub.ListDeploymentErrors(
                        scheduler_pb2.ListDeploymentErrorsRequest(deployment_id=dep),
                        metadata=credentials("key-other"),
                        timeout=5,
                    )
                assert other_errors.value.code() == grpc.StatusCode.NOT_FOUND
                assert other_errors.value.details() == f"deployment {dep!r} not found in project 'other'"
                with pytest.raises(grpc.aio.AioRpcError) as missing:
                    await stub.ListDeploymentErrors(
                        scheduler_pb2.ListDeploymentErrorsRequest(deployment_id="dep_0123456789ab"),
                        metadata=credentials("key-owner"),
                        timeout=5,
                    )
                assert missing.value.code() == grpc.StatusCode.NOT_FOUND
                assert missing.value.details() == "deployment 'dep_0123456789ab' not found in project 'shop'"
                # A malformed id is the caller's mistake: INVALID_ID naming the field.
                for method, request_type in (
                    (stub.GetDeploymentStatus, scheduler_pb2.GetDeploymentStatusRequest),
                    (stub.ListDeploymentErrors, scheduler_pb2.ListDeploymentErrorsRequest),
                ):
                    for bad in ("no-such-deployment", "dep_0123", "dep_0123456789AB", "dep_0123456789abc"):
                        with pytest.raises(grpc.aio.AioRpcError) as malformed:
                            await method(request_type(deployment_id=bad), metadata=credentials("key-owner"), timeout=5)
                        assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                        reason, field = _details(malformed.value)[:2]
                        assert (reason, field) == ("INVALID_ID", "deployment_id")
                # A project key naming another project: WRONG_PROJECT, as in the registry.
                with pytest.raises(grpc.aio.AioRpcError) as wrong:
                    await stub.GetDeploymentStatus(
                        scheduler_pb2.GetDeploymentStatusRequest(deployment_id=dep, project="shop"),
                        metadata=credentials("key-other"), timeout=5,
                    )
                assert wrong.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert _details(wrong.value)[0] == "WRONG_PROJECT"
                errs = await stub.ListDeploymentErrors(
                    scheduler_pb2.ListDeploymentErrorsRequest(deployment_id=dep), metadata=credentials("key-owner"),
                    timeout=5,
                )
                assert list(errs.errors) == []
        finally:
            loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop_task
            await reconciler.close()
            await server.stop(0)

    asyncio.run(scenario())


@contextlib.asynccontextmanager
async def serving(table: DesiredTable, reconciler: Reconciler, events: EventStore):  # type: ignore[no-untyped-def]
    """The public and the internal stub of a server running the reconciler."""
    server = await start_server(
        host="127.0.0.1",
        port=0,
        service_names=SERVICE_NAMES,
        register=lambda s: add_to_server(s, table, reconciler, events),
        authenticate=fake_authenticate,
    )
    loop_task = asyncio.create_task(reconciler.run())
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield scheduler_pb2_grpc.SchedulerStub(channel), scheduler_internal_pb2_grpc.SchedulerInternalStub(channel)
    finally:
        loop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop_task
        await reconciler.close()
        await server.stop(0)


def test_unreachable_engine_is_a_scheduling_failure_and_unavailable():
    import docker

    from services.scheduler.docker_adapter import DockerAdapter

    binding = make_binding(image="x", image_id="sha256:" + "0" * 64, min_replicas=1)
    dep = binding.deployment.id
    nowhere = DockerAdapter(docker.DockerClient(base_url="unix:///tmp/berth-test-no-engine.sock", version="1.41"))

    async def scenario() -> None:
        table = DesiredTable()
        table.replace([], [binding])
        events = EventStore()
        reconciler = Reconciler(nowhere, table, FakeSecrets(), events, SchedulerConfig(reconcile_interval=0.2))
        async with serving(table, reconciler, events) as (stub, _):
            await asyncio.wait_for(_until(lambda: events.list(dep)), 10)
            [event] = events.list(dep)
            assert event.kind == "scheduling_failure" and "unreachable" in event.message.lower()
            with pytest.raises(grpc.aio.AioRpcError) as down:
                await stub.GetDeploymentStatus(
                    scheduler_pb2.GetDeploymentStatusRequest(deployment_id=dep),
                    metadata=credentials("key-owner"), timeout=5,
                )
            assert down.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "Docker engine" in (down.value.details() or "")

    try:
        asyncio.run(scenario())
    finally:
        nowhere.close()


async def _until(condition):  # type: ignore[no-untyped-def]
    while not condition():
        await asyncio.sleep(0.05)


def test_activate_and_report_load_drive_replicas(adapter, instance, worker_image):
    tag, image_id = worker_image
    binding = make_binding(image=tag, image_id=image_id, min_replicas=0, max_replicas=3)
    dep, env_id = binding.deployment.id, binding.environment_id
    config = SchedulerConfig(
        instance=instance, reconcile_interval=0.3, stop_grace=1.0, drain_delay=0.3,
        target_concurrency=10, scale_down_window=1.5, idle_window=3.0,
    )

    async def scenario() -> None:
        table = DesiredTable()
        table.replace([], [binding])
        events = EventStore()
        reconciler = Reconciler(adapter, table, FakeSecrets(), events, config)
        async with serving(table, reconciler, events) as (stub, internal):
            svc = credentials("svc-token")

            async def status() -> scheduler_pb2.BindingStatus:
                answer = await stub.GetDeploymentStatus(
                    scheduler_pb2.GetDeploymentStatusRequest(deployment_id=dep), metadata=svc, timeout=5
                )
                return answer.bindings[0]

            async def ready_count(n: int, state: str = "running") -> bool:
                b = await status()
                return shapes.binding_status(b) == state and len([r for r in b.replicas if shapes.replica_state(r) == "ready"]) == n \
                    and len(b.replicas) == n

            async def wait(check, what: str, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
                deadline = asyncio.get_running_loop().time() + timeout
                while not await check():
                    assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
                    await asyncio.sleep(0.1)

            await wait(lambda: ready_count(0, "scaled_to_zero"), "scaled_to_zero at first")
            for forbidden in (
                internal.Activate(scheduler_internal_pb2.ActivateRequest(environment_id=env_id, deployment_id=dep),
                                  metadata=credentials("key-owner"), timeout=5),
                internal.ReportLoad(scheduler_internal_pb2.ReportLoadRequest(), metadata=credentials("key-owner"), timeout=5),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as denied:
                    await forbidden
                assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await internal.ReportLoad(
                    scheduler_internal_pb2.ReportLoadRequest(bindings=[scheduler_internal_pb2.BindingLoad(
                        environment_id=env_id, deployment_id=dep, in_flight=-1)]),
                    metadata=svc, timeout=5,
                )
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "in_flight" in bad.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await internal.Activate(
                    scheduler_internal_pb2.ActivateRequest(environment_id=env_id, deployment_id="nope"),
                    metadata=svc, timeout=5,
                )
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

            # A request for a binding at zero: one replica at once.
            answer = await internal.Activate(
                scheduler_internal_pb2.ActivateRequest(project_id="proj-1", environment_id=env_id, deployment_id=dep),
                metadata=svc, timeout=5,
            )
            assert answer.status == "deploying"
            await wait(lambda: ready_count(1), "activated replica")

            async def report(in_flight: int, requests: int = 0) -> None:
                await internal.ReportLoad(
                    scheduler_internal_pb2.ReportLoadRequest(bindings=[scheduler_internal_pb2.BindingLoad(
                        project_id="proj-1", environment_id=env_id, deployment_id=dep,
                        in_flight=in_flight, requests=requests)]),
                    metadata=svc, timeout=5,
                )

            # 25 in flight at 10 per replica: 3 (the max), fast.
            await report(25, 40)
            await wait(lambda: ready_count(3), "scale up to 3")
            # Quiet: back to 1 after the scale-down window, then 0 after the idle window.
            async def quiet_then(n: int, state: str = "running") -> bool:
                await report(0)
                return await ready_count(n, state)

            await wait(lambda: quiet_then(1), "scale down to 1 after the window")
            await wait(lambda: quiet_then(0, "scaled_to_zero"), "scale to zero after the idle window")
            assert [s.status for s in reconciler.endpoints.current if s.deployment_id == dep] == ["scaled_to_zero"]

    asyncio.run(scenario())


def test_load_reports_from_several_router_processes_add_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each router worker process reports its own load: in-flight counts are
    summed over the reporters heard from recently (never replaced by the last
    one), completed requests are counted once, and a reporter silent for
    longer than REPORTER_TTL stops counting."""
    import docker

    from services.scheduler import reconciler as reconciler_module
    from services.scheduler.docker_adapter import DockerAdapter

    binding = make_binding(image="x", image_id="sha256:" + "0" * 64, min_replicas=0)
    key = (binding.environment_id, binding.deployment.id)
    nowhere = DockerAdapter(docker.DockerClient(base_url="unix:///tmp/berth-test-no-engine.sock", version="1.41"))
    clock = [1000.0]
    monkeypatch.setattr(reconciler_module.time, "monotonic", lambda: clock[0])

    def load(in_flight: int, requests: int) -> scheduler_internal_pb2.BindingLoad:
        return scheduler_internal_pb2.BindingLoad(project_id="proj-1", environment_id=key[0], deployment_id=key[1],
                                                  in_flight=in_flight, requests=requests)

    async def scenario() -> None:
        table = DesiredTable()
        table.replace([], [binding])
        events = EventStore()
        reconciler = Reconciler(nowhere, table, FakeSecrets(), events, SchedulerConfig(reconcile_interval=60))
        async with serving(table, reconciler, events) as (_, internal):
            async def report(reporter: str, in_flight: int, requests: int) -> tuple[int, int]:
                await internal.ReportLoad(
                    scheduler_internal_pb2.ReportLoadRequest(bindings=[load(in_flight, requests)], reporter=reporter),
                    metadata=credentials("svc-token"), timeout=5,
                )
                sample = reconciler.load._samples[key][-1]
                return sample.in_flight, sample.requests

            assert await report("host:101", 7, 40) == (7, 40)
            assert await report("host:102", 5, 30) == (12, 30)  # 7 + 5 in flight; this report's 30 requests
            assert await report("host:101", 2, 10) == (7, 10)  # 101 now has 2, 102 still 5
            clock[0] += reconciler_module.REPORTER_TTL + 1
            assert await report("host:102", 4, 3) == (4, 3)  # 101 went silent: no longer counted
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await internal.ReportLoad(
                    scheduler_internal_pb2.ReportLoadRequest(bindings=[load(-1, 0)], reporter="x"),
                    metadata=credentials("svc-token"), timeout=5,
                )
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # google.rpc.Status details: the field, and an ErrorInfo reason.
            status = rpc_status.from_call(bad.value)
            kinds = {d.TypeName(): d for d in status.details}
            violations = error_details_pb2.BadRequest()
            kinds["google.rpc.BadRequest"].Unpack(violations)
            assert violations.field_violations[0].field == "bindings[0].in_flight"
            info = error_details_pb2.ErrorInfo()
            kinds["google.rpc.ErrorInfo"].Unpack(info)
            assert (info.reason, info.domain) == ("INVALID_ARGUMENT", "berth.dev")

    try:
        asyncio.run(scenario())
    finally:
        nowhere.close()


def test_before_the_bindings_are_loaded_status_is_unavailable_and_health_not_serving() -> None:
    """A scheduler that has not yet received the registry's snapshot must not
    answer "not bound to any environment" (a guess), nor look ready."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    table = DesiredTable()
    events = EventStore()
    reconciler = Reconciler(None, table, FakeSecrets(), events, SchedulerConfig())  # type: ignore[arg-type]

    async def scenario() -> None:
        server = await start_server(
            host="127.0.0.1", port=0, service_names=SERVICE_NAMES,
            register=lambda s: add_to_server(s, table, reconciler, events),
            authenticate=fake_authenticate, serving=False,
        )
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = scheduler_pb2_grpc.SchedulerStub(channel)
                internal = scheduler_internal_pb2_grpc.SchedulerInternalStub(channel)
                health = health_pb2_grpc.HealthStub(channel)

                async def health_status() -> int:
                    answer = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
                    return answer.status

                assert await health_status() == health_pb2.HealthCheckResponse.NOT_SERVING
                for call in (
                    stub.GetDeploymentStatus(scheduler_pb2.GetDeploymentStatusRequest(deployment_id="dep_00000000000a"),
                                             metadata=credentials("key-owner"), timeout=5),
                    internal.Activate(scheduler_internal_pb2.ActivateRequest(environment_id="env-1", deployment_id="dep-1"),
                                      metadata=credentials("svc-token"), timeout=5),
                ):
                    with pytest.raises(grpc.aio.AioRpcError) as early:
                        await call
                    assert early.value.code() == grpc.StatusCode.UNAVAILABLE
                    assert "not loaded the bindings" in (early.value.details() or "")

                table.replace([], [])
                await server.set_serving()
                assert await health_status() == health_pb2.HealthCheckResponse.SERVING
                with pytest.raises(grpc.aio.AioRpcError) as unknown:
                    await stub.GetDeploymentStatus(scheduler_pb2.GetDeploymentStatusRequest(deployment_id="dep_00000000000a"),
                                                   metadata=credentials("key-owner"), timeout=5)
                assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        finally:
            await server.stop(0)

    asyncio.run(scenario())


def test_deployment_errors_page_most_recent_first_with_a_stable_tiebreaker() -> None:
    from datetime import UTC, datetime, timedelta

    from services.common.paging import encode_token
    from services.scheduler.events import EventKind
    from services.scheduler.servicer import SchedulerServicer

    events = EventStore()
    dep = "dep_00000000beef"
    base = datetime(2026, 1, 1, tzinfo=UTC)
    for i in range(250):  # three events share each second: the id breaks the tie
        events.record(EventKind.CRASH_LOOP, message=f"exit {i}", project_id="proj-1", deployment_id=dep,
                      environment_id="env-1", environment="staging", replica=str(i), at=base + timedelta(seconds=i // 3))
    expected = [r for second in sorted({i // 3 for i in range(250)}, reverse=True)
                for r in [str(i) for i in range(250) if i // 3 == second]]
    servicer = SchedulerServicer(DesiredTable(), None, events)  # type: ignore[arg-type]

    async def scenario() -> None:
        server = await start_server(
            host="127.0.0.1", port=0, service_names=[SERVICE_NAME],
            register=lambda s: scheduler_pb2_grpc.add_SchedulerServicer_to_server(servicer, s),
            authenticate=fake_authenticate,
        )
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = scheduler_pb2_grpc.SchedulerStub(channel)

                async def page(key: str = "key-owner", **kw):  # type: ignore[no-untyped-def]
                    return await stub.ListDeploymentErrors(
                        scheduler_pb2.ListDeploymentErrorsRequest(deployment_id=dep, **kw),
                        metadata=credentials(key), timeout=5,
                    )

                sizes, seen, token = [], [], ""
                while True:
                    answer = await page(page_token=token)
                    sizes.append(len(answer.errors))
                    seen += [e.replica for e in answer.errors]
                    token = answer.next_page_token
                    if not token:
                        break
                assert sizes == [100, 100, 50] and seen == expected

                first = await page(page_size=10)
                # A new event lands before the cursor: the next page does not shift.
                events.record(EventKind.OOM_KILLED, message="killed", project_id="proj-1", deployment_id=dep,
                              environment_id="env-1", environment="staging", replica="0",
                              at=base + timedelta(days=1))
                second = await page(page_size=10, page_token=first.next_page_token)
                assert [e.replica for e in list(first.errors) + list(second.errors)] == expected[:20]

                for kw, field in (({"page_size": -1}, "page_size"), ({"page_token": "x!"}, "page_token"),
                                  ({"page_token": encode_token(f"ListDeploymentErrors/proj-1/{dep}", ["no time", 1])},
                                   "page_token"),
                                  ({"page_token": encode_token("ListDeployments/proj-1/", ["x", "y"])}, "page_token")):
                    with pytest.raises(grpc.aio.AioRpcError) as bad:
                        await page(**kw)
                    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    assert _details(bad.value)[1] == field
        finally:
            await server.stop(0)
            events.close()

    asyncio.run(scenario())
