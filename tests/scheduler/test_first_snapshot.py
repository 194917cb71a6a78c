"""A scheduler that just took over (a new leader, a restarted process) must
not stream an empty endpoint set before it has observed the engine: the
routers would empty their pools. Its first WatchEndpoints message already
lists the replicas that are running (issue 15, item 3). Real Docker, a real
in-process gRPC server on port 0."""
from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import pytest

from berth import errors
from berth.internal.v1 import scheduler_internal_pb2, scheduler_internal_pb2_grpc
from services.common.auth import SERVICE_PRINCIPAL, Principal
from services.common.remote import credentials
from services.common.server import start_server
from services.scheduler.desired import DesiredTable
from services.scheduler.events import EventStore
from services.scheduler.reconciler import Reconciler, SchedulerConfig
from services.scheduler.runtime import EndpointBroadcast, EndpointSet
from services.scheduler.servicer import SERVICE_NAMES, add_to_server

from .conftest import FakeSecrets, make_binding


async def _authenticate(api_key: str) -> Principal:
    if api_key != "svc-token":
        raise errors.Unauthenticated("unknown key")
    return SERVICE_PRINCIPAL


def test_broadcast_delivers_nothing_before_the_first_complete_observation() -> None:
    async def scenario() -> None:
        broadcast = EndpointBroadcast()
        got: list[tuple[EndpointSet, ...]] = []

        async def consume() -> None:
            async for value in broadcast.subscribe():
                got.append(value)
                if len(got) == 2:
                    return

        consumer = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        partial = (EndpointSet("p", "e", "d", ("10.0.0.1:8080",)),)
        broadcast.publish(partial)  # mid-pass publish: not yet complete
        await asyncio.sleep(0.05)
        assert got == []
        assert not broadcast.complete
        broadcast.mark_complete()
        await asyncio.sleep(0.05)
        assert got == [partial]
        full = (EndpointSet("p", "e", "d", ("10.0.0.1:8080", "10.0.0.2:8080")),)
        broadcast.publish(full)
        await asyncio.wait_for(consumer, 5)
        assert got == [partial, full]

        # An empty first complete observation is still delivered (nothing runs).
        empty = EndpointBroadcast()
        empty.mark_complete()
        agen = empty.subscribe()
        assert await asyncio.wait_for(agen.__anext__(), 5) == ()
        await agen.aclose()

        # close() ends a subscriber that is still waiting for the first observation.
        waiting = EndpointBroadcast()
        seen: list[tuple[EndpointSet, ...]] = []

        async def drain() -> None:
            async for value in waiting.subscribe():
                seen.append(value)

        task = asyncio.create_task(drain())
        await asyncio.sleep(0.05)
        waiting.close()
        await asyncio.wait_for(task, 5)
        assert seen == []

    asyncio.run(scenario())


@pytest.mark.docker
def test_new_leaders_first_endpoint_message_lists_the_running_replicas(adapter, instance, worker_image):
    tag, image_id = worker_image
    binding = make_binding(image=tag, image_id=image_id, min_replicas=2)
    dep = binding.deployment.id

    async def scenario() -> None:
        # The old leader starts two replicas and sees them ready.
        table = DesiredTable()
        table.replace([], [binding])
        old = Reconciler(adapter, table, FakeSecrets(), EventStore(),
                         SchedulerConfig(instance=instance, reconcile_interval=0.5))
        old_loop = asyncio.create_task(old.run())
        running: list[str] = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            running = sorted(a for s in old.endpoints.current if s.deployment_id == dep for a in s.addresses)
            if len(running) == 2:
                break
            await asyncio.sleep(0.2)
        old_loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await old_loop
        await old.close()
        assert len(running) == 2, "the old leader never saw both replicas ready"

        # The new leader: a fresh runtime (no observation yet) behind a server.
        new_table = DesiredTable()
        new_table.replace([], [binding])
        events = EventStore()
        new = Reconciler(adapter, new_table, FakeSecrets(), events,
                         SchedulerConfig(instance=instance, reconcile_interval=0.5))
        server = await start_server(
            host="127.0.0.1", port=0, service_names=SERVICE_NAMES,
            register=lambda s: add_to_server(s, new_table, new, events),
            authenticate=_authenticate,
        )
        new_loop: asyncio.Task[None] | None = None
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                internal = scheduler_internal_pb2_grpc.SchedulerInternalStub(channel)
                # A router subscribes before the new leader has looked at the engine.
                stream = internal.WatchEndpoints(
                    scheduler_internal_pb2.WatchEndpointsRequest(), metadata=credentials("svc-token"), timeout=60
                )
                first = asyncio.ensure_future(stream.read())
                await asyncio.sleep(0.5)
                assert not first.done(), "a message was streamed before the first observation"
                new_loop = asyncio.create_task(new.run())
                snapshot = await asyncio.wait_for(first, 60)
                stream.cancel()
                mine = [s for s in snapshot.sets if s.deployment_id == dep]
                assert mine, f"the first message has no set for {dep}: {snapshot}"
                assert sorted(mine[0].addresses) == running
        finally:
            if new_loop is not None:
                new_loop.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await new_loop
            await new.close()
            await server.stop(0)

    asyncio.run(scenario())
