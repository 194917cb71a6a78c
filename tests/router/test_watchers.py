"""The watchers against fake Registry and Scheduler gRPC servers (grpc.aio
on port 0, implementing only the streams), and /healthz end to end."""
from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import socket
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from berth.internal.v1 import (
    registry_internal_pb2,
    registry_internal_pb2_grpc,
    scheduler_internal_pb2,
    scheduler_internal_pb2_grpc,
)
from berth.v1 import common_pb2
from services.router.app import RouterApp, parse_args
from services.router.table import RoutingState
from services.router.watchers import Backoff, EndpointWatcher, RegistryWatcher

TOKEN = "berth_svc_test-token"
BREAK = object()


async def eventually(condition: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def env_event(env_id: str, name: str, deployment_id: str, project: str = "shop") -> registry_internal_pb2.WatchEvent:
    return registry_internal_pb2.WatchEvent(
        environment=common_pb2.Environment(
            id=env_id, project_id=f"id-{project}", project_name=project, name=name, deployment_id=deployment_id
        )
    )


def binding_event(env_id: str, deployment_id: str, project: str = "shop") -> registry_internal_pb2.WatchEvent:
    return registry_internal_pb2.WatchEvent(
        binding=common_pb2.Binding(
            project_id=f"id-{project}", project_name=project, environment_id=env_id,
            deployment=common_pb2.Deployment(id=deployment_id), state=common_pb2.Binding.STATE_ACTIVE, serving=True,
            min_replicas=1, max_replicas=3,
        )
    )


class FakeRegistry(registry_internal_pb2_grpc.RegistryInternalServicer):
    def __init__(self) -> None:
        self.snapshot: list[registry_internal_pb2.WatchEvent] = []
        self.queues: list[asyncio.Queue[Any]] = []
        self.tokens: list[str] = []
        self.since: list[int] = []  # since_revision of each Watch call
        # with since_revision: these changes instead of the snapshot, marked resumed (None: always a snapshot)
        self.replay: list[registry_internal_pb2.WatchEvent] | None = None

    async def Watch(self, request: registry_internal_pb2.WatchRequest, context: grpc.aio.ServicerContext):  # type: ignore[override]
        self.tokens.append(dict(context.invocation_metadata()).get("x-api-key", ""))
        self.since.append(request.since_revision)
        if self.tokens[-1] != TOKEN:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad token")
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self.queues.append(queue)
        if request.since_revision and self.replay is not None:
            for event in self.replay:
                yield event
            last = max([request.since_revision, *(e.revision for e in self.replay)])
            yield registry_internal_pb2.WatchEvent(snapshot_complete=True, resumed=True, revision=last)
        else:
            for event in self.snapshot:
                yield event
            yield registry_internal_pb2.WatchEvent(snapshot_complete=True, revision=len(self.snapshot))
        while True:
            item = await queue.get()
            if item is BREAK:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "registry going away")
            yield item

    async def push(self, item: Any) -> None:
        await self.queues[-1].put(item)


class FakeScheduler(scheduler_internal_pb2_grpc.SchedulerInternalServicer):
    def __init__(self) -> None:
        self.current = scheduler_internal_pb2.EndpointSnapshot()
        self.queues: list[asyncio.Queue[Any]] = []
        self.tokens: list[str] = []

    async def WatchEndpoints(self, request: Any, context: grpc.aio.ServicerContext):  # type: ignore[override]
        self.tokens.append(dict(context.invocation_metadata()).get("x-api-key", ""))
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self.queues.append(queue)
        yield self.current
        while True:
            item = await queue.get()
            if item is BREAK:
                return  # the stream simply ends
            self.current = item
            yield item

    async def push(self, item: Any) -> None:
        await self.queues[-1].put(item)


def endpoint_snapshot(sets: dict[tuple[str, str], list[str]]) -> scheduler_internal_pb2.EndpointSnapshot:
    return scheduler_internal_pb2.EndpointSnapshot(
        sets=[
            scheduler_internal_pb2.EndpointSet(project_id="id-shop", environment_id=e, deployment_id=d, addresses=a)
            for (e, d), a in sets.items()
        ]
    )


