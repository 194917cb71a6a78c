"""Alembic environment of the scheduler's event store
(``scheduler-events.db``; own version table)."""
from __future__ import annotations

import os

from alembic import context
from sqlalchemy import create_engine

from services.scheduler.events import VERSION_TABLE, metadata

connection = context.config.attributes.get("connection")


def _run(conn) -> None:  # type: ignore[no-untyped-def]
    context.configure(connection=conn, target_metadata=metadata, version_table=VERSION_TABLE, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if connection is None:
    with create_engine(os.environ.get("BERTH_SCHEDULER_EVENTS_URL", "sqlite:///scheduler-events.db")).begin() as conn:
        _run(conn)
else:
    _run(connection)
