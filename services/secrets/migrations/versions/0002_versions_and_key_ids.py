"""Deletion tombstones and the id of the master key wrapping each data key.

Revision ID: s0002
Revises: s0001
"""
import sqlalchemy as sa
from alembic import op

revision = "s0002"
down_revision = "s0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # "" = wrapped before key ids were recorded: every held key is tried.
    op.add_column("secret_data_keys", sa.Column("master_key_id", sa.String(64), nullable=False, server_default=""))
    op.add_column("secret_versions", sa.Column("deleted", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("secret_versions") as batch:
        batch.drop_column("deleted")
    with op.batch_alter_table("secret_data_keys") as batch:
        batch.drop_column("master_key_id")
