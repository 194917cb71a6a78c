"""Replica logs (issue 16): what the replicas of a deployment printed, merged
in time order, and the tails kept of replicas that are gone.

- ``DeploymentLogs.read``: lists the deployment's containers by label (the
  engine is the truth), reads each one's stdout and stderr through the
  adapter (``docker_adapter.ContainerLog``, one blocking reader per stream in
  its own thread), merges them by time with the kept tails of removed
  replicas, and keeps the last ``tail`` lines. With ``follow`` it then keeps
  reading: every ``RESCAN`` seconds it lists the containers again, so a
  replica created later (scale-up, the replacement of a crashed one) joins;
  a replica that exited and was removed between two listings comes in
  through its kept tail. Followed lines wait ``REORDER`` seconds so lines of
  different replicas leave in time order; a replica found by a later listing
  may bring lines older than ones already sent: they are sent at once (each
  replica's own lines stay in order), never dropped.
- Bounds: each reader is rate-limited per stream (``RATE_LINES`` lines and
  ``RATE_BYTES`` bytes a second, with a burst); lines over the rate are
  dropped and one marker line counts them. Readers hand batches to a
  bounded queue and wait when it is full (the engine keeps the log, Berth
  does not), lines are cut at 8 KiB, a backlog holds at most ``MAX_TAIL``
  lines and ``MAX_BACKLOG_BYTES``, and the scheduler runs at most
  ``MAX_READERS`` follow readers at once (RESOURCE_EXHAUSTED beyond).
- ``CrashTails``: the adapter calls ``keep`` for every container right
  before removing it; the last ``TAIL_LINES`` lines of each stream (at most
  ``TAIL_BYTES`` in all: the crash reason is often the last stderr line)
  are stored as JSON under ``<data dir>/crash-tails`` (in memory without a
  data dir), at most ``MAX_TAILS`` files and ``TAIL_AGE`` seconds old, with
  the replica's secret values redacted (``events.redact``).
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from berth import errors

from . import docker_adapter as da
from .desired import DesiredTable
from .events import redact

log = logging.getLogger("berth.scheduler.logs")

MAX_TAIL = 10000
MAX_BACKLOG_BYTES = 8 * 1024 * 1024
RATE_LINES = 500.0  # per second and stream of a replica
RATE_BYTES = 512 * 1024.0
BURST = 2.0  # seconds of rate a stream may print at once
MAX_READERS = 64
RESCAN = 1.0
REORDER = 0.5  # seconds a followed line waits for earlier lines of other replicas
BATCH = 256
QUEUE_BATCHES = 32
TAIL_LINES = 200
TAIL_BYTES = 64 * 1024
MAX_TAILS = 500
TAIL_AGE = 24 * 3600.0
STREAMS = ("stdout", "stderr")
_LIVE = frozenset({"running", "paused", "restarting"})  # engine states whose log may still grow
# Environment names every replica has that are not secrets (spec.resolve).
_PLATFORM_ENV = frozenset({"PORT", "BERTH_PROJECT", "BERTH_ENVIRONMENT", "BERTH_DEPLOYMENT_ID", "PATH", "HOME",
                           "HOSTNAME"})


@dataclass(frozen=True, order=True)
class LogEntry:
    time: datetime
    replica_id: str
    stream: str  # stdout | stderr
    text: str
    replica_index: int = 0
    environment_id: str = ""
    dropped: int = 0
    archived: bool = False


@dataclass(frozen=True)
class LogQuery:
    deployment_id: str
    environment_ids: frozenset[str]  # the deployment's bindings asked for
    replica: str = ""  # container id (prefix), name or index; "" for all
    since: datetime | None = None
    tail: int | None = None
    follow: bool = False


@dataclass(frozen=True)
class _Replica:
    id: str
    name: str
    index: int
    environment_id: str

    def matches(self, wanted: str) -> bool:
        if not wanted:
            return True
        if wanted.isdigit():
            return self.index == int(wanted)
        return wanted == self.name or (len(wanted) >= 4 and self.id.startswith(wanted))


def _replica_of(c: da.ContainerInfo) -> _Replica | None:
    try:
        index = int(c.labels.get(da.REPLICA_LABEL, ""))
    except ValueError:
        return None
    env = c.labels.get(da.ENVIRONMENT_LABEL, "")
    return _Replica(c.id, c.name, index, env) if env else None


class RateLimit:
    """Token buckets on lines and bytes; ``take`` says whether a line may
    pass now (pure but for the clock passed in)."""

    def __init__(self, lines: float = RATE_LINES, nbytes: float = RATE_BYTES, burst: float = BURST) -> None:
        self._rates = (lines, nbytes)
        self._caps = (lines * burst, nbytes * burst)
        self._tokens = list(self._caps)
        self._at: float | None = None

    def take(self, size: int, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        elapsed, self._at = (0.0 if self._at is None else max(now - self._at, 0.0)), now
        for i in (0, 1):
            self._tokens[i] = min(self._caps[i], self._tokens[i] + elapsed * self._rates[i])
        if self._tokens[0] < 1 or self._tokens[1] < size:
            return False
        self._tokens[0] -= 1
        self._tokens[1] -= size
        return True


def dropped_marker(template: LogEntry, count: int) -> LogEntry:
    return LogEntry(
        time=template.time, replica_id=template.replica_id, stream=template.stream,
        text=f"[berth: {count} lines dropped: this replica printed faster than the log rate limit]",
        replica_index=template.replica_index, environment_id=template.environment_id, dropped=count,
    )


def _last(entries: Iterable[LogEntry], tail: int | None) -> list[LogEntry]:
    """The last ``tail`` entries in time order (at most ``MAX_TAIL`` and
    ``MAX_BACKLOG_BYTES``)."""
    ordered = sorted(entries, key=lambda e: (e.time, e.replica_id, e.stream))
    limit = MAX_TAIL if tail is None else min(tail, MAX_TAIL)
    kept = ordered[max(len(ordered) - limit, 0):] if limit else []
    size, start = 0, len(kept)
    while start > 0 and size + len(kept[start - 1].text) <= MAX_BACKLOG_BYTES:
        start -= 1
        size += len(kept[start].text)
    return kept[start:]


# -- crash tails -------------------------------------------------------------
class CrashTails:
    """The last lines of removed replicas, bounded, on disk when a directory
    is given. Safe to call from any thread."""

    def __init__(self, adapter: da.DockerAdapter, table: DesiredTable, directory: str | None) -> None:
        self._adapter = adapter
        self._table = table
        self._dir = os.path.join(directory, "crash-tails") if directory else None
        self._memory: dict[str, dict[str, object]] = {}
        self._lock = threading.Lock()
        self._listeners: set[Callable[[], None]] = set()
        if self._dir:
            os.makedirs(self._dir, exist_ok=True)

    def on_new(self, listener: Callable[[], None]) -> Callable[[], None]:
        self._listeners.add(listener)
        return lambda: self._listeners.discard(listener)

    def keep(self, container_id: str) -> None:
        """Blocking (the adapter's thread, before removing the container)."""
        try:
            info, env = self._adapter.inspect_with_environment(container_id)
        except da.EngineError:
            return
        replica = _replica_of(info)
        deployment = info.labels.get(da.DEPLOYMENT_LABEL, "")
        if replica is None or not deployment:
            return
        entries: list[LogEntry] = []
        for stream in STREAMS:
            # (the engine's tail counts the lines of both streams before it
            # picks one: ask for twice as many, keep this stream's last ones)
            mine: deque[LogEntry] = deque(maxlen=TAIL_LINES)
            try:
                for when, text in self._adapter.open_log(container_id, stream, since=None, tail=2 * TAIL_LINES,
                                                         follow=False):
                    mine.append(LogEntry(when, container_id, stream, text, replica.index, replica.environment_id))
            except da.EngineError:
                continue
            entries.extend(mine)
        if not entries:
            return
        secrets = self._secret_values(replica.environment_id, deployment, env)
        lines, size = [], 0
        for e in reversed(_last(entries, 2 * TAIL_LINES)):
            text = redact(e.text, secrets)
            if size + len(text) > TAIL_BYTES:
                break
            size += len(text)
            lines.append([e.time.isoformat(), e.stream, text])
        lines.reverse()
        record: dict[str, object] = {
            "container_id": container_id, "name": info.name, "index": replica.index,
            "environment_id": replica.environment_id, "deployment_id": deployment,
            "project_id": info.labels.get(da.PROJECT_LABEL, ""), "exit_code": info.exit_code,
            "stored_at": time.time(), "lines": lines,
        }
        self._store(deployment, container_id, record)
        for listener in list(self._listeners):
            listener()

    def _secret_values(self, environment_id: str, deployment_id: str, env: dict[str, str]) -> set[str]:
        """Every value of the replica's environment that is not the
        deployment's own (non-secret) variables or the platform's: the secrets
        (more when the binding is no longer known: redacting too much is safe)."""
        binding = self._table.get((environment_id, deployment_id))
        plain = set(binding.deployment.config.variables) if binding is not None else set()
        return {v for k, v in env.items() if k not in plain and k not in _PLATFORM_ENV}

    def _store(self, deployment_id: str, container_id: str, record: dict[str, object]) -> None:
        with self._lock:
            if self._dir is None:
                self._memory[container_id] = record
                for old in sorted(self._memory, key=lambda k: float(self._memory[k]["stored_at"]))[:-MAX_TAILS or None]:  # type: ignore[arg-type]
                    del self._memory[old]
                return
            # <deployment>--<container>.json: a reader opens its deployment's files only
            path = os.path.join(self._dir, f"{deployment_id}--{container_id}.json")
            tmp = f"{path}.tmp"
            with open(tmp, "w") as f:
                json.dump(record, f)
            os.replace(tmp, path)
            self._prune()

    def _prune(self) -> None:
        assert self._dir is not None
        files = []
        for name in os.listdir(self._dir):
            full = os.path.join(self._dir, name)
            try:
                files.append((os.stat(full).st_mtime, full))
            except FileNotFoundError:
                continue
        files.sort()
        cutoff = time.time() - TAIL_AGE
        for i, (mtime, full) in enumerate(files):
            if mtime < cutoff or i < len(files) - MAX_TAILS:
                try:
                    os.remove(full)
                except FileNotFoundError:
                    pass

    def records(self, deployment_id: str) -> list[dict[str, object]]:
        """The kept tails of a deployment's replicas (blocking: reads files)."""
        with self._lock:
            if self._dir is None:
                found = [r for r in self._memory.values() if r["deployment_id"] == deployment_id]
            else:
                found = []
                cutoff = time.time() - TAIL_AGE
                for name in os.listdir(self._dir):
                    if not (name.startswith(f"{deployment_id}--") and name.endswith(".json")):
                        continue
                    try:
                        with open(os.path.join(self._dir, name)) as f:
                            record = json.load(f)
                    except (OSError, ValueError):
                        continue
                    if record.get("deployment_id") == deployment_id and record.get("stored_at", 0) >= cutoff:
                        found.append(record)
        return found


def _archived_entries(record: dict[str, object]) -> list[LogEntry]:
    out = []
    for when, stream, text in record["lines"]:  # type: ignore[attr-defined]
        out.append(LogEntry(
            datetime.fromisoformat(when), str(record["container_id"]), stream, text,
            int(record["index"]), str(record["environment_id"]), archived=True,  # type: ignore[call-overload]
        ))
    return out


# -- reading -----------------------------------------------------------------
@dataclass
class _Reader:
    replica: _Replica
    stream: str
    log: da.ContainerLog | None = None
    thread: threading.Thread | None = None
    done: bool = False


class DeploymentLogs:
    """Reads the logs of a deployment's replicas (the local runtime)."""

    def __init__(self, adapter: da.DockerAdapter, instance: str, tails: CrashTails) -> None:
        self._adapter = adapter
        self._instance = instance
        self.tails = tails
        self._readers = 0
        self._readers_lock = threading.Lock()

    @property
    def following(self) -> int:
        """Follow readers running now (at most ``MAX_READERS``)."""
        return self._readers

    async def _replicas(self, query: LogQuery) -> list[tuple[_Replica, da.ContainerInfo]]:
        try:
            listed = await self._adapter.list_managed(self._instance, {da.DEPLOYMENT_LABEL: query.deployment_id})
        except da.EngineUnavailable as exc:
            raise errors.Unavailable(
                f"the scheduler cannot reach its Docker engine, so the logs cannot be read: {exc.message}",
                hint="check that the Docker engine is running; the call can be retried",
            ) from None
        out = []
        for c in listed:
            r = _replica_of(c)
            if r is not None and r.environment_id in query.environment_ids and r.matches(query.replica):
                out.append((r, c))
        return out

    async def _archived(self, query: LogQuery, skip: set[str]) -> dict[str, list[LogEntry]]:
        records = await asyncio.to_thread(self.tails.records, query.deployment_id)
        out: dict[str, list[LogEntry]] = {}
        for record in records:
            cid = str(record["container_id"])
            replica = _Replica(cid, str(record["name"]), int(record["index"]),  # type: ignore[call-overload]
                               str(record["environment_id"]))
            if cid in skip or replica.environment_id not in query.environment_ids or not replica.matches(query.replica):
                continue
            out[cid] = [e for e in _archived_entries(record) if query.since is None or e.time >= query.since]
        return out

    async def check_replica(self, query: LogQuery, max_index: int) -> None:
        """NOT_FOUND when ``query.replica`` names no replica (an index names
        one when below the bindings' max_replicas: it may start later)."""
        if not query.replica or (query.replica.isdigit() and int(query.replica) < max(max_index, 1)):
            return
        if await self._replicas(query) or await self._archived(query, set()):
            return
        raise errors.NotFound(
            f"deployment {query.deployment_id} has no replica {query.replica!r}",
            hint="name a replica by its id (as `berth deployment status` shows it), container name or index",
            resource_type="replica", resource_name=query.replica,
        )

    def _read_backlog(self, replica: _Replica, stream: str, query: LogQuery) -> list[LogEntry]:
        """Blocking: the backlog of one stream, rate-limits aside (it is
        bounded by the tail)."""
        tail = MAX_TAIL if query.tail is None else min(query.tail, MAX_TAIL)
        if tail == 0:
            return []
        out: deque[LogEntry] = deque(maxlen=tail)
        try:
            for when, text in self._adapter.open_log(replica.id, stream, since=query.since, tail=tail, follow=False):
                out.append(LogEntry(when, replica.id, stream, text, replica.index, replica.environment_id))
        except da.ContainerGone:
            return []
        except da.EngineError as exc:
            log.warning("log_read_failed", extra={"container": replica.name, "error": exc.message})
        return list(out)

    async def read(self, query: LogQuery) -> AsyncGenerator[LogEntry, None]:
        """The lines ``query`` asks for; with ``follow``, until cancelled."""
        started_at = datetime.now(UTC)
        present = await self._replicas(query)
        backlogs = await asyncio.gather(*(
            asyncio.to_thread(self._read_backlog, r, stream, query) for r, _ in present for stream in STREAMS
        ))
        archived = await self._archived(query, {r.id for r, _ in present})
        entries = [e for chunk in backlogs for e in chunk] + [e for chunk in archived.values() for e in chunk]
        for entry in _last(entries, query.tail):
            yield entry
        if not query.follow:
            return
        # Each stream's follow starts where its backlog ended (the lines at
        # that very time already sent are skipped); a stream without backlog
        # from the start of this call (with a tail: older lines were cut).
        resume: dict[tuple[str, str], tuple[datetime, set[str]]] = {}
        for chunk in backlogs:
            if chunk:
                last = chunk[-1].time
                resume[(chunk[-1].replica_id, chunk[-1].stream)] = (last, {e.text for e in chunk if e.time == last})
        default_since = started_at if query.tail is not None else query.since
        async for entry in self._follow(query, present, set(archived), resume, default_since):
            yield entry

    async def _follow(
        self,
        query: LogQuery,
        present: Sequence[tuple[_Replica, da.ContainerInfo]],
        archived_seen: set[str],
        resume: dict[tuple[str, str], tuple[datetime, set[str]]],
        default_since: datetime | None,
    ) -> AsyncIterator[LogEntry]:
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()

        def wake_up() -> None:
            loop.call_soon_threadsafe(wake.set)

        inbox = _Inbox(wake_up)
        readers: list[_Reader] = []
        # (a container created but not started yet is read once it runs)
        known: set[str] = {r.id for r, info in present if info.status != "created"} | archived_seen
        new_tails = [False]  # a crash tail was kept since the last look

        def start(replica: _Replica, follow: bool, since: datetime | None) -> None:
            for stream in STREAMS:
                since_here, seen = resume.get((replica.id, stream), (since, set()))
                reader = _Reader(replica, stream)
                if follow:
                    with self._readers_lock:
                        if self._readers >= MAX_READERS:
                            raise errors.ResourceExhausted(
                                f"the scheduler follows {self._readers} replica log streams already "
                                f"(at most {MAX_READERS})",
                                hint="retry later, or read without --follow",
                            )
                        self._readers += 1
                readers.append(reader)
                reader.thread = threading.Thread(
                    target=self._pump, name=f"log {replica.name} {stream}", daemon=True,
                    args=(reader, since_here, follow, seen, inbox),
                )
                reader.thread.start()

        def tail_kept() -> None:
            new_tails[0] = True
            wake_up()

        unsubscribe = self.tails.on_new(tail_kept)
        heap: list[tuple[datetime, int, LogEntry]] = []
        counter = itertools.count()
        next_scan = time.monotonic() + RESCAN
        try:
            for replica, info in present:
                if info.status in _LIVE:
                    start(replica, True, default_since)
            while True:
                if time.monotonic() >= next_scan:
                    next_scan = time.monotonic() + RESCAN
                    for replica, info in await self._replicas(query):
                        if replica.id in known or info.status == "created":
                            continue  # read already, or not started yet (read once it runs)
                        known.add(replica.id)
                        # Started after the follow began: all of it is new.
                        start(replica, info.status in _LIVE, query.since)
                    kept, new_tails[0] = new_tails[0], False
                    for cid, chunk in ((await self._archived(query, known)) if kept else {}).items():
                        known.add(cid)  # removed before a listing saw it: its kept tail
                        for e in chunk:
                            heapq.heappush(heap, (e.time, next(counter), e))
                for e in inbox.take():
                    heapq.heappush(heap, (e.time, next(counter), e))
                horizon = datetime.now(UTC).timestamp() - REORDER
                while heap and (heap[0][0].timestamp() <= horizon or len(heap) > MAX_TAIL):
                    yield heapq.heappop(heap)[2]
                wait = min(max(next_scan - time.monotonic(), 0.01), REORDER if heap else RESCAN)
                wake.clear()
                if inbox.empty():
                    try:
                        async with asyncio.timeout(wait):
                            await wake.wait()
                    except TimeoutError:
                        pass
        finally:
            unsubscribe()
            inbox.close()
            for reader in readers:
                if reader.log is not None:
                    reader.log.close()

    def _pump(
        self, reader: _Reader, since: datetime | None, follow: bool, seen_at_since: set[str], inbox: _Inbox
    ) -> None:
        """A reader thread: one stream of one container, rate-limited, handed
        to the bounded inbox (waiting while it is full)."""
        replica, stream = reader.replica, reader.stream
        limit = RateLimit()
        dropped = 0
        try:
            try:
                reader.log = self._adapter.open_log(replica.id, stream, since=since, tail=None, follow=follow)
            except da.EngineError:
                return
            if inbox.closed:
                reader.log.close()
                return
            for when, text in reader.log:
                if since is not None and (when < since or (when == since and text in seen_at_since)):
                    continue
                entry = LogEntry(when, replica.id, stream, text, replica.index, replica.environment_id)
                # The rate is measured on the engine's clock (when the line was
                # printed), so a reader catching up on a backlog is not fooled.
                if not limit.take(len(text) + 1, now=when.timestamp()):
                    dropped += 1
                    continue
                if dropped:
                    if not inbox.put(dropped_marker(entry, dropped)):
                        return
                    dropped = 0
                if not inbox.put(entry):
                    return
            if dropped:
                inbox.put(dropped_marker(
                    LogEntry(datetime.now(UTC), replica.id, stream, "", replica.index, replica.environment_id),
                    dropped,
                ))
        finally:
            reader.done = True
            if follow:
                with self._readers_lock:
                    self._readers -= 1


class _Inbox:
    """Where a follow's reader threads put lines: bounded in lines and bytes;
    a reader waits while it is full (the engine keeps the rest of the log)."""

    MAX_LINES = BATCH * QUEUE_BATCHES
    MAX_BYTES = 4 * 1024 * 1024

    def __init__(self, notify: Callable[[], None]) -> None:
        self._notify = notify
        self._cond = threading.Condition()
        self._items: list[LogEntry] = []
        self._bytes = 0
        self.closed = False

    def put(self, entry: LogEntry) -> bool:
        """False once the follow ended (the reader stops)."""
        with self._cond:
            while not self.closed and (len(self._items) >= self.MAX_LINES or self._bytes >= self.MAX_BYTES):
                self._cond.wait(0.5)
            if self.closed:
                return False
            was_empty = not self._items
            self._items.append(entry)
            self._bytes += len(entry.text)
        if was_empty:
            try:
                self._notify()
            except RuntimeError:  # the event loop is closed
                return False
        return True

    def take(self) -> list[LogEntry]:
        with self._cond:
            items, self._items, self._bytes = self._items, [], 0
            self._cond.notify_all()
        return items

    def empty(self) -> bool:
        with self._cond:
            return not self._items

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()
