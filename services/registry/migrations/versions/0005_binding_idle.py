"""The paused tier's windows on bindings.

- ``bindings.idle_pause_seconds``: seconds idle before the binding's
  replicas are paused (min_replicas 0; the scheduler's default when 0);
- ``bindings.idle_stop_seconds``: seconds idle before they are stopped
  (the scheduler's default when 0).
Existing bindings get 0 (the scheduler's defaults).

Revision ID: 0005
Revises: 0004
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("bindings") as batch:
        batch.add_column(sa.Column("idle_pause_seconds", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("idle_stop_seconds", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("bindings") as batch:
        batch.drop_column("idle_stop_seconds")
        batch.drop_column("idle_pause_seconds")
