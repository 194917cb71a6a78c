"""Desired state: the table of bindings the scheduler should run, kept
current by the registry's Watch stream (berth.internal.v1.RegistryInternal).

The stream sends a snapshot (every environment and binding), a
``snapshot_complete`` marker, then live changes. After a reconnect (to the
next registry instance when several are given) the watcher asks for the
changes since the revision its table reflects: the registry sends those (``resumed``; applied in place) or, when it no longer
holds them, a new snapshot, which replaces the table (not merged). Either
way the previous table stays in force until the marker arrives, and before
the very first marker ``snapshot_complete`` is False so the reconciler
removes nothing.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from berth.client import split_addresses
from berth.internal.v1 import registry_internal_pb2
from berth.v1 import common_pb2
from services.common.registry_watch import RegistryFollower, follow_instances
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
    """Consumes ``Registry.Watch`` into a ``DesiredTable``. ``registry_address``
    is one ``host:port`` or a comma-separated list of registry instances on
    one database: when the stream breaks, the next instance is tried,
    resuming from the revision the table reflects (``follow_instances``),
    with exponential backoff while none answers."""

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
        self._addresses = split_addresses(registry_address)
        self._token = service_token
        self._initial = initial_backoff
        self._max = max_backoff
        self._since = 0
        self.streams: list[str] = []  # the instance of each stream opened so far
        self.syncs: list[bool] = []  # ``resumed`` of each marker applied (False: a snapshot)
        self._follower = RegistryFollower(
            self._apply, lambda snapshot: self._table.replace(*_snapshot(snapshot))
        )

    @property
    def revision(self) -> int:
        """The registry revision the table reflects."""
        return self._follower.revision

    async def run(self) -> None:
        follower = self._follower

        def opened(address: str) -> None:
            self._since = follower.revision
            self.streams.append(address)

        def synced(resumed: bool) -> None:
            self.syncs.append(resumed)
            log.info("registry_snapshot", extra={"bindings": len(self._table.bindings()),
                                                 "revision": follower.revision, "resumed": resumed,
                                                 "since_revision": self._since, "address": self.streams[-1]})

        def broken(address: str, error: str) -> None:
            log.warning("registry_watch_failed", extra={"address": address, "error": error})

        await follow_instances(
            follower, self._addresses, credentials(self._token),
            synced=synced, broken=broken, opened=opened, connect=lambda address: channel(address, "registry"),
            initial_delay=self._initial, max_delay=self._max,
        )

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
