"""Desired state: the table of bindings the scheduler should run, kept
current by the registry's Watch stream (berth.internal.v1.RegistryInternal).

The stream sends a snapshot (every environment and binding), a
``snapshot_complete`` marker, then live changes. After a reconnect the
watcher asks for the changes since the revision its table reflects: the
registry sends those (``resumed``; applied in place) or, when it no longer
holds them, a new snapshot, which replaces the table (not merged). Either
way the previous table stays in force until the marker arrives, and before
the very first marker ``snapshot_complete`` is False so the reconciler
removes nothing.
"""
from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Iterable

import grpc

from berth.internal.v1 import registry_internal_pb2, registry_internal_pb2_grpc
from berth.v1 import common_pb2
from services.common.registry_watch import RegistryFollower
from services.common.remote import channel, credentials

from .plan import BindingKey

log = logging.getLogger("berth.scheduler.desired")


def binding_key(binding: common_pb2.Binding) -> BindingKey:
    return (binding.environment_id, binding.deployment.id)


def is_terminated(binding: common_pb2.Binding) -> bool:
    return (binding.state == common_pb2.Binding.STATE_TERMINATED
            or binding.deployment.state == common_pb2.Deployment.STATE_TERMINATED)


def desired_count(binding: common_pb2.Binding) -> int:
    """The floor of a binding: min_replicas unless the binding or its
    deployment is terminated (autoscaling may ask for more, see autoscale)."""
    if is_terminated(binding):
        return 0
    return max(0, binding.min_replicas)


class DesiredTable:
    def __init__(self) -> None:
        self._bindings: dict[BindingKey, common_pb2.Binding] = {}
        self._environments: dict[str, common_pb2.Environment] = {}
        self.snapshot_complete = False
        self._listeners: list[Callable[[], None]] = []

    # -- reading ------------------------------------------------------------
    def bindings(self) -> list[common_pb2.Binding]:
        return list(self._bindings.values())

    def get(self, key: BindingKey) -> common_pb2.Binding | None:
        return self._bindings.get(key)

    def environment(self, environment_id: str) -> common_pb2.Environment | None:
        return self._environments.get(environment_id)

    def environments(self) -> list[common_pb2.Environment]:
        return list(self._environments.values())

    # -- changing -----------------------------------------------------------
    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    def replace(
        self, environments: Iterable[common_pb2.Environment], bindings: Iterable[common_pb2.Binding]
    ) -> None:
        """Installs a complete snapshot."""
        self._environments = {e.id: e for e in environments}
        self._bindings = {binding_key(b): b for b in bindings}
        self.snapshot_complete = True
        self._changed()

    def upsert_binding(self, binding: common_pb2.Binding) -> None:
        self._bindings[binding_key(binding)] = binding
        self._changed()

    def upsert_environment(self, environment: common_pb2.Environment) -> None:
        self._environments[environment.id] = environment
        self._changed()

    def delete_environment(self, environment_id: str) -> None:
        self._environments.pop(environment_id, None)
        for key in [k for k in self._bindings if k[0] == environment_id]:
            del self._bindings[key]
        self._changed()


class RegistryWatcher:
    """Consumes ``Registry.Watch`` into a ``DesiredTable``, reconnecting with
    jittered exponential backoff."""

    def __init__(
        self,
        table: DesiredTable,
        registry_address: str,
        service_token: str,
        *,
        initial_backoff: float = 0.2,
        max_backoff: float = 10.0,
    ) -> None:
        self._table = table
        self._address = registry_address
        self._token = service_token
        self._initial = initial_backoff
        self._max = max_backoff
        self._snapshotted = False
        self._follower = RegistryFollower(
            self._apply, lambda snapshot: self._table.replace(*_snapshot(snapshot))
        )

    async def run(self) -> None:
        backoff = self._initial
        async with channel(self._address) as ch:
            stub = registry_internal_pb2_grpc.RegistryInternalStub(ch)
            while True:
                self._snapshotted = False
                try:
                    await self._consume(stub)
                    log.warning("registry_watch_ended")
                except grpc.aio.AioRpcError as exc:
                    log.warning(
                        "registry_watch_failed", extra={"code": exc.code().name, "details": exc.details()}
                    )
                if self._snapshotted:
                    backoff = self._initial  # progress was made: retries start over
                delay = random.uniform(0, backoff)
                backoff = min(self._max, backoff * 2)
                await asyncio.sleep(delay)

    async def _consume(self, stub: registry_internal_pb2_grpc.RegistryInternalStub) -> None:
        """One stream, resuming from the revision the table reflects (see
        ``RegistryFollower``)."""
        follower = self._follower
        since = follower.revision

        def synced(resumed: bool) -> None:
            self._snapshotted = True
            log.info("registry_snapshot", extra={"bindings": len(self._table.bindings()),
                                                 "revision": follower.revision, "resumed": resumed,
                                                 "since_revision": since})

        await follower.follow(stub.Watch(follower.request(), metadata=credentials(self._token)), synced=synced)

    def _apply(self, event: registry_internal_pb2.WatchEvent) -> None:
        change = event.WhichOneof("change")
        if change == "environment":
            self._table.upsert_environment(event.environment)
        elif change == "binding":
            self._table.upsert_binding(event.binding)
        elif change == "environment_deleted":
            self._table.delete_environment(event.environment_deleted)


def _snapshot(
    events: list[registry_internal_pb2.WatchEvent],
) -> tuple[list[common_pb2.Environment], list[common_pb2.Binding]]:
    """The environments and bindings a snapshot's events describe."""
    environments: list[common_pb2.Environment] = []
    bindings: list[common_pb2.Binding] = []
    for event in events:
        change = event.WhichOneof("change")
        if change == "environment":
            environments.append(event.environment)
        elif change == "binding":
            bindings.append(event.binding)
        elif change == "environment_deleted":
            environments = [e for e in environments if e.id != event.environment_deleted]
            bindings = [b for b in bindings if b.environment_id != event.environment_deleted]
    return environments, bindings
