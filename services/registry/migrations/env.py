"""Alembic environment: runs on the connection handed over by
``services.registry.storage.migrate`` (or a URL from BERTH_DATABASE_URL)."""
from __future__ import annotations

import os

from alembic import context

from services.registry.storage import Base, make_engine

target_metadata = Base.metadata
connection = context.config.attributes.get("connection")

if connection is None:
    engine = make_engine(os.environ.get("BERTH_DATABASE_URL", "sqlite:///registry.db"))
    with engine.begin() as conn:
        context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
