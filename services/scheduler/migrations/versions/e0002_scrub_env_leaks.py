"""Scrub environment values that engine messages leaked into stored events.

Before the scheduler redacted engine text, a replica whose secret held a NUL
failed to start with runc's ``environment variable value can't contain
null(\\x00): "NAME=value"``, and that message, value included, was stored.
This revision rewrites such messages with ``scrub_env_leaks`` (the same rule
the store applies to every new message): only messages that mention
environment variables and contain an assignment change; nothing is deleted.

Revision ID: e0002
Revises: e0001
"""
import sqlalchemy as sa
from alembic import op

from services.scheduler.events import scrub_env_leaks

revision = "e0002"
down_revision = "e0001"
branch_labels = None
depends_on = None

events = sa.table("deployment_events", sa.column("id", sa.Integer()), sa.column("message", sa.Text()))


def upgrade() -> None:
    bind = op.get_bind()
    rows = bind.execute(sa.select(events.c.id, events.c.message).where(events.c.message.like("%=%"))).all()
    for row_id, message in rows:
        cleaned = scrub_env_leaks(message)
        if cleaned != message:
            bind.execute(sa.update(events).where(events.c.id == row_id).values(message=cleaned))


def downgrade() -> None:
    pass  # a scrubbed value is gone for good, as it should be
