"""Persistence of the secrets service (SQLAlchemy 2; schema by migrations)."""
from __future__ import annotations

import pathlib
from datetime import datetime

from sqlalchemy import Boolean, DateTime, Integer, LargeBinary, String, UniqueConstraint, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

MIGRATIONS_DIR = pathlib.Path(__file__).parent / "migrations"
VERSION_TABLE = "alembic_version_secrets"  # the registry may share the database
# pg_advisory_xact_lock key held while migrating (an arbitrary constant: "berthsec").
MIGRATION_LOCK_KEY = 0x6265727468736563


class Base(DeclarativeBase):
    pass


class DataKeyRow(Base):
    __tablename__ = "secret_data_keys"
    project_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    nonce: Mapped[bytes] = mapped_column(LargeBinary)
    wrapped_key: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # Fingerprint of the master key that wrapped it ("" = unknown, pre-0002).
    master_key_id: Mapped[str] = mapped_column(String(64), default="")


class SecretVersionRow(Base):
    """One version of one secret; versions are never rewritten. A deletion
    is a version too (``deleted``, empty ciphertext): numbering goes on."""

    __tablename__ = "secret_versions"
    __table_args__ = (UniqueConstraint("project_id", "environment_id", "name", "version", name="uq_secret_version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project_id: Mapped[str] = mapped_column(String(40), index=True)
    environment_id: Mapped[str] = mapped_column(String(40))  # "" = project scope
    environment_name: Mapped[str] = mapped_column(String(40))
    name: Mapped[str] = mapped_column(String(128))
    type: Mapped[str] = mapped_column(String(20))
    version: Mapped[int] = mapped_column(Integer)
    nonce: Mapped[bytes] = mapped_column(LargeBinary)
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_by: Mapped[str] = mapped_column(String(80))
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)


def migrate(engine) -> None:  # type: ignore[no-untyped-def]
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Several secrets services may start at once on one database: one
            # migrates, the others wait here and then find nothing to do.
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
