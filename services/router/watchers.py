"""Consumers of the control plane's streams (berth.internal.v1, service
token): the registry's Watch (pointer table) and the scheduler's
WatchEndpoints (ready replicas). Each keeps its stream open, and reconnects
with jittered exponential backoff when it breaks. The registry watch follows
several registry instances when given a list (the next one after a break,
resuming by revision: ``follow_instances``); a new endpoint stream replaces
the sets with its snapshot."""
from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from berth import enums
from berth.client import split_addresses
from berth.internal.v1 import (
    registry_internal_pb2,
    scheduler_internal_pb2,
    scheduler_internal_pb2_grpc,
)
from berth.v1 import common_pb2
from services.common.registry_watch import RegistryFollower, follow_instances
from services.common.remote import channel, credentials
from services.router.table import BindingEntry, EnvironmentEntry, RoutingState, RoutingTable

log = logging.getLogger("berth.router.watch")

HANDOVER_GRACE = 3.0  # seconds a new endpoint stream cannot empty a binding (see EndpointWatcher._consume)


class Backoff:
    """Exponential backoff with full jitter, reset after progress."""

    def __init__(self, initial: float = 0.1, maximum: float = 5.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self._attempt = 0

    def reset(self) -> None:
        self._attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.initial * (2**self._attempt))
        self._attempt = min(self._attempt + 1, 30)
        return random.uniform(ceiling / 2, ceiling)


class _StreamWatcher:
    name = "stream"
    kind = ""  # the service streamed from (its channel's health check)

    def __init__(self, address: str, service_token: str, *, backoff: Backoff | None = None) -> None:
        self.address = address
        self._metadata = credentials(service_token)
        self._backoff = backoff or Backoff()
        self._channel: grpc.aio.Channel | None = None
        self.synced = asyncio.Event()  # set once the first snapshot arrived
        self.connects = 0  # streams opened so far (for observability and tests)
        self.last_error = ""

    async def run(self) -> None:
        self._channel = channel(self.address, self.kind)
        try:
            while True:
                self.connects += 1
                try:
                    await self._consume(self._channel)
                    self.last_error = "stream ended by the server"
                except grpc.aio.AioRpcError as exc:
                    self.last_error = f"{exc.code().name}: {exc.details()}"
                delay = self._backoff.next_delay()
                log.warning(
                    "watch_broken",
                    extra={"stream": self.name, "address": self.address, "error": self.last_error,
                           "retry_in_s": round(delay, 3)},
                )
                await asyncio.sleep(delay)
        finally:
            await self._channel.close()

    async def _consume(self, ch: grpc.aio.Channel) -> None:
        raise NotImplementedError

    def _progress(self) -> None:
        self._backoff.reset()
        self.last_error = ""
        if not self.synced.is_set():
            log.info("watch_synced", extra={"stream": self.name, "address": self.address})
        self.synced.set()


def environment_entry(env) -> EnvironmentEntry:  # type: ignore[no-untyped-def]
    return EnvironmentEntry(
        id=env.id, project_id=env.project_id, project_name=env.project_name, name=env.name,
        deployment_id=env.deployment_id, sequence=env.sequence, previous_deployment_id=env.previous_deployment_id,
        canary_deployment_id=_canary(env)[0], canary_weight=_canary(env)[1],
    )


def _canary(env) -> tuple[str, int]:  # type: ignore[no-untyped-def]
    """A running or paused canary's candidate and weight (nothing else
    splits traffic: an aborted canary is at 0, a promoted one moved the
    pointer)."""
    if not env.HasField("canary"):
        return "", 0
    state = enums.label(common_pb2.Canary.State, env.canary.state)
    if state not in ("running", "paused") or env.canary.candidate_weight <= 0:
        return "", 0
    return env.canary.candidate_deployment_id, env.canary.candidate_weight


def binding_entry(b) -> BindingEntry:  # type: ignore[no-untyped-def]
    return BindingEntry(
        project_id=b.project_id, environment_id=b.environment_id, deployment_id=b.deployment.id,
        state=enums.label(common_pb2.Binding.State, b.state), serving=b.serving,
        min_replicas=b.min_replicas, max_replicas=b.max_replicas,
    )


def apply_event(table: RoutingTable, event: registry_internal_pb2.WatchEvent) -> None:
    which = event.WhichOneof("change")
    if which == "environment":
        table.upsert_environment(environment_entry(event.environment))
    elif which == "binding":
        table.upsert_binding(binding_entry(event.binding), event.binding.project_name)
    elif which == "environment_deleted":
        table.delete_environment(event.environment_deleted)


