"""Persistence of the registry with SQLAlchemy 2: tables, the engine, and the
migrations that create them. SQLite is the embedded default; PostgreSQL
(psycopg 3) is selected by URL."""
from __future__ import annotations

import pathlib
from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    create_engine,
    event,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

MIGRATIONS_DIR = pathlib.Path(__file__).parent / "migrations"
# pg_advisory_xact_lock key held while migrating (an arbitrary constant: "berthreg").
MIGRATION_LOCK_KEY = 0x62657274_68726567


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class ProjectRow(Base):
    __tablename__ = "projects"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(40), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ApiKeyRow(Base):
    __tablename__ = "api_keys"
    # Names are unique per project among active keys (partial unique index
    # uq_api_key_active_name, migration 0002).
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), index=True)
    name: Mapped[str] = mapped_column(String(40))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class EnvironmentRow(Base):
    __tablename__ = "environments"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), index=True)
    name: Mapped[str] = mapped_column(String(40))
    protected: Mapped[bool] = mapped_column(Boolean, default=False)
    deployment_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    # The deployment the latest history entry replaced ("" if none).
    previous_deployment_id: Mapped[str] = mapped_column(String(40), default="")
    # Sequence of the latest history entry: the compare-and-swap version.
    sequence: Mapped[int] = mapped_column(Integer, default=0)
    revision: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # The canary (migration 0006): services.registry.canary.Canary.to_json(), or None.
    canary: Mapped[dict | None] = mapped_column(JSON, nullable=True, default=None)


class DeploymentRow(Base):
    __tablename__ = "deployments"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), index=True)
    image: Mapped[str] = mapped_column(String(255))
    image_id: Mapped[str] = mapped_column(String(80), default="")
    config: Mapped[dict] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(20), default="active")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_by: Mapped[str] = mapped_column(String(80))


class BindingRow(Base):
    __tablename__ = "bindings"
    environment_id: Mapped[str] = mapped_column(ForeignKey("environments.id"), primary_key=True)
    deployment_id: Mapped[str] = mapped_column(ForeignKey("deployments.id"), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), index=True)
    min_replicas: Mapped[int] = mapped_column(Integer)
    max_replicas: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(20), default="active")
    revision: Mapped[int] = mapped_column(Integer, default=0)
    # The paused tier in seconds; 0 = the scheduler's default.
    idle_pause_seconds: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    idle_stop_seconds: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class HistoryRow(Base):
    __tablename__ = "history"
    # The primary key makes a duplicated sequence impossible even if two
    # writers slipped past the compare-and-swap.
    environment_id: Mapped[str] = mapped_column(ForeignKey("environments.id"), primary_key=True)
    sequence: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    deployment_id: Mapped[str] = mapped_column(String(40))
    previous_deployment_id: Mapped[str] = mapped_column(String(40), default="")
    min_replicas: Mapped[int] = mapped_column(Integer)
    max_replicas: Mapped[int] = mapped_column(Integer)
    actor: Mapped[str] = mapped_column(String(80))
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class MetaRow(Base):
    """One row holding the registry-wide revision that orders the watch."""

    __tablename__ = "registry_meta"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    revision: Mapped[int] = mapped_column(Integer, default=0)


class ChangeRow(Base):
    """The change feed: one row per watched change, written in the
    transaction that made it (migration 0003). Every registry process tails
    this table, so a watcher on any process sees what any process committed;
    it is also the replay log for ``since_revision`` (bounded: the oldest
    revisions are pruned)."""

    __tablename__ = "changes"
    revision: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    # Order of the change within its transaction's revision.
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Index ix_changes_project_id_revision: a project's watch replays its rows.
    project_id: Mapped[str] = mapped_column(String(40))
    kind: Mapped[str] = mapped_column(String(30))  # services.registry.changes.Change.kind
    action: Mapped[str] = mapped_column(String(20), default="")
    payload: Mapped[bytes] = mapped_column(LargeBinary)  # a serialized proto
    detail: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # a serialized proto
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ExperimentRunRow(Base):
    """One run of an experiment against a deployment (migration 0004);
    immutable once recorded."""

    __tablename__ = "experiment_runs"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"))
    name: Mapped[str] = mapped_column(String(40))
    deployment_id: Mapped[str] = mapped_column(ForeignKey("deployments.id"))
    dataset_digest: Mapped[str] = mapped_column(String(80))
    total: Mapped[int] = mapped_column(Integer)
    passed: Mapped[int] = mapped_column(Integer)
    pass_rate: Mapped[float] = mapped_column(Float)
    latency_p50_ms: Mapped[float] = mapped_column(Float)
    latency_p99_ms: Mapped[float] = mapped_column(Float)
    # [{"name", "passed", "status", "latency_ms", "reason"}, ...] in dataset order
    cases: Mapped[list] = mapped_column(JSON)
    actor: Mapped[str] = mapped_column(String(80))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class EnvironmentGateRow(Base):
    """An environment's gate (migration 0004): promotions into it need a
    passing run of ``experiment`` on ``dataset_digest``."""

    __tablename__ = "environment_gates"
    environment_id: Mapped[str] = mapped_column(ForeignKey("environments.id"), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"))
    experiment: Mapped[str] = mapped_column(String(40))
    threshold: Mapped[float] = mapped_column(Float)
    dataset_digest: Mapped[str] = mapped_column(String(80))
    actor: Mapped[str] = mapped_column(String(80))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


def normalise_url(url: str) -> str:
    # "postgresql://" means psycopg 3 here, not psycopg2.
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def make_engine(url: str) -> Engine:
    url = normalise_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def migrate(engine: Engine) -> None:
    """Brings the schema to the latest migration; the schema exists only
    through migrations."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Several registries may start at once on one database: one
            # migrates, the others wait here and then find nothing to do.
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
