"""Canaries: ``environments.canary``, the environment's canary (or its last
one until the next pointer move) as JSON: stable and candidate deployments,
the candidate's weight, the step plan and current step, the step's start,
the state (running, paused, aborted, promoted), the analysis thresholds and
the last analysis. Existing environments get NULL (no canary).

Revision ID: 0006
Revises: 0005
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("environments") as batch:
        batch.add_column(sa.Column("canary", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("environments") as batch:
        batch.drop_column("canary")