class RegistryWatcher(_StreamWatcher):
    """Keeps ``state.table`` equal to the registry's environments and bindings."""

    name = "registry"
    kind = "registry"

    def __init__(self, address: str, service_token: str, state: RoutingState, *, backoff: Backoff | None = None):
        super().__init__(address, service_token, backoff=backoff)
        self.state = state
        self._follower = RegistryFollower(lambda event: apply_event(self.state.table, event), self._replace)
        self.streams: list[str] = []  # the registry instance of each stream opened so far
        self.syncs: list[bool] = []  # ``resumed`` of each marker applied (False: a snapshot)

    def _replace(self, snapshot: list[registry_internal_pb2.WatchEvent]) -> None:
        fresh = RoutingTable()
        for event in snapshot:
            apply_event(fresh, event)
        self.state.table = fresh

    async def run(self) -> None:
        """Follows the feed over the registry instances ``address`` names (one,
        or a comma-separated list on one database): when a stream breaks the
        next instance is tried, resuming from the revision the table reflects
        (``follow_instances``), backing off while none answers."""
        follower = self._follower
        since = follower.revision

        def opened(address: str) -> None:
            nonlocal since
            since = follower.revision
            self.connects += 1
            self.streams.append(address)

        def applied() -> None:
            self.state.revision = follower.revision
            self.state.table_updated()

        def synced(resumed: bool) -> None:
            self.state.loaded = True
            self.syncs.append(resumed)
            applied()
            log.info("routing_table_loaded", extra={"environments": len(self.state.table.environments),
                                                    "bindings": len(self.state.table.bindings),
                                                    "revision": follower.revision, "resumed": resumed,
                                                    "since_revision": since, "address": self.streams[-1]})
            self._progress()

        def broken(address: str, error: str) -> None:
            self.last_error = error
            log.warning("watch_broken", extra={"stream": self.name, "address": address, "error": error})

        await follow_instances(
            follower, split_addresses(self.address), self._metadata,
            synced=synced, applied=applied, broken=broken, opened=opened,
            connect=lambda address: channel(address, self.kind),
            initial_delay=self._backoff.initial, max_delay=self._backoff.maximum,
        )


class EndpointWatcher(_StreamWatcher):
    """Keeps ``state.endpoints`` equal to the scheduler's latest snapshot."""

    name = "scheduler"
    kind = "scheduler"

    def __init__(
        self,
        address: str,
        service_token: str,
        state: RoutingState,
        *,
        backoff: Backoff | None = None,
        on_removed: Callable[[set[str]], None] | None = None,
    ):
        super().__init__(address, service_token, backoff=backoff)
        self.state = state
        self._on_removed = on_removed  # addresses that left the pool (idle connections to them are closed)
        self.handover_grace = HANDOVER_GRACE

    async def _consume(self, ch: grpc.aio.Channel) -> None:
        """One stream. For ``handover_grace`` seconds after it opens, an
        empty snapshot changes nothing and a binding shown with no address
        keeps the addresses the router had:
        a scheduler that has just taken over the lease may send snapshots
        before it has looked at the engine, and those replicas were serving
        a moment ago. One that really went away refuses the connection and
        the proxy tries the next; the first snapshot after the grace is
        taken as it is."""
        stub = scheduler_internal_pb2_grpc.SchedulerInternalStub(ch)
        loop = asyncio.get_running_loop()
        opened = loop.time()
        async for snapshot in stub.WatchEndpoints(scheduler_internal_pb2.WatchEndpointsRequest(), metadata=self._metadata):
            sets = [(s.environment_id, s.deployment_id, list(s.addresses)) for s in snapshot.sets]
            if loop.time() - opened < self.handover_grace:
                if not sets and self.state.endpoints.snapshot():
                    self._progress()
                    continue  # nothing at all: a scheduler that has not looked yet
                sets = [(e, d, addresses or list(self.state.endpoints.get((e, d)))) for e, d, addresses in sets]
            removed = self.state.endpoints.replace(
                sets, {(s.environment_id, s.deployment_id): s.status for s in snapshot.sets if s.status},
            )
            if removed:
                log.info("replicas_left_pool", extra={"addresses": sorted(removed)})
                if self._on_removed is not None:
                    self._on_removed(removed)
            self._progress()


class HealthProbe:
    """Asks each dependency's grpc.health.v1 service, every ``interval``
    seconds in the background, whether it is SERVING. A dependency given as
    several instances (a comma-separated list) is asked instance by
    instance: it serves while any instance does, and the status names each
    one that does not."""

    def __init__(self, targets: dict[str, tuple[str, str]], *, interval: float = 2.0, timeout: float = 1.0) -> None:
        # name -> (address or comma-separated addresses, gRPC service name)
        self.targets = targets
        self.interval = interval
        self.timeout = timeout
        self.status: dict[str, str] = {name: "not checked yet" for name in targets}
        self._channels: dict[str, grpc.aio.Channel] = {}

    def serving(self, name: str) -> bool:
        return self.status.get(name) == "SERVING"

    async def _ask(self, address: str, service: str) -> str:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = channel(address)
        stub = health_pb2_grpc.HealthStub(ch)
        try:
            answer = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
        except grpc.aio.AioRpcError as exc:
            return f"unreachable at {address} ({exc.code().name})"

    async def check_once(self) -> None:
        async def one(name: str, addresses: str, service: str) -> None:
            instances = split_addresses(addresses)
            answers = await asyncio.gather(*(self._ask(a, service) for a in instances))
            if len(instances) == 1 or "SERVING" not in answers:
                self.status[name] = answers[0] if len(instances) == 1 else "; ".join(
                    f"{a}: {s}" for a, s in zip(instances, answers, strict=True))
            else:
                self.status[name] = "SERVING"

        await asyncio.gather(*(one(n, a, s) for n, (a, s) in self.targets.items()))

    async def run(self) -> None:
        try:
            while True:
                await self.check_once()
                await asyncio.sleep(self.interval)
        finally:
            for ch in self._channels.values():
                await ch.close()


async def run_forever(name: str, fn: Callable[[], Awaitable[None]]) -> None:
    """Runs a background loop; a bug in it is logged, then the loop restarts
    after a pause, so one bad event never silently stops routing updates."""
    while True:
        try:
            await fn()
            return
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the one place a background loop's bug is caught
            log.exception("background_task_failed", extra={"task": name})
            await asyncio.sleep(1.0)
