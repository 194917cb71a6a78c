"""The change feed in the database.

- ``changes``: one row per watched change (an environment created, moved or
  deleted, a binding changed, a key revoked), written in the transaction that
  made the change, keyed by (registry revision, position in it). Every
  registry process tails it, so several registries on one database feed
  their watchers alike, and it is the replay log for ``since_revision``
  (pruned to the newest revisions by the registry).

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "changes",
        sa.Column("revision", sa.BigInteger(), primary_key=True),
        sa.Column("position", sa.Integer(), primary_key=True),
        sa.Column("project_id", sa.String(40), nullable=False),
        sa.Column("kind", sa.String(30), nullable=False),
        sa.Column("action", sa.String(20), nullable=False, server_default=""),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("detail", sa.LargeBinary(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    # A project's watch replays its own rows after a revision.
    op.create_index("ix_changes_project_id_revision", "changes", ["project_id", "revision"])


def downgrade() -> None:
    op.drop_index("ix_changes_project_id_revision", table_name="changes")
    op.drop_table("changes")
