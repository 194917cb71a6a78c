"""The client side of ``berth.internal.v1.RegistryInternal.Watch`` (the
platform-wide change feed), shared by the router and the scheduler: what
comes before the ``snapshot_complete`` marker is either the
changes since the revision asked for (``resumed``: applied to the caller's
table in place) or a full snapshot (the caller replaces its table with it);
after the marker, every change as it commits.

The revision to resume from moves only with what was applied, so a stream
cut before its marker never makes the next one resume past changes that
were not applied.
"""
from __future__ import annotations

from collections.abc import AsyncIterable, Callable

from berth.internal.v1 import registry_internal_pb2


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
