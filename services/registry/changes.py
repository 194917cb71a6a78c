"""The registry's change feed: committed changes, ordered by revision, from
the database to every watcher of every registry process.

How a change travels:

1. A write transaction (``RegistryService._write``) claims the next registry
   revision (a row lock on ``registry_meta``, so revisions are handed out in
   commit order across processes), inserts one ``changes`` row per watched
   change (``ChangeLog.rows``) and, on PostgreSQL, queues a ``NOTIFY`` that
   the database delivers when — and only if — the transaction commits.
2. Every registry process runs a ``ChangeFeed``: a dedicated psycopg 3
   connection ``LISTEN``\\ s for that notification (reconnecting with backoff)
   and wakes a tailer, which reads the table after the last revision it
   published and hands the rows, in order, to this process's ``ChangeHub``.
   The committing process wakes its own tailer directly; a slow timer wakes
   it too, as a safety net against a lost notification (never a tight poll).
   On SQLite (one process per database file) only the direct wake and the
   timer exist.
3. The hub fans the changes out to this process's watch streams.

A watch stream subscribes to the hub *before* it reads its replay or
snapshot, and skips queued changes at or below the revision that read
covered, so no change falls in between and none is sent twice.

The table is the replay log for ``since_revision``: a watcher resumes on any
registry process from the revision it last saw. It keeps the newest
``RETAINED_REVISIONS`` revisions; a watcher asking for an older one (or for
one newer than the database has issued) gets a full snapshot instead.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import logging
import os
import pathlib
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO, Any

from sqlalchemy import delete, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from berth.v1 import common_pb2
from services.registry.storage import ChangeRow, MetaRow, utcnow

log = logging.getLogger("berth.registry")

RETAINED_REVISIONS = 50_000  # in the table: how far back a watcher can resume
NOTIFY_CHANNEL = "berth_registry_changes"
SAFETY_POLL_SECONDS = 5.0  # the tailer reads the table at least this often
PRUNE_EVERY_SECONDS = 60.0
TAIL_BATCH_ROWS = 2_000
TAIL_BATCHES_PER_WAKE = 50  # then yield to the loop and continue on the next wake
LISTEN_BACKOFF_INITIAL = 0.1
LISTEN_BACKOFF_MAX = 5.0
LISTEN_HEALTH_SECONDS = 30.0  # a silent listening connection is checked this often
LISTENER_APPLICATION_NAME = "berth-registry-listener"  # how the LISTEN connection shows in pg_stat_activity

# Change.kind
ENVIRONMENT = "environment"
BINDING = "binding"
ENVIRONMENT_DELETED = "environment_deleted"
KEY_REVOKED = "key_revoked"

# Change.action of an ENVIRONMENT change
CREATED = "created"
MOVED = "moved"


@dataclass(frozen=True)
class Change:
    """One committed change.

    ``payload``: an ``Environment`` (kind ``environment``), a ``Binding``
    (``binding``), the environment id (``environment_deleted``) or the key id
    (``key_revoked``). ``detail``: the ``HistoryEntry`` a move appended
    (``environment`` with action ``moved``), or the ``Environment`` as it was
    (``environment_deleted``)."""

    revision: int
    kind: str
    payload: Any
    project_id: str = ""
    action: str = ""
    detail: Any = None


class ChangeHub:
    """In-process fan-out of the changes this process's tailer read, in
    revision order, to the watch streams of this process. It keeps no log:
    the ``changes`` table is the log."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: set[tuple[asyncio.AbstractEventLoop, asyncio.Queue[Change]]] = set()
        self._commit_listeners: list[Callable[[int], None]] = []

    def publish(self, changes: list[Change]) -> None:
        """Called in revision order (by the one tailer of this process)."""
        with self._lock:
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

    # -- commit notices (the writer -> this process's tailer) ------------

    def on_commit(self, listener: Callable[[int], None]) -> None:
        self._commit_listeners.append(listener)

    def committed(self, revision: int) -> None:
        """A write of this process committed ``revision`` (any thread)."""
        for listener in self._commit_listeners:
            listener(revision)


# ---- the table -----------------------------------------------------------

_PAYLOAD_TYPES: dict[str, type[Any]] = {
    ENVIRONMENT: common_pb2.Environment,
    BINDING: common_pb2.Binding,
    ENVIRONMENT_DELETED: common_pb2.Environment,
}


