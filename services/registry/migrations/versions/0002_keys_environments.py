"""API key names, the environment's previous deployment, binding lookups.

- ``environments.previous_deployment_id``: the deployment the latest history
  entry replaced, back-filled from history.
- ``uq_api_key_active_name``: a key name is unique per project among keys
  that are not revoked (partial unique index, SQLite and PostgreSQL).
- ``ix_bindings_deployment_id``: bindings are looked up by deployment.

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("environments") as batch:
        batch.add_column(sa.Column("previous_deployment_id", sa.String(40), nullable=False, server_default=""))
    op.execute(
        "UPDATE environments SET previous_deployment_id = COALESCE(("
        " SELECT h.previous_deployment_id FROM history h"
        " WHERE h.environment_id = environments.id ORDER BY h.sequence DESC LIMIT 1), '')"
    )
    op.create_index(
        "uq_api_key_active_name",
        "api_keys",
        ["project_id", "name"],
        unique=True,
        sqlite_where=sa.text("revoked_at IS NULL"),
        postgresql_where=sa.text("revoked_at IS NULL"),
    )
    op.create_index("ix_bindings_deployment_id", "bindings", ["deployment_id"])


def downgrade() -> None:
    op.drop_index("ix_bindings_deployment_id", table_name="bindings")
    op.drop_index("uq_api_key_active_name", table_name="api_keys")
    with op.batch_alter_table("environments") as batch:
        batch.drop_column("previous_deployment_id")
