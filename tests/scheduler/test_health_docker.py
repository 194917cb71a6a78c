"""Health on a real engine: crash loops, OOM kills, failing health checks;
restart counts carried by labels; events persisted under the data dir."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest

from berth import shapes
from berth.v1 import scheduler_pb2, scheduler_pb2_grpc
from services.common.remote import credentials
from services.common.server import start_server
from services.scheduler.desired import DesiredTable
from services.scheduler.events import EventStore
from services.scheduler.reconciler import BindingState, Reconciler, SchedulerConfig
from services.scheduler.servicer import SERVICE_NAME, SchedulerServicer

from .conftest import FakeSecrets, make_binding, wait_for
from .test_servicer_grpc import fake_authenticate

pytestmark = pytest.mark.docker

BB = "/bin/busybox"


def fast(instance: str) -> SchedulerConfig:
    return SchedulerConfig(
        instance=instance,
        reconcile_interval=0.3,
        stop_grace=1.0,
        quick_exit=2.0,
        restart_backoff=0.1,
        restart_backoff_max=0.5,
        crash_loop_after=3,
        unhealthy_after=3,
    )


@contextlib.asynccontextmanager
async def running(reconciler: Reconciler) -> AsyncIterator[Reconciler]:
    task = asyncio.create_task(reconciler.run())
    try:
        yield reconciler
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await reconciler.close()


def kinds(events: EventStore, deployment_id: str) -> dict[str, int]:
    return {e.kind: e.count for e in events.list(deployment_id)}


def test_crash_loop_and_oom_are_events_that_survive_restart_and_scale_to_zero(
    docker_client, adapter, instance, busybox_image, tmp_path
):
    crash = make_binding(image="", image_id=busybox_image, min_replicas=1, max_replicas=1,
                         command=[BB, "sh", "-c", "echo boom >&2; exit 3"])
    oom = make_binding(image="", image_id=busybox_image, min_replicas=1, max_replicas=1,
                       command=[BB, "dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"])
    oom.deployment.config.resources.memory_bytes = 8 * 1024 * 1024
    data_dir = str(tmp_path / "scheduler")

    async def scenario() -> None:
        table = DesiredTable()
        table.replace([], [crash, oom])
        events = EventStore(data_dir)
        reconciler = Reconciler(adapter, table, FakeSecrets(), events, fast(instance))
        async with running(reconciler):
            await wait_for(lambda: "crash_loop" in kinds(events, crash.deployment.id), timeout=40, what="crash_loop")
            await wait_for(lambda: "oom_killed" in kinds(events, oom.deployment.id), timeout=40, what="oom_killed")
            crash_view = (await reconciler.status(crash.deployment.id))[0]
            assert crash_view.status in (BindingState.FAILED, BindingState.DEPLOYING)
            # Restart counts come from the containers' labels.
            await wait_for(
                lambda: _max_restarts(reconciler, crash.deployment.id), timeout=20, what="a restart count"
            )
            [loop] = [e for e in events.list(crash.deployment.id) if e.kind == "crash_loop"]
            assert loop.replica == "0" and "exit code 3" in loop.message and loop.environment == "staging"
            [killed] = [e for e in events.list(oom.deployment.id) if e.kind == "oom_killed"]
            assert "memory limit" in killed.message and "137" in killed.message

            # Scale both to zero: the replicas go, the errors stay.
            table.replace([], [_bounds(crash, 0, 0), _bounds(oom, 0, 0)])
            await wait_for(lambda: not _containers(docker_client, instance, crash.deployment.id)
                           and not _containers(docker_client, instance, oom.deployment.id),
                           timeout=20, what="scale to zero")
            [view] = await reconciler.status(crash.deployment.id)
            assert view.status is BindingState.SCALED_TO_ZERO and view.replicas == ()
        events.close()

        # A new scheduler on the same data dir, with the bindings gone
        # entirely, still lists the errors over gRPC.
        reopened = EventStore(data_dir)
        fresh = Reconciler(adapter, DesiredTable(), FakeSecrets(), reopened, fast(instance))
        servicer = SchedulerServicer(DesiredTable(), fresh, reopened)
        server = await start_server(
            host="127.0.0.1", port=0, service_names=[SERVICE_NAME],
            register=lambda s: scheduler_pb2_grpc.add_SchedulerServicer_to_server(servicer, s),
            authenticate=fake_authenticate,
        )
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = scheduler_pb2_grpc.SchedulerStub(channel)
                answer = await stub.ListDeploymentErrors(
                    scheduler_pb2.ListDeploymentErrorsRequest(deployment_id=crash.deployment.id),
                    metadata=credentials("key-owner"), timeout=5,
                )
                by_kind = {shapes.error_kind(e): e for e in answer.errors}
                assert by_kind["crash_loop"].count >= 1 and by_kind["crash_loop"].replica == "0"
                assert by_kind["crash_loop"].first_seen.seconds <= by_kind["crash_loop"].last_seen.seconds
                with pytest.raises(grpc.aio.AioRpcError) as other:
                    await stub.ListDeploymentErrors(
                        scheduler_pb2.ListDeploymentErrorsRequest(deployment_id=oom.deployment.id),
                        metadata=credentials("key-other"), timeout=5,
                    )
                assert other.value.code() == grpc.StatusCode.NOT_FOUND  # another project's: not confirmed
        finally:
            await server.stop(0)
            reopened.close()

    asyncio.run(scenario())


def test_failing_health_checks_replace_the_replica(docker_client, adapter, instance, busybox_image):
    # Serves for ~3 s, then the HTTP server dies while the container keeps running.
    script = f"{BB} httpd -f -p 8080 -h / & pid=$!; {BB} sleep 3; kill $pid; exec {BB} sleep 1000"
    binding = make_binding(image="", image_id=busybox_image, min_replicas=1, max_replicas=1,
                           command=[BB, "sh", "-c", script])
    dep = binding.deployment.id

    async def scenario() -> None:
        table = DesiredTable()
        table.replace([], [binding])
        events = EventStore()
        reconciler = Reconciler(adapter, table, FakeSecrets(), events, fast(instance))
        async with running(reconciler):
            await wait_for(lambda: [s for s in reconciler.endpoints.current if s.deployment_id == dep and s.addresses],
                           timeout=20, what="ready")
            first = set(_containers(docker_client, instance, dep))
            await wait_for(lambda: "health_check_failed" in kinds(events, dep), timeout=30, what="health_check_failed")
            [event] = events.list(dep)
            assert "3 health checks in a row" in event.message and event.replica == "0"

            async def replaced() -> bool:
                [view] = await reconciler.status(dep)
                return any(r.restarts >= 1 and r.state.value == "ready" and r.container_id not in first
                           for r in view.replicas)

            await wait_for(replaced, timeout=30, what="a ready replacement with restarts=1")

    asyncio.run(scenario())


async def _max_restarts_async(reconciler: Reconciler, deployment_id: str) -> int:
    views = await reconciler.status(deployment_id)
    return max((r.restarts for v in views for r in v.replicas), default=0)


def _max_restarts(reconciler: Reconciler, deployment_id: str):  # type: ignore[no-untyped-def]
    return _max_restarts_async(reconciler, deployment_id)


def _bounds(binding, low: int, high: int):  # type: ignore[no-untyped-def]
    copy = type(binding)()
    copy.CopyFrom(binding)
    copy.min_replicas, copy.max_replicas = low, high
    return copy


def _containers(client, instance: str, deployment_id: str) -> list[str]:  # type: ignore[no-untyped-def]
    found = client.containers.list(
        all=True, filters={"label": [f"berth.instance={instance}", f"berth.deployment={deployment_id}"]},
        ignore_removed=True,
    )
    return [c.id for c in found]