def to_rows(changes: Iterable[Change]) -> list[ChangeRow]:
    now = utcnow()
    rows = []
    for position, change in enumerate(changes):
        detail: bytes | None = None
        if change.kind == ENVIRONMENT_DELETED:
            payload = change.detail.SerializeToString()
        elif change.kind == KEY_REVOKED:
            payload = str(change.payload).encode()
        else:
            payload = change.payload.SerializeToString()
            if change.detail is not None:
                detail = change.detail.SerializeToString()
        rows.append(ChangeRow(
            revision=change.revision, position=position, project_id=change.project_id, kind=change.kind,
            action=change.action, payload=payload, detail=detail, created_at=now,
        ))
    return rows


def from_rows(rows: Iterable[ChangeRow]) -> list[Change]:
    """Rows of kinds this version does not know (written by a newer
    registry sharing the database) are left out."""
    return [from_row(row) for row in rows if row.kind == KEY_REVOKED or row.kind in _PAYLOAD_TYPES]


def from_row(row: ChangeRow) -> Change:
    if row.kind == KEY_REVOKED:
        return Change(row.revision, row.kind, row.payload.decode(), row.project_id, row.action)
    message = _PAYLOAD_TYPES[row.kind].FromString(row.payload)
    if row.kind == ENVIRONMENT_DELETED:
        return Change(row.revision, row.kind, message.id, row.project_id, row.action, message)
    detail = common_pb2.HistoryEntry.FromString(row.detail) if row.detail is not None else None
    return Change(row.revision, row.kind, message, row.project_id, row.action, detail)


def _ordered(query: Any) -> Any:
    return query.order_by(ChangeRow.revision, ChangeRow.position)


