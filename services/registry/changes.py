"""Fan-out of committed registry changes to watchers, ordered by revision.

Writers publish after their transaction commits, in commit order (the
service holds a publish lock across commit and publish); watchers subscribe
before reading a snapshot or a replay, so no change falls in between.

The hub keeps the most recent changes in memory so that a watcher that
reconnects with ``since_revision`` resumes exactly where it left off. When
that revision is older than what is kept (or unknown to this process, e.g.
after a registry restart), the watcher gets a full snapshot instead and must
replace its table.

The log is per process: changes made through another registry process on the
same database do not reach this hub. Run one registry per database (the
compare-and-swap protects correctness either way; only the watch would miss
the other process's changes).
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
    def __init__(self, start_revision: int = 0, *, keep: int = RECENT_CHANGES_KEPT) -> None:
        self._lock = threading.Lock()
        self._subscribers: set[tuple[asyncio.AbstractEventLoop, asyncio.Queue[Change]]] = set()
        self._recent: deque[Change] = deque()
        self._keep = keep
        # Every change after ``_floor`` is held in ``_recent``; ``_latest`` is
        # the newest revision this process has seen committed.
        self._floor = start_revision
        self._latest = start_revision

    def publish(self, changes: list[Change]) -> None:
        """Called from any thread after a commit, in commit order."""
        with self._lock:
            self._recent.extend(changes)
            while len(self._recent) > self._keep:
                self._floor = max(self._floor, self._recent.popleft().revision)
            self._latest = max([self._latest, *(c.revision for c in changes)])
            subscribers = list(self._subscribers)
        for loop, queue in subscribers:
            for change in changes:
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, change)
                except RuntimeError:  # that watcher's loop is closed: it is gone
                    pass

    def subscribe(self) -> tuple[asyncio.AbstractEventLoop, asyncio.Queue[Change]]:
        entry = (asyncio.get_running_loop(), asyncio.Queue[Change]())
        with self._lock:
            self._subscribers.add(entry)
        return entry

    def unsubscribe(self, entry: tuple[asyncio.AbstractEventLoop, asyncio.Queue[Change]]) -> None:
        with self._lock:
            self._subscribers.discard(entry)

    @property
    def latest_revision(self) -> int:
        with self._lock:
            return self._latest

    def since(self, revision: int) -> list[Change] | None:
        """The changes after ``revision`` if every one of them is still held,
        else None (the caller then needs a fresh snapshot). A revision newer
        than anything this process has seen also gets None: it comes from
        another history (a restored or different database)."""
        with self._lock:
            if revision < self._floor or revision > self._latest:
                return None
            return [c for c in self._recent if c.revision > revision]
