"""Fan-out of committed registry changes to watchers, ordered by revision.

Writers publish after their transaction commits; watchers subscribe before
reading a snapshot, so no change falls between the snapshot and the stream.
"""
from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

RECENT_CHANGES_KEPT = 10_000


@dataclass(frozen=True)
class Change:
    revision: int
    kind: str  # "environment" | "binding" | "environment_deleted"
    payload: Any  # a proto message, or an environment id


class ChangeHub:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: set[tuple[asyncio.AbstractEventLoop, asyncio.Queue[Change]]] = set()
        self._recent: deque[Change] = deque(maxlen=RECENT_CHANGES_KEPT)

    def publish(self, changes: list[Change]) -> None:
        """Called from any thread after a commit."""
        with self._lock:
            self._recent.extend(changes)
            subscribers = list(self._subscribers)
        for loop, queue in subscribers:
            for change in changes:
                loop.call_soon_threadsafe(queue.put_nowait, change)

    def subscribe(self) -> tuple[asyncio.AbstractEventLoop, asyncio.Queue[Change]]:
        entry = (asyncio.get_running_loop(), asyncio.Queue[Change]())
        with self._lock:
            self._subscribers.add(entry)
        return entry

    def unsubscribe(self, entry: tuple[asyncio.AbstractEventLoop, asyncio.Queue[Change]]) -> None:
        with self._lock:
            self._subscribers.discard(entry)

    def since(self, revision: int) -> list[Change] | None:
        """Changes after ``revision`` if still held in memory, else None (the
        caller then needs a fresh snapshot)."""
        with self._lock:
            if not self._recent:
                return None
            if self._recent[0].revision > revision + 1:
                return None
            return [c for c in self._recent if c.revision > revision]
