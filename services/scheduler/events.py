"""Deployment events (image_pull_error, scheduling_failure, crash_loop,
oom_killed, health_check_failed), folded by (deployment, kind, environment,
replica) with a count and first/last seen, persisted with SQLAlchemy in
SQLite so they survive restarts (in memory when no data directory is given).

Messages are the engine's own text; callers scrub secret values before
recording (``scrub``)."""
from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum

from sqlalchemy import DateTime, Integer, String, Text, UniqueConstraint, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.pool import StaticPool


class EventKind(str, Enum):
    IMAGE_PULL_ERROR = "image_pull_error"
    SCHEDULING_FAILURE = "scheduling_failure"
    CRASH_LOOP = "crash_loop"
    OOM_KILLED = "oom_killed"
    HEALTH_CHECK_FAILED = "health_check_failed"


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


MAX_MESSAGE = 2000


def scrub(message: str, secret_values: Iterable[str]) -> str:
    """Replaces any secret value that an engine message might echo."""
    for value in sorted({v for v in secret_values if len(v) >= 4}, key=len, reverse=True):
        message = message.replace(value, "***")
    return message[:MAX_MESSAGE]


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class EventStore:
    """Small and synchronous: SQLite writes take well under a millisecond and
    happen only on failures."""

    def __init__(self, data_dir: str | None = None) -> None:
        if data_dir:
            os.makedirs(data_dir, exist_ok=True)
            url = f"sqlite:///{os.path.join(data_dir, 'scheduler-events.db')}"
            self._engine = create_engine(url)
        else:
            self._engine = create_engine(
                "sqlite://", connect_args={"check_same_thread": False}, poolclass=StaticPool
            )
        _Base.metadata.create_all(self._engine)
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
                        message=message[:MAX_MESSAGE],
                        count=1,
                        first_seen=now,
                        last_seen=now,
                    )
                )
            else:
                row.count += 1
                row.last_seen = now
                row.message = message[:MAX_MESSAGE]

    def list(self, deployment_id: str) -> list[Event]:
        with Session(self._engine) as session:
            rows = session.scalars(
                select(_EventRow).where(_EventRow.deployment_id == deployment_id).order_by(_EventRow.last_seen.desc())
            ).all()
            return [
                Event(
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
                )
                for r in rows
            ]

    def project_of(self, deployment_id: str) -> str | None:
        with Session(self._engine) as session:
            return session.scalars(
                select(_EventRow.project_id).where(_EventRow.deployment_id == deployment_id).limit(1)
            ).first()

    def close(self) -> None:
        self._engine.dispose()
