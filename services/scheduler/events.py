"""Deployment events (image_pull_error, scheduling_failure, crash_loop,
oom_killed, health_check_failed), folded by (deployment, kind, environment,
replica) with a count and first/last seen, persisted with SQLAlchemy so they
survive restarts: in SQLite under the data directory by default (in memory
when none is given), or in PostgreSQL by URL, shared by a leader and its
standbys so the one that takes over has the events (the lease lives in the
same database, ``lease.py``).

Messages are the engine's own text, and the engine may quote a replica's
environment in them (runc refuses a value holding NUL by printing the whole
``NAME=value``). ``redact`` is the one place secret values are taken out of
such text: the reconciler passes every message through it, with the
binding's resolved values, before it is stored, logged or answered; the
store itself also blanks any quoted environment assignment in a message
about environment variables (``scrub_env_leaks``), which needs no values and
is what the schema migration applies to rows stored before redaction
existed."""
from __future__ import annotations

import json
import os
import pathlib
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum

from sqlalchemy import (
    DateTime,
    Engine,
    Integer,
    String,
    Text,
    UniqueConstraint,
    and_,
    create_engine,
    or_,
    select,
    text,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.pool import StaticPool


class EventKind(str, Enum):
    IMAGE_PULL_ERROR = "image_pull_error"
    SCHEDULING_FAILURE = "scheduling_failure"
    CRASH_LOOP = "crash_loop"
    OOM_KILLED = "oom_killed"
    HEALTH_CHECK_FAILED = "health_check_failed"
    NODE_DOWN = "node_down"  # a cluster node went down with replicas on it (swarm runtime)
    CANARY_ABORTED = "canary_aborted"  # the canary controller set a failing candidate to weight 0 (canary.py)


@dataclass(frozen=True)
class Event:
    kind: str
    message: str
    project_id: str
    deployment_id: str
    environment_id: str
    environment: str
    replica: str
    count: int
    first_seen: datetime
    last_seen: datetime


class _Base(DeclarativeBase):
    pass


class _EventRow(_Base):
    __tablename__ = "deployment_events"
    __table_args__ = (UniqueConstraint("deployment_id", "kind", "environment_id", "replica"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[str] = mapped_column(String(64), index=True)
    deployment_id: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    environment_id: Mapped[str] = mapped_column(String(64))
    environment: Mapped[str] = mapped_column(String(128))
    replica: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text)
    count: Mapped[int] = mapped_column(Integer)
    first_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True))


metadata = _Base.metadata
MIGRATIONS_DIR = pathlib.Path(__file__).parent / "migrations"
VERSION_TABLE = "alembic_version_events"
MAX_MESSAGE = 2000


REDACTED = "[redacted]"
# Values shorter than this are not searched for (redacting every "a" or "on"
# would make messages useless); the pattern rule below still blanks them
# where the engine quotes an environment assignment.
MIN_REDACTED_LENGTH = 4
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_GO_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t",
               "\v": "\\v", '"': '\\"', "\\": "\\\\"}
# An environment assignment as the engine quotes it (Go %q: "NAME=value"
# with backslash escapes), or bare (NAME=value up to a space or quote).
_QUOTED_ASSIGNMENT = re.compile(r'"([A-Za-z_][A-Za-z0-9_]*)=(?:[^"\\]|\\.)*"')
_BARE_ASSIGNMENT = re.compile(r'(?<![\w"])([A-Za-z_][A-Za-z0-9_]*)=(?!\[redacted\])[^\s"]+')
_MENTIONS_ENVIRONMENT = re.compile(r"environment variable|\benv(iron)?\b", re.IGNORECASE)


def go_quoted(value: str) -> str:
    """``value`` as Go's ``strconv.Quote`` prints it, without the outer
    quotes: how runc and the Docker engine echo an environment entry."""
    out = []
    for ch in value:
        if ch in _GO_ESCAPES:
            out.append(_GO_ESCAPES[ch])
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        elif 0xD800 <= ord(ch) <= 0xDFFF:
            out.append("\\ufffd")  # Go prints an invalid rune as U+FFFD
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return "".join(out)


