"""RegistryWatcher against an in-process fake RegistryInternal.Watch (port 0)."""
from __future__ import annotations

import asyncio
import contextlib

import grpc

from berth.internal.v1 import registry_internal_pb2, registry_internal_pb2_grpc
from berth.v1 import common_pb2
from services.scheduler.desired import DesiredTable, RegistryWatcher, desired_count

from .conftest import make_binding, wait_for


class FakeRegistry(registry_internal_pb2_grpc.RegistryInternalServicer):
    """First stream: snapshot {A}, then live upsert B, then the stream breaks.
    Second stream: snapshot {B} only (A was deleted meanwhile)."""

    def __init__(self, a: common_pb2.Binding, b: common_pb2.Binding) -> None:
        self.a, self.b = a, b
        self.streams = 0
        self.tokens: list[str] = []
        self.break_first = asyncio.Event()
        self.finish_second = asyncio.Event()

    async def Watch(self, request, context):
        self.tokens.append(dict(context.invocation_metadata()).get("x-api-key", ""))
        self.streams += 1
        if self.streams == 1:
            yield registry_internal_pb2.WatchEvent(revision=1, binding=self.a)
            yield registry_internal_pb2.WatchEvent(revision=1, snapshot_complete=True)
            yield registry_internal_pb2.WatchEvent(revision=2, binding=self.b)
            await self.break_first.wait()
            await context.abort(grpc.StatusCode.UNAVAILABLE, "registry restarting")
        else:
            yield registry_internal_pb2.WatchEvent(revision=3, binding=self.b)
            await self.finish_second.wait()  # hold the second stream open until the test checked
            yield registry_internal_pb2.WatchEvent(revision=3, snapshot_complete=True)
            await asyncio.Event().wait()


def test_watch_snapshot_live_changes_and_rebuild_after_reconnect():
    a = make_binding(image="a", image_id="sha256:a", min_replicas=2)
    b = make_binding(image="b", image_id="sha256:b", min_replicas=1)
    b.state = common_pb2.Binding.STATE_TERMINATED

    async def scenario() -> None:
        fake = FakeRegistry(a, b)
        server = grpc.aio.server()
        registry_internal_pb2_grpc.add_RegistryInternalServicer_to_server(fake, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        table = DesiredTable()
        changes: list[int] = []
        table.on_change(lambda: changes.append(1))
        watcher = RegistryWatcher(table, f"127.0.0.1:{port}", "svc-token", initial_backoff=0.05, max_backoff=0.1)
        task = asyncio.create_task(watcher.run())
        try:
            assert not table.snapshot_complete
            await wait_for(lambda: len(table.bindings()) == 2, what="snapshot + live binding")
            assert table.snapshot_complete and changes
            assert desired_count(table.get((b.environment_id, b.deployment.id))) == 0  # terminated
            assert desired_count(table.get((a.environment_id, a.deployment.id))) == 2
            # Break the stream; the partial second snapshot must not replace the table yet.
            fake.break_first.set()
            await wait_for(lambda: fake.streams == 2, what="reconnect")
            assert len(table.bindings()) == 2
            fake.finish_second.set()
            await wait_for(lambda: len(table.bindings()) == 1, what="table rebuilt from the new snapshot")
            assert table.get((a.environment_id, a.deployment.id)) is None
            assert fake.tokens == ["svc-token", "svc-token"]
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await server.stop(0)

    asyncio.run(scenario())


class ResumingRegistry(registry_internal_pb2_grpc.RegistryInternalServicer):
    """First stream: snapshot {A} at revision 1, live B at revision 2, then it
    breaks. Later streams resume: the changes after the requested revision."""

    def __init__(self, a: common_pb2.Binding, b: common_pb2.Binding, b_scaled: common_pb2.Binding) -> None:
        self.log = [registry_internal_pb2.WatchEvent(revision=2, binding=b), registry_internal_pb2.WatchEvent(revision=3, binding=b_scaled)]
        self.a = a
        self.since: list[int] = []
        self.break_first = asyncio.Event()

    async def Watch(self, request, context):
        self.since.append(request.since_revision)
        if request.since_revision == 0:
            yield registry_internal_pb2.WatchEvent(revision=1, binding=self.a)
            yield registry_internal_pb2.WatchEvent(revision=1, snapshot_complete=True)
            yield self.log[0]
            await self.break_first.wait()
            await context.abort(grpc.StatusCode.UNAVAILABLE, "registry restarting")
        for event in self.log:
            if event.revision > request.since_revision:
                yield event
        yield registry_internal_pb2.WatchEvent(revision=self.log[-1].revision, snapshot_complete=True, resumed=True)
        await asyncio.Event().wait()


def test_watch_resumes_from_the_revision_it_reflects():
    a = make_binding(image="a", image_id="sha256:a", min_replicas=2)
    b = make_binding(image="b", image_id="sha256:b", min_replicas=1)
    b_scaled = common_pb2.Binding()
    b_scaled.CopyFrom(b)
    b_scaled.min_replicas = 3

    async def scenario() -> None:
        fake = ResumingRegistry(a, b, b_scaled)
        server = grpc.aio.server()
        registry_internal_pb2_grpc.add_RegistryInternalServicer_to_server(fake, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        table = DesiredTable()
        watcher = RegistryWatcher(table, f"127.0.0.1:{port}", "svc-token", initial_backoff=0.05, max_backoff=0.1)
        task = asyncio.create_task(watcher.run())
        try:
            await wait_for(lambda: len(table.bindings()) == 2, what="snapshot + live binding")
            fake.break_first.set()
            await wait_for(lambda: desired_count(table.get((b.environment_id, b.deployment.id))) == 3,
                           what="the change made while disconnected")
            assert fake.since == [0, 2]  # resumed after the last change applied, no second snapshot
            assert desired_count(table.get((a.environment_id, a.deployment.id))) == 2  # kept from the snapshot
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await server.stop(0)

    asyncio.run(scenario())
