"""Alembic environment of the secrets service (own version table)."""
from __future__ import annotations

import os

from alembic import context

from services.registry.storage import make_engine
from services.secrets.storage import VERSION_TABLE, Base

connection = context.config.attributes.get("connection")


def _run(conn) -> None:  # type: ignore[no-untyped-def]
    context.configure(connection=conn, target_metadata=Base.metadata, version_table=VERSION_TABLE, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if connection is None:
    with make_engine(os.environ.get("BERTH_SECRETS_DATABASE_URL", "sqlite:///secrets.db")).begin() as conn:
        _run(conn)
else:
    _run(connection)
