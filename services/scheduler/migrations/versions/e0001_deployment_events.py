"""The deployment events table.

Stores made before the scheduler had migrations created this table
themselves (``create_all``); for them this revision only records that the
schema is at e0001.

Revision ID: e0001
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "e0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("deployment_events"):
        return
    ts = sa.DateTime(timezone=True)
    op.create_table(
        "deployment_events",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("project_id", sa.String(64), nullable=False, index=True),
        sa.Column("deployment_id", sa.String(64), nullable=False, index=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("environment_id", sa.String(64), nullable=False),
        sa.Column("environment", sa.String(128), nullable=False),
        sa.Column("replica", sa.String(32), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("first_seen", ts, nullable=False),
        sa.Column("last_seen", ts, nullable=False),
        sa.UniqueConstraint("deployment_id", "kind", "environment_id", "replica"),
    )


def downgrade() -> None:
    op.drop_table("deployment_events")
