"""The Scheduler gRPC service on an in-process server (port 0), backed by a
real reconciler on Docker."""
from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from berth import errors
from berth.v1 import scheduler_pb2, scheduler_pb2_grpc
from services.common.auth import SERVICE_PRINCIPAL, Principal
from services.common.remote import credentials
from services.common.server import start_server
from services.scheduler.desired import DesiredTable
from services.scheduler.events import EventStore
from services.scheduler.reconciler import Reconciler, SchedulerConfig
from services.scheduler.servicer import SERVICE_NAME, SchedulerServicer

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
        servicer = SchedulerServicer(table, reconciler, events)
        server = await start_server(
            host="127.0.0.1",
            port=0,
            service_names=[SERVICE_NAME],
            register=lambda s: scheduler_pb2_grpc.add_SchedulerServicer_to_server(servicer, s),
            authenticate=fake_authenticate,
        )
        loop_task = asyncio.create_task(reconciler.run())
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = scheduler_pb2_grpc.SchedulerStub(channel)

                # Only Berth's own services may watch endpoints.
                with pytest.raises(grpc.aio.AioRpcError) as denied:
                    async for _ in stub.WatchEndpoints(
                        scheduler_pb2.WatchEndpointsRequest(), metadata=credentials("key-owner"), timeout=5
                    ):
                        pass
                assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED

                stream = stub.WatchEndpoints(
                    scheduler_pb2.WatchEndpointsRequest(), metadata=credentials("svc-token"), timeout=60
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
                    scheduler_pb2.GetDeploymentStatusRequest(project="shop"), metadata=credentials("key-owner"), timeout=5
                )
                assert status.deployment.id == dep  # empty id: the latest deployment
                [b] = status.bindings
                assert b.status == "running" and b.environment == "staging"
                assert sorted(r.address for r in b.replicas) == sorted(ready)
                assert {r.state for r in b.replicas} == {"ready"}

                with pytest.raises(grpc.aio.AioRpcError) as other:
                    await stub.GetDeploymentStatus(
                        scheduler_pb2.GetDeploymentStatusRequest(deployment_id=dep),
                        metadata=credentials("key-other"),
                        timeout=5,
                    )
                assert other.value.code() == grpc.StatusCode.PERMISSION_DENIED
                with pytest.raises(grpc.aio.AioRpcError) as missing:
                    await stub.ListDeploymentErrors(
                        scheduler_pb2.ListDeploymentErrorsRequest(deployment_id="no-such-deployment"),
                        metadata=credentials("key-owner"),
                        timeout=5,
                    )
                assert missing.value.code() == grpc.StatusCode.NOT_FOUND
                assert "no-such-deployment" in (missing.value.details() or "")
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
