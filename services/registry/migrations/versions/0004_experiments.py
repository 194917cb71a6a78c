"""Experiments and gates.

- ``experiment_runs``: one immutable row per run of an experiment (a dataset
  of cases sent to one deployment): the dataset digest, the pass rate and
  latencies the registry computed, the per-case results as JSON, who and
  when. Index ix_experiment_runs_lookup serves the gate's question (the
  latest run of an experiment for a deployment).
- ``environment_gates``: at most one gate per environment (experiment name,
  threshold, dataset digest); deleted with its environment.

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "experiment_runs",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("project_id", sa.String(40), sa.ForeignKey("projects.id"), nullable=False),
        sa.Column("name", sa.String(40), nullable=False),
        sa.Column("deployment_id", sa.String(40), sa.ForeignKey("deployments.id"), nullable=False),
        sa.Column("dataset_digest", sa.String(80), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("passed", sa.Integer(), nullable=False),
        sa.Column("pass_rate", sa.Float(), nullable=False),
        sa.Column("latency_p50_ms", sa.Float(), nullable=False),
        sa.Column("latency_p99_ms", sa.Float(), nullable=False),
        sa.Column("cases", sa.JSON(), nullable=False),
        sa.Column("actor", sa.String(80), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index(
        "ix_experiment_runs_lookup", "experiment_runs", ["project_id", "deployment_id", "name", "created_at"]
    )
    op.create_index("ix_experiment_runs_project_created", "experiment_runs", ["project_id", "created_at"])
    op.create_table(
        "environment_gates",
        sa.Column("environment_id", sa.String(40), sa.ForeignKey("environments.id"), primary_key=True),
        sa.Column("project_id", sa.String(40), sa.ForeignKey("projects.id"), nullable=False),
        sa.Column("experiment", sa.String(40), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("dataset_digest", sa.String(80), nullable=False),
        sa.Column("actor", sa.String(80), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("environment_gates")
    op.drop_index("ix_experiment_runs_project_created", table_name="experiment_runs")
    op.drop_index("ix_experiment_runs_lookup", table_name="experiment_runs")
    op.drop_table("experiment_runs")
