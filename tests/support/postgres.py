"""A throwaway PostgreSQL cluster for tests: ``initdb`` + ``pg_ctl`` from the
local PostgreSQL 15 binaries, in a temporary directory, on a free port.

Use the session-scoped ``postgres_cluster`` fixture (re-export it from your
``conftest.py``: ``from tests.support.postgres import postgres_cluster``) and
call ``cluster.create_database()`` for a fresh, empty database per test; it
returns a ``postgresql://`` URL.

PostgreSQL refuses to run as root, so when the tests run as root the cluster
is owned by and run as the ``postgres`` system user (or ``nobody``) through
``runuser``. Durability is switched off (``fsync=off``): the cluster lives for
one test session, and locking, isolation and constraints behave exactly as in
production.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest

PG_BIN_CANDIDATES = (
    os.environ.get("BERTH_PG_BIN", ""),
    "/usr/lib/postgresql/15/bin",
    "/usr/lib/postgresql/16/bin",
    "/usr/lib/postgresql/17/bin",
)
SUPERUSER = "postgres"


def _pg_bin() -> pathlib.Path:
    for candidate in PG_BIN_CANDIDATES:
        if candidate and (pathlib.Path(candidate) / "initdb").exists():
            return pathlib.Path(candidate)
    found = shutil.which("initdb")
    if found:
        return pathlib.Path(found).parent
    raise RuntimeError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found: install postgresql-15 "
        "(scripts/test.sh does) or set BERTH_PG_BIN"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_as_user() -> str | None:
    """The system user to run the server as, or None to run as ourselves."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' user exists to run PostgreSQL")


class PostgresCluster:
    def __init__(self) -> None:
        self.bin = _pg_bin()
        self.user = _run_as_user()
        self.root = pathlib.Path(tempfile.mkdtemp(prefix="berth-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sockets"
        self.log = self.root / "server.log"
        self.port = _free_port()
        self._started = False

    # -- lifecycle ----------------------------------------------------------
    def _cmd(self, *args: str) -> list[str]:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self.user is None:
            return cmd
        return ["runuser", "-u", self.user, "--", *cmd]

    def start(self, timeout: float = 60) -> None:
        self.sockets.mkdir()
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chmod(self.root, 0o755)
            for path in (self.root, self.sockets):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        subprocess.run(
            self._cmd("initdb", "-D", str(self.data), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8",
                      "--no-locale", "--no-sync"),
            check=True, capture_output=True, timeout=timeout, cwd=self.root,
        )
        options = " ".join([
            f"-p {self.port}",
            "-c listen_addresses=127.0.0.1",
            f"-c unix_socket_directories={self.sockets}",
            "-c fsync=off",
            "-c synchronous_commit=off",
            "-c full_page_writes=off",
            "-c max_connections=200",
            "-c shared_buffers=32MB",
        ])
        result = subprocess.run(
            self._cmd("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w",
                      "-t", str(int(timeout)), "start"),
            check=False, capture_output=True, timeout=timeout + 10, cwd=self.root,
        )
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {result.stderr.decode(errors='replace')}\n{self.server_log()}")
        self._started = True
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.admin_dsn, connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"PostgreSQL did not accept connections:\n{self.server_log()}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self._started:
            subprocess.run(
                self._cmd("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop"),
                check=False, capture_output=True, timeout=60, cwd=self.root,
            )
            self._started = False
        shutil.rmtree(self.root, ignore_errors=True)

    def server_log(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no server log)"

    # -- databases ----------------------------------------------------------
    def url(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    @property
    def admin_dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname=postgres"

    def create_database(self, name: str = "") -> str:
        """Creates an empty database and returns its ``postgresql://`` URL."""
        name = name or "t_" + uuid.uuid4().hex[:16]
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def running_cluster() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    with running_cluster() as cluster:
        yield cluster


@pytest.fixture
def postgres_url(postgres_cluster: PostgresCluster) -> Iterator[str]:
    """A fresh, empty database for one test."""
    url = postgres_cluster.create_database()
    yield url
    postgres_cluster.drop_database(url)
