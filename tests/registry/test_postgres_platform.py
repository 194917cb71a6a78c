"""`berth up --database-url postgresql://...`: the whole platform with the
registry on PostgreSQL, through the real CLI, surviving a restart."""
from __future__ import annotations

import pathlib

import psycopg
import pytest
from alembic.script import ScriptDirectory

from tests.support.platform import RunningPlatform

pytestmark = [pytest.mark.docker, pytest.mark.e2e]

REGISTRY_MIGRATIONS = pathlib.Path(__file__).resolve().parents[2] / "services" / "registry" / "migrations"


def migrations_head() -> str:
    """The newest registry migration: the version `berth up` must leave."""
    return str(ScriptDirectory(str(REGISTRY_MIGRATIONS)).get_current_head())


def test_berth_up_with_postgresql(tmp_path, postgres_cluster):
    url = postgres_cluster.create_database()
    platform = RunningPlatform(tmp_path / "data")
    platform.data_dir.mkdir()
    platform.env["BERTH_DATABASE_URL"] = url  # the CLI's --database-url
    try:
        platform.start()
        created = platform.cli_json("projects", "create", "shop")
        key = created["api_key"]
        platform.cli_json("env", "create", "qa", "--project", "shop", api_key=key)
        platform.stop()
        # The registry's rows live in PostgreSQL (not in the data dir's SQLite)...
        assert not (platform.data_dir / "registry.db").exists()
        with psycopg.connect(url) as conn:
            names = {row[0] for row in conn.execute("SELECT name FROM environments")}
            version = conn.execute("SELECT version_num FROM alembic_version").fetchone()[0]
        assert names == {"preview", "staging", "production", "qa"} and version == migrations_head()
        # ...and survive a restart of the platform.
        platform.start()
        listed = platform.cli_json("env", "list", "--project", "shop", api_key=key)
        assert {e["name"] for e in listed["environments"]} == names
    finally:
        platform.stop()
        platform.remove_containers()
        postgres_cluster.drop_database(url)