def secret_forms(value: str) -> set[str]:
    """Every form in which an engine message may carry ``value``: as is,
    escaped the way Go (once or twice, when an error wraps a quoted error),
    JSON and Python print it, and the pieces between control characters
    (NUL, newlines) where a message was cut at one. Empty for a value
    shorter than ``MIN_REDACTED_LENGTH``."""
    if len(value) < MIN_REDACTED_LENGTH:
        return set()
    once = go_quoted(value)
    forms = {
        value,
        once,
        go_quoted(once),
        json.dumps(value)[1:-1],
        json.dumps(value, ensure_ascii=False)[1:-1],
        repr(value)[1:-1],
    }
    forms.update(p for p in _CONTROL.split(value) if len(p) >= MIN_REDACTED_LENGTH)
    return {f for f in forms if f}


def scrub_env_leaks(message: str) -> str:
    """Blanks the values of environment assignments quoted in a message
    about environment variables (``environment variable value can't contain
    null(\\x00): "NAME=value"``). Needs no secret values, so it also
    cleans messages recorded before their values were known or after the
    secret was deleted. Messages that do not mention the environment are
    returned unchanged."""
    if "=" not in message or not _MENTIONS_ENVIRONMENT.search(message):
        return message
    message = _QUOTED_ASSIGNMENT.sub(lambda m: f'"{m.group(1)}={REDACTED}"', message)
    return _BARE_ASSIGNMENT.sub(lambda m: f"{m.group(1)}={REDACTED}", message)


def redact(message: str, secret_values: Iterable[str]) -> str:
    """``message`` with every form of every secret value (``secret_forms``)
    and every quoted environment assignment (``scrub_env_leaks``) replaced by
    ``[redacted]``, cut to ``MAX_MESSAGE``. The one place engine text is
    cleaned before anything stores, logs or answers it."""
    forms: set[str] = set()
    for value in secret_values:
        forms |= secret_forms(value)
    for form in sorted(forms, key=len, reverse=True):  # longest first: a piece never splits a whole value
        message = message.replace(form, REDACTED)
    return scrub_env_leaks(message)[:MAX_MESSAGE]


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def migrate(engine: Engine) -> None:
    """Brings the event store's schema to the latest migration (Alembic,
    ``migrations/``): the table itself, then e.g. scrubbing messages stored
    before engine text was redacted."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            # Schedulers starting together on one database migrate one at a
            # time (without the short deadlines of the lease's statements).
            connection.execute(text("SET LOCAL lock_timeout = 0"))
            connection.execute(text("SET LOCAL statement_timeout = 0"))
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


_MIGRATION_LOCK = 0x62657274_6576  # "bert" "ev": the event store's migration lock


def normalise_url(url: str) -> str:
    """``postgresql://`` means psycopg 3 here, not psycopg2."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def make_engine(url: str) -> Engine:
    """An engine for the store at ``url`` (SQLite file or PostgreSQL). On
    PostgreSQL connections and statements have short deadlines: a lease
    renewal must fail fast rather than hang past its deadline."""
    url = normalise_url(url)
    if url.startswith("sqlite"):
        return create_engine(url, connect_args={"timeout": 5})
    return create_engine(
        url, pool_pre_ping=True, pool_size=5, max_overflow=5, pool_timeout=5,
        # A cut connection fails within seconds instead of hanging on TCP's
        # own timeouts (keepalives; unacknowledged data for 5 s); and the
        # server ends the session of a scheduler cut off inside a
        # transaction after 3 s, so the row locks it held (the lease row,
        # mid-renewal) do not keep a standby from taking over.
        connect_args={"connect_timeout": 3, "keepalives": 1,
                      "options": "-c statement_timeout=3000 -c lock_timeout=1000 "
                                 "-c idle_in_transaction_session_timeout=3000",
                      "keepalives_idle": 2, "keepalives_interval": 1, "keepalives_count": 3,
                      "tcp_user_timeout": 5000},
    )


