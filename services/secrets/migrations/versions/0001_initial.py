"""Initial secrets schema.

Revision ID: s0001
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "s0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    ts = sa.DateTime(timezone=True)
    op.create_table(
        "secret_data_keys",
        sa.Column("project_id", sa.String(40), primary_key=True),
        sa.Column("nonce", sa.LargeBinary(), nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", ts, nullable=False),
    )
    op.create_table(
        "secret_versions",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("project_id", sa.String(40), nullable=False, index=True),
        sa.Column("environment_id", sa.String(40), nullable=False),
        sa.Column("environment_name", sa.String(40), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("type", sa.String(20), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("nonce", sa.LargeBinary(), nullable=False),
        sa.Column("ciphertext", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", ts, nullable=False),
        sa.Column("created_by", sa.String(80), nullable=False),
        sa.UniqueConstraint("project_id", "environment_id", "name", "version", name="uq_secret_version"),
    )


def downgrade() -> None:
    op.drop_table("secret_versions")
    op.drop_table("secret_data_keys")
