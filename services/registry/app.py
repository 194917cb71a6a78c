"""Entry point of the registry service: ``python -m services.registry``."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import pathlib
import sys
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker

from berth import errors
from services.common import logs
from services.common.auth import ADMIN_PRINCIPAL, SERVICE_PRINCIPAL, Principal, same_secret
from services.common.config import add_common_flags, env
from services.common.server import RunningServer, serve_until_signalled, start_server
from services.registry.changes import (
    ChangeFeed,
    ChangeHub,
    ChangeLog,
    DatabaseInUse,
    SingleInstanceLock,
    sqlite_database_path,
)
from services.registry.service import RegistryService
from services.registry.servicer import SERVICE_NAMES, add_to_server
from services.registry.storage import make_engine, migrate

log = logging.getLogger("berth.registry")


def default_database_url() -> str:
    data_dir = pathlib.Path(env("BERTH_DATA_DIR", os.path.expanduser("~/.local/share/berth")))
    return f"sqlite:///{data_dir / 'registry.db'}"


def listen_dsn(engine: Engine) -> str | None:
    """The libpq connection string of the feed's LISTEN connection
    (PostgreSQL only)."""
    if engine.dialect.name != "postgresql":
        return None
    return engine.url.set(drivername="postgresql").render_as_string(hide_password=False)


@dataclass
class RegistryServer(RunningServer):
    """The running gRPC server with what the registry runs beside it: the
    change feed's tasks and, on SQLite, the database's lock file."""

    feed: ChangeFeed | None = None
    lock: SingleInstanceLock | None = None

    async def stop(self, grace: float = 5.0) -> None:
        try:
            await super().stop(grace)
        finally:
            if self.feed is not None:
                await self.feed.close()
            if self.lock is not None:
                self.lock.release()


async def start(*, host: str, port: int, database_url: str, admin_key: str, service_token: str) -> tuple[RegistryServer, RegistryService]:
    """Raises ``DatabaseInUse`` when another registry process serves the
    same SQLite file."""
    lock: SingleInstanceLock | None = None
    sqlite_path = sqlite_database_path(database_url)
    if sqlite_path is not None:
        lock = SingleInstanceLock(sqlite_path)
        lock.acquire()
    feed: ChangeFeed | None = None
    try:
        engine = make_engine(database_url)
        await asyncio.to_thread(migrate, engine)
        sessions = sessionmaker(engine, expire_on_commit=False)
        changes = ChangeLog(sessions)
        # The feed publishes what commits after this revision; a watcher
        # resuming from an older one is served from the changes table.
        latest = await asyncio.to_thread(changes.latest)
        hub = ChangeHub()
        feed = ChangeFeed(changes, hub, listen_dsn=listen_dsn(engine))
        await feed.start(latest)
        service = RegistryService(sessions, hub, admin_key=admin_key, service_token=service_token)
    except BaseException:
        if feed is not None:
            await feed.close()
        if lock is not None:
            lock.release()
        raise

    async def authenticate(api_key: str) -> Principal:
        if not api_key:
            raise errors.Unauthenticated("no API key given", hint="set BERTH_API_KEY")
        if same_secret(api_key, service_token):
            return SERVICE_PRINCIPAL
        if same_secret(api_key, admin_key):
            return ADMIN_PRINCIPAL
        return await asyncio.to_thread(service.authenticate, api_key)

    try:
        running = await start_server(
            host=host,
            port=port,
            service_names=SERVICE_NAMES,
            register=lambda server: add_to_server(server, service, hub, changes),
            authenticate=authenticate,
        )
    except BaseException:
        await feed.close()
        if lock is not None:
            lock.release()
        raise
    return RegistryServer(
        server=running.server, port=running.port, health=running.health, service_names=running.service_names,
        feed=feed, lock=lock,
    ), service


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="berth-registry", description="Berth registry service")
    add_common_flags(parser, default_port=50051)
    parser.add_argument("--database-url", default=env("BERTH_DATABASE_URL") or None)
    parser.add_argument("--admin-key", default=env("BERTH_ADMIN_KEY"), help="env BERTH_ADMIN_KEY")
    parser.add_argument("--log-file", default=env("BERTH_LOG_FILE"),
                        help="write JSON log lines here, rotated by size (env BERTH_LOG_FILE; "
                             "BERTH_LOG_MAX_BYTES, BERTH_LOG_BACKUPS); default stderr")
    args = parser.parse_args(argv)
    logs.configure("registry", args.log_level, args.log_file)
    if not args.service_token:
        parser.error("--service-token (or BERTH_SERVICE_TOKEN) is required")
    database_url = args.database_url or default_database_url()
    if database_url.startswith("sqlite:///"):
        pathlib.Path(database_url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)

    async def run() -> None:
        running, _ = await start(
            host=args.host, port=args.port, database_url=database_url,
            admin_key=args.admin_key, service_token=args.service_token,
        )
        await serve_until_signalled(running, name="registry")

    try:
        asyncio.run(run())
    except DatabaseInUse as exc:
        log.error("database_in_use", extra={"error": str(exc)})
        sys.exit(f"berth-registry: {exc}")


if __name__ == "__main__":
    main()