class ChangeLog:
    """Reads of the ``changes`` table (blocking; run them in a thread)."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        bind = sessions.kw.get("bind")
        self._postgres = bind is not None and bind.dialect.name == "postgresql"

    @contextlib.contextmanager
    def _session(self) -> Any:
        with self._sessions() as session:
            if self._postgres:
                # One snapshot for the several SELECTs of a read.
                session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
            yield session

    def after(self, revision: int) -> tuple[list[Change], int]:
        """The next committed changes after ``revision``, whole revisions
        only, at most about ``TAIL_BATCH_ROWS`` rows (more when one revision
        alone has more), and the newest revision read."""
        with self._session() as session:
            rows = session.execute(
                _ordered(select(ChangeRow).where(ChangeRow.revision > revision)).limit(TAIL_BATCH_ROWS)
            ).scalars().all()
            if len(rows) == TAIL_BATCH_ROWS:
                top = rows[-1].revision
                if rows[0].revision == top:
                    rows = session.execute(_ordered(select(ChangeRow).where(ChangeRow.revision == top))).scalars().all()
                else:
                    rows = [row for row in rows if row.revision < top]
            return from_rows(rows), (rows[-1].revision if rows else revision)

    def replay(self, since: int, *, project_id: str | None = None) -> list[Change] | None:
        """Every change after ``since`` (of one project, if given), or None
        when the table no longer holds all of them (pruned) or ``since`` is
        newer than any revision issued (another database's): the caller then
        sends a snapshot."""
        with self._session() as session:
            query = select(ChangeRow).where(ChangeRow.revision > since)
            if project_id is not None:
                query = query.where(ChangeRow.project_id == project_id)
            rows = session.execute(_ordered(query)).scalars().all()
            # Read after the rows: a prune that ran meanwhile raises the
            # floor, so a replay it cut short is refused, never sent short.
            oldest = session.execute(select(func.min(ChangeRow.revision))).scalar_one_or_none()
            current = session.execute(select(MetaRow.revision).where(MetaRow.id == 1)).scalar_one()
        floor = oldest - 1 if oldest is not None else current
        if since < floor or since > current:
            return None
        return from_rows(rows)

    def latest(self) -> int:
        with self._sessions() as session:
            newest = session.execute(select(func.max(ChangeRow.revision))).scalar_one_or_none()
            if newest is not None:
                return int(newest)
            return int(session.execute(select(MetaRow.revision).where(MetaRow.id == 1)).scalar_one())

    def prune(self, keep: int = RETAINED_REVISIONS) -> int:
        """Deletes all but the newest ``keep`` revisions; returns rows deleted."""
        with self._sessions() as session, session.begin():
            newest = session.execute(select(func.max(ChangeRow.revision))).scalar_one_or_none()
            if newest is None or newest <= keep:
                return 0
            result: Any = session.execute(delete(ChangeRow).where(ChangeRow.revision <= newest - keep))
            return int(result.rowcount)


class ChangeFeed:
    """This process's tailer of the ``changes`` table (and, on PostgreSQL,
    its listener for the writers' notifications), publishing to ``hub``."""

    def __init__(
        self, log_: ChangeLog, hub: ChangeHub, *, listen_dsn: str | None,
        poll_seconds: float = SAFETY_POLL_SECONDS, retained: int = RETAINED_REVISIONS,
    ) -> None:
        self._log = log_
        self._hub = hub
        self._dsn = listen_dsn
        self._poll = poll_seconds
        self._retained = retained
        self._revision = 0  # the newest revision published to the hub
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # The tailer's reads get a thread of their own: behind request
        # handlers in the default pool (writers waiting on the revision row's
        # lock, say), they would hold every watcher back.
        self._reader = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="registry-feed")
        hub.on_commit(lambda _revision: self.wake())

    async def start(self, from_revision: int) -> None:
        """Publishes what commits after ``from_revision``."""
        self._loop = asyncio.get_running_loop()
        self._revision = from_revision
        self._tasks.append(asyncio.create_task(self._tail_forever(), name="registry-change-tailer"))
        if self._dsn is not None:
            self._tasks.append(asyncio.create_task(self._listen_forever(), name="registry-change-listener"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        self._reader.shutdown(wait=False)

    def wake(self) -> None:
        """Read the table now (callable from any thread)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._wake.set)
        except RuntimeError:  # the loop closed meanwhile
            pass

    async def catch_up(self) -> int:
        """Publishes every change committed after the last one published, up
        to a bound; returns the newest revision published."""
        for _ in range(TAIL_BATCHES_PER_WAKE):
            changes, newest = await asyncio.get_running_loop().run_in_executor(
                self._reader, self._log.after, self._revision
            )
            if newest == self._revision:
                return self._revision
            if changes:
                self._hub.publish(changes)
            self._revision = newest
        self._wake.set()  # more to read: continue on the next turn
        return self._revision

    async def _tail_forever(self) -> None:
        loop = asyncio.get_running_loop()
        last_prune = loop.time()
        failures = 0
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.catch_up()
                if loop.time() - last_prune >= PRUNE_EVERY_SECONDS:
                    last_prune = loop.time()
                    pruned = await loop.run_in_executor(self._reader, self._log.prune, self._retained)
                    if pruned:
                        log.info("changes_pruned", extra={"rows": pruned})
                failures = 0
            except SQLAlchemyError as exc:
                # The database is away (or refused this read): retry with
                # backoff; a feed that stopped would leave every watcher of
                # this process behind for good.
                failures += 1
                log.warning("change_tail_failed", extra={"error": type(exc).__name__, "failures": failures})
                await asyncio.sleep(min(LISTEN_BACKOFF_INITIAL * 2 ** failures, LISTEN_BACKOFF_MAX))
                self._wake.set()

    async def _listen_forever(self) -> None:
        import psycopg

        assert self._dsn is not None
        backoff = LISTEN_BACKOFF_INITIAL
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._dsn, autocommit=True, connect_timeout=5, application_name=LISTENER_APPLICATION_NAME,
                    keepalives=1, keepalives_idle=10, keepalives_interval=5, keepalives_count=3,
                ) as conn:
                    await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    backoff = LISTEN_BACKOFF_INITIAL
                    self._wake.set()  # whatever committed while nobody listened
                    while True:
                        async for _ in conn.notifies(timeout=LISTEN_HEALTH_SECONDS):
                            self._wake.set()
                        await conn.execute("SELECT 1")  # quiet for a while: is the connection alive?
            except (psycopg.Error, OSError) as exc:
                log.warning("change_listener_lost", extra={"error": str(exc), "retry_in": backoff})
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, LISTEN_BACKOFF_MAX)


# ---- one process per SQLite file ----------------------------------------


class DatabaseInUse(RuntimeError):
    """Another registry process holds this SQLite database."""


class SingleInstanceLock:
    """An exclusive ``flock`` on ``<database>.lock`` next to a SQLite
    database, held for the registry process's life: the change feed of a
    SQLite registry lives in one process, so a second process on the same
    file is refused. (The kernel drops the lock when the holder dies, even by
    SIGKILL.)"""

    def __init__(self, database: pathlib.Path) -> None:
        self.path = database.with_name(database.name + ".lock")
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        file = open(self.path, "a+")  # noqa: SIM115 - held open until release()
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "unknown"
            file.close()
            raise DatabaseInUse(
                f"another registry process (pid {holder}) is using the SQLite database {self.path.with_suffix('')}; "
                "a SQLite registry runs as one process only. Stop that process first, or run several registries "
                "on PostgreSQL (--database-url postgresql://...)"
            ) from None
        file.seek(0)
        file.truncate()
        file.write(str(os.getpid()))
        file.flush()
        self._file = file

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def sqlite_database_path(url: str) -> pathlib.Path | None:
    """The file of a ``sqlite:///path`` URL; None for an in-memory one."""
    if not url.startswith("sqlite:///"):
        return None
    path = url.removeprefix("sqlite:///").split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return pathlib.Path(path).resolve()