class EventStore:
    """Small and synchronous: SQLite writes take well under a millisecond and
    happen only on failures."""

    def __init__(self, data_dir: str | None = None, *, url: str | None = None) -> None:
        if url:
            self._engine = make_engine(url)
        elif data_dir:
            os.makedirs(data_dir, exist_ok=True)
            self._engine = make_engine(f"sqlite:///{os.path.join(data_dir, 'scheduler-events.db')}")
        else:
            self._engine = create_engine(
                "sqlite://", connect_args={"check_same_thread": False}, poolclass=StaticPool
            )
        migrate(self._engine)
        self._lock = threading.Lock()

    def record(
        self,
        kind: EventKind,
        *,
        message: str,
        project_id: str,
        deployment_id: str,
        environment_id: str,
        environment: str,
        replica: str = "",
        at: datetime | None = None,
    ) -> None:
        now = at or datetime.now(UTC)
        message = scrub_env_leaks(message)[:MAX_MESSAGE]  # callers ``redact``; this needs no values
        for attempt in range(3):
            try:
                self._record(kind, message, project_id, deployment_id, environment_id, environment, replica, now)
                return
            except IntegrityError:
                # Another scheduler on the shared database inserted the same
                # row first (a leader and the one it replaced): fold into it.
                if attempt == 2:
                    raise

    @property
    def engine(self) -> Engine:
        return self._engine

    def _record(
        self, kind: EventKind, message: str, project_id: str, deployment_id: str, environment_id: str,
        environment: str, replica: str, now: datetime,
    ) -> None:
        with self._lock, Session(self._engine) as session, session.begin():
            row = session.scalars(
                select(_EventRow).where(
                    _EventRow.deployment_id == deployment_id,
                    _EventRow.kind == kind.value,
                    _EventRow.environment_id == environment_id,
                    _EventRow.replica == replica,
                )
            ).one_or_none()
            if row is None:
                session.add(
                    _EventRow(
                        project_id=project_id,
                        deployment_id=deployment_id,
                        kind=kind.value,
                        environment_id=environment_id,
                        environment=environment,
                        replica=replica,
                        message=message,
                        count=1,
                        first_seen=now,
                        last_seen=now,
                    )
                )
            else:
                row.count = _EventRow.count + 1  # in the database: no increment lost to another scheduler
                row.last_seen = now
                row.message = message

    def list(self, deployment_id: str) -> list[Event]:
        return [event for event, _ in self.page(deployment_id)]

    def page(
        self, deployment_id: str, *, after: tuple[str, int] | None = None, limit: int | None = None
    ) -> Sequence[tuple[Event, tuple[str, int]]]:
        """A deployment's events, most recently seen first (then by id), each
        with its keyset key; ``after`` a key, at most ``limit`` of them."""
        with Session(self._engine) as session:
            query = select(_EventRow).where(_EventRow.deployment_id == deployment_id)
            if after is not None:
                last_seen = datetime.fromisoformat(after[0])
                query = query.where(
                    or_(_EventRow.last_seen < last_seen, and_(_EventRow.last_seen == last_seen, _EventRow.id > after[1]))
                )
            query = query.order_by(_EventRow.last_seen.desc(), _EventRow.id)
            if limit is not None:
                query = query.limit(limit)
            rows = session.scalars(query).all()
            return [
                (Event(
                    kind=r.kind,
                    message=r.message,
                    project_id=r.project_id,
                    deployment_id=r.deployment_id,
                    environment_id=r.environment_id,
                    environment=r.environment,
                    replica=r.replica,
                    count=r.count,
                    first_seen=_utc(r.first_seen),
                    last_seen=_utc(r.last_seen),
                ), (r.last_seen.isoformat(), r.id))
                for r in rows
            ]

    def project_of(self, deployment_id: str) -> str | None:
        with Session(self._engine) as session:
            return session.scalars(
                select(_EventRow.project_id).where(_EventRow.deployment_id == deployment_id).limit(1)
            ).first()

    def close(self) -> None:
        self._engine.dispose()