async def start_grpc(register: Callable[[grpc.aio.Server], None]) -> tuple[grpc.aio.Server, int, Any]:
    server = grpc.aio.server()
    register(server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port, health


FAST = Backoff(initial=0.01, maximum=0.05)


async def test_registry_watch_snapshot_live_changes_and_reconnect() -> None:
    fake = FakeRegistry()
    fake.snapshot = [
        env_event("env-prod", "production", "dep-1"),
        env_event("env-stg", "staging", ""),
        binding_event("env-prod", "dep-1"),
    ]
    server, port, _ = await start_grpc(lambda s: registry_internal_pb2_grpc.add_RegistryInternalServicer_to_server(fake, s))
    state = RoutingState()
    watcher = RegistryWatcher(f"127.0.0.1:{port}", TOKEN, state, backoff=FAST)
    task = asyncio.create_task(watcher.run())
    try:
        await asyncio.wait_for(watcher.synced.wait(), 5)
        assert fake.tokens == [TOKEN]
        assert state.table.resolve("shop", "production").deployment_id == "dep-1"
        assert state.table.resolve("id-shop", "env-prod").environment_name == "production"
        assert set(state.table.environments) == {"env-prod", "env-stg"}

        # live changes: a deploy to staging, then production's pointer moves
        await fake.push(binding_event("env-stg", "dep-2"))
        await fake.push(env_event("env-stg", "staging", "dep-2"))
        await fake.push(env_event("env-prod", "production", "dep-2"))
        await eventually(lambda: state.table.environments["env-prod"].deployment_id == "dep-2", what="pointer move")
        assert state.table.resolve("shop", "staging").deployment_id == "dep-2"
        assert ("env-stg", "dep-2") in state.table.bindings
        await fake.push(registry_internal_pb2.WatchEvent(environment_deleted="env-stg"))
        await eventually(lambda: "env-stg" not in state.table.environments, what="environment deleted")

        # the stream breaks; the new snapshot replaces the table
        table_before = state.table
        fake.snapshot = [env_event("env-prod", "production", "dep-3"), env_event("env-qa", "qa", "")]
        await fake.push(BREAK)
        await eventually(lambda: state.table is not table_before, what="table replaced after reconnect")
        assert watcher.connects >= 2 and len(fake.tokens) >= 2
        assert set(state.table.environments) == {"env-prod", "env-qa"}
        assert state.table.resolve("shop", "production").deployment_id == "dep-3"
        assert not state.table.bindings  # the new snapshot had none
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await server.stop(None)


async def test_registry_watch_retries_until_the_registry_is_up() -> None:
    fake = FakeRegistry()
    fake.snapshot = [env_event("env-prod", "production", "dep-1")]
    # Reserve a port, then start the watcher before anything listens there.
    with socket.socket() as reserved:
        reserved.bind(("127.0.0.1", 0))
        port = reserved.getsockname()[1]
    state = RoutingState()
    watcher = RegistryWatcher(f"127.0.0.1:{port}", TOKEN, state, backoff=FAST)
    task = asyncio.create_task(watcher.run())
    server = grpc.aio.server()
    try:
        await eventually(lambda: watcher.connects >= 2, what="failed attempts")
        assert not watcher.synced.is_set() and "UNAVAILABLE" in watcher.last_error
        registry_internal_pb2_grpc.add_RegistryInternalServicer_to_server(fake, server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await asyncio.wait_for(watcher.synced.wait(), 10)
        assert state.table.resolve("shop", "production").deployment_id == "dep-1"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await server.stop(None)


async def test_endpoint_watch_replaces_sets_and_reconnects() -> None:
    fake = FakeScheduler()
    fake.current = endpoint_snapshot({("env-prod", "dep-1"): ["10.0.0.1:8080", "10.0.0.2:8080"]})
    server, port, _ = await start_grpc(lambda s: scheduler_internal_pb2_grpc.add_SchedulerInternalServicer_to_server(fake, s))
    state = RoutingState()
    watcher = EndpointWatcher(f"127.0.0.1:{port}", TOKEN, state, backoff=FAST)
    task = asyncio.create_task(watcher.run())
    try:
        await asyncio.wait_for(watcher.synced.wait(), 5)
        assert fake.tokens == [TOKEN]
        assert state.endpoints.get(("env-prod", "dep-1")) == ("10.0.0.1:8080", "10.0.0.2:8080")

        # a complete new set: dep-1 lost a replica, dep-2 appeared
        await fake.push(endpoint_snapshot({("env-prod", "dep-1"): ["10.0.0.2:8080"],
                                           ("env-stg", "dep-2"): ["10.0.0.3:8080"]}))
        await eventually(lambda: state.endpoints.get(("env-stg", "dep-2")) == ("10.0.0.3:8080",), what="update")
        assert state.endpoints.get(("env-prod", "dep-1")) == ("10.0.0.2:8080",)

        # the stream ends; after reconnecting, the server's current set is what counts
        fake.current = endpoint_snapshot({("env-stg", "dep-2"): ["10.0.0.4:8080"]})
        await fake.push(BREAK)
        await eventually(lambda: state.endpoints.get(("env-stg", "dep-2")) == ("10.0.0.4:8080",), what="reconnect")
        assert watcher.connects >= 2
        assert state.endpoints.get(("env-prod", "dep-1")) == ()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await server.stop(None)


def _http_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path, headers=headers or {})
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    return resp.status, body


async def test_router_app_healthz_and_routing_end_to_end() -> None:
    registry, scheduler = FakeRegistry(), FakeScheduler()
    registry.snapshot = [env_event("env-prod", "production", "dep-1"), binding_event("env-prod", "dep-1")]
    reg_server, reg_port, reg_health = await start_grpc(
        lambda s: registry_internal_pb2_grpc.add_RegistryInternalServicer_to_server(registry, s)
    )
    sch_server, sch_port, sch_health = await start_grpc(
        lambda s: scheduler_internal_pb2_grpc.add_SchedulerInternalServicer_to_server(scheduler, s)
    )
    sec_server, sec_port, sec_health = await start_grpc(lambda s: None)
    await reg_health.set("berth.v1.Registry", health_pb2.HealthCheckResponse.SERVING)
    await sch_health.set("berth.v1.Scheduler", health_pb2.HealthCheckResponse.SERVING)
    args: argparse.Namespace = parse_args([
        "--port", "0", "--registry", f"127.0.0.1:{reg_port}", "--scheduler", f"127.0.0.1:{sch_port}",
        "--secrets", f"127.0.0.1:{sec_port}", "--service-token", TOKEN, "--activation-timeout", "0.2",
    ])
    args.health_interval = 0.05
    app = RouterApp(args)
    port = await app.start()
    try:
        assert port > 0 and app.port == port
        await asyncio.wait_for(app.registry_watch.synced.wait(), 5)
        await asyncio.wait_for(app.endpoint_watch.synced.wait(), 5)
        await eventually(lambda: app.probe.serving("registry") and app.probe.serving("scheduler"), what="probe")
        status, body = await asyncio.to_thread(_http_get, port, "/healthz")
        assert status == 503
        assert any(item.startswith("secrets is") for item in body["not_ready"]), body
        assert body["error"]["code"] == "not_ready"

        await sec_health.set("berth.v1.Secrets", health_pb2.HealthCheckResponse.SERVING)
        await eventually(lambda: not app.not_ready(), what="all ready")
        status, body = await asyncio.to_thread(_http_get, port, "/healthz")
        assert (status, body) == (200, {"status": "ok"})

        # the table the watch loaded routes requests (no replica: 503 after the activation timeout)
        status, body = await asyncio.to_thread(
            _http_get, port, "/", {"X-Berth-Project": "shop", "X-Berth-Environment": "production"}
        )
        assert status == 503 and body["error"]["code"] == "no_ready_replica"
    finally:
        await app.stop(1.0)
        for server in (reg_server, sch_server, sec_server):
            await server.stop(None)


async def test_registry_watch_resumes_after_a_reconnect() -> None:
    """Reconnecting, the watcher asks for the changes since the revision its
    table reflects and applies them in place (no new snapshot); a registry
    that no longer holds them sends a snapshot, which replaces the table."""
    fake = FakeRegistry()
    fake.snapshot = [env_event("env-prod", "production", "dep-1"), binding_event("env-prod", "dep-1")]
    server, port, _ = await start_grpc(lambda s: registry_internal_pb2_grpc.add_RegistryInternalServicer_to_server(fake, s))
    state = RoutingState()
    watcher = RegistryWatcher(f"127.0.0.1:{port}", TOKEN, state, backoff=FAST)
    task = asyncio.create_task(watcher.run())
    try:
        await asyncio.wait_for(watcher.synced.wait(), 5)
        assert fake.since == [0] and state.revision == 2
        live = env_event("env-stg", "staging", "dep-2")
        live.revision = 3
        await fake.push(live)
        await eventually(lambda: state.revision == 3, what="live change")

        # Changes 4 and 5 happened while the stream was down: only they come back.
        table = state.table
        moved = env_event("env-prod", "production", "dep-2")
        moved.revision = 4
        deleted = registry_internal_pb2.WatchEvent(environment_deleted="env-stg", revision=5)
        fake.replay = [moved, deleted]
        await fake.push(BREAK)
        await eventually(lambda: state.revision == 5, what="resumed changes")
        assert fake.since == [0, 3]
        assert state.table is table  # applied in place, not rebuilt
        assert state.table.resolve("shop", "production").deployment_id == "dep-2"
        assert set(state.table.environments) == {"env-prod"}
        assert ("env-prod", "dep-1") in state.table.bindings  # from the first snapshot, kept

        # The registry no longer holds revision 5 (say it was restored): a snapshot replaces the table.
        fake.replay = None
        fake.snapshot = [env_event("env-qa", "qa", "")]
        await fake.push(BREAK)
        await eventually(lambda: state.table is not table, what="snapshot after reconnect")
        assert fake.since == [0, 3, 5]
        assert set(state.table.environments) == {"env-qa"} and state.revision == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await server.stop(None)
