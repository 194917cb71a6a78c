"""The client side of ``berth.internal.v1.RegistryInternal.Watch`` (the
platform-wide change feed), shared by the router and the scheduler: what
comes before the ``snapshot_complete`` marker is either the
changes since the revision asked for (``resumed``: applied to the caller's
table in place) or a full snapshot (the caller replaces its table with it);
after the marker, every change as it commits.

The revision to resume from moves only with what was applied, so a stream
cut before its marker never makes the next one resume past changes that
were not applied. Every registry instance on one database serves the same
feed (it lives in the database), so that revision resumes on any of them:
``follow_instances`` fails over between instances.
"""
from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterable, Callable, Sequence

import grpc

from berth.internal.v1 import registry_internal_pb2, registry_internal_pb2_grpc


class RegistryFollower:
    def __init__(
        self,
        apply: Callable[[registry_internal_pb2.WatchEvent], None],
        replace: Callable[[list[registry_internal_pb2.WatchEvent]], None],
    ) -> None:
        """``apply``: one change to the current table; ``replace``: a new
        table from a snapshot's events."""
        self._apply = apply
        self._replace = replace
        self.revision = 0  # what the caller's table reflects

    def request(self) -> registry_internal_pb2.WatchRequest:
        return registry_internal_pb2.WatchRequest(since_revision=self.revision)

    async def follow(
        self,
        events: AsyncIterable[registry_internal_pb2.WatchEvent],
        *,
        synced: Callable[[bool], None],
        applied: Callable[[], None] = lambda: None,
    ) -> None:
        """Consumes one stream until it ends. ``synced(resumed)`` after the
        marker's batch is applied (all of it in one step, so no reader sees
        half of it); ``applied()`` after each later change."""
        before_marker: list[registry_internal_pb2.WatchEvent] | None = []  # None once live
        async for event in events:
            if before_marker is None:
                self._apply(event)
                self.revision = max(self.revision, event.revision)
                applied()
                continue
            before_marker.append(event)
            if not event.snapshot_complete:
                continue
            if event.resumed:
                for change in before_marker:
                    self._apply(change)
                self.revision = max(self.revision, *(change.revision for change in before_marker))
            else:
                self._replace(before_marker)
                self.revision = max(change.revision for change in before_marker)  # the snapshot's
            before_marker = None
            synced(event.resumed)


async def follow_instances(
    follower: RegistryFollower,
    addresses: Sequence[str],
    metadata: Sequence[tuple[str, str]],
    *,
    synced: Callable[[bool], None] = lambda resumed: None,
    applied: Callable[[], None] = lambda: None,
    broken: Callable[[str, str], None] = lambda address, error: None,
    opened: Callable[[str], None] = lambda address: None,
    connect: Callable[[str], grpc.aio.Channel] = grpc.aio.insecure_channel,
    max_streams: int | None = None,
    initial_delay: float = 0.05,
    max_delay: float = 2.0,
) -> None:
    """Follows the change feed over several registry instances of one
    database: when a stream breaks (its instance died or stopped), the next
    address is tried, resuming from ``follower.revision`` — every instance
    serves the same feed, so nothing is lost or repeated. Backs off (up to
    ``max_delay``, jittered) while no instance answers; returns after
    ``max_streams`` streams when given, else runs until cancelled.

    ``opened(address)`` before each stream, ``broken(address, error)`` after
    it ends; ``connect(address)`` makes the channel to one instance (the
    services pass ``services.common.remote.channel``: keepalive, so a peer
    that vanished without a FIN is noticed)."""
    if not addresses:
        raise ValueError("follow_instances needs at least one registry address")
    delay = initial_delay
    opened_streams = 0
    index = 0
    while max_streams is None or opened_streams < max_streams:
        address = addresses[index % len(addresses)]
        opened_streams += 1
        progressed = False

        def on_synced(resumed: bool) -> None:
            nonlocal progressed
            progressed = True
            synced(resumed)

        opened(address)
        try:
            async with connect(address) as channel:
                stub = registry_internal_pb2_grpc.RegistryInternalStub(channel)
                await follower.follow(stub.Watch(follower.request(), metadata=tuple(metadata)),
                                      synced=on_synced, applied=applied)
            broken(address, "stream ended by the server")
        except grpc.aio.AioRpcError as exc:
            broken(address, f"{exc.code().name}: {exc.details()}")
        index += 1
        delay = initial_delay if progressed else min(delay * 2, max_delay)
        await asyncio.sleep(random.uniform(delay / 2, delay))
