"""Entry point of the registry service: ``python -m services.registry``."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import pathlib

from sqlalchemy.orm import sessionmaker

from berth import errors
from services.common import logs
from services.common.auth import ADMIN_PRINCIPAL, SERVICE_PRINCIPAL, Principal, same_secret
from services.common.config import add_common_flags, env
from services.common.server import RunningServer, serve_until_signalled, start_server
from services.registry.changes import ChangeHub
from services.registry.service import RegistryService, read_revision
from services.registry.servicer import SERVICE_NAMES, add_to_server
from services.registry.storage import make_engine, migrate

log = logging.getLogger("berth.registry")


def default_database_url() -> str:
    data_dir = pathlib.Path(env("BERTH_DATA_DIR", os.path.expanduser("~/.local/share/berth")))
    return f"sqlite:///{data_dir / 'registry.db'}"


async def start(*, host: str, port: int, database_url: str, admin_key: str, service_token: str) -> tuple[RunningServer, RegistryService]:
    engine = make_engine(database_url)
    await asyncio.to_thread(migrate, engine)
    sessions = sessionmaker(engine, expire_on_commit=False)
    # A watcher resuming from the revision it last saw before a restart has
    # missed nothing if nothing changed since; older ones get a snapshot.
    hub = ChangeHub(start_revision=await asyncio.to_thread(read_revision, sessions))
    service = RegistryService(sessions, hub, admin_key=admin_key, service_token=service_token)

    async def authenticate(api_key: str) -> Principal:
        if not api_key:
            raise errors.Unauthenticated("no API key given", hint="set BERTH_API_KEY")
        if same_secret(api_key, service_token):
            return SERVICE_PRINCIPAL
        if same_secret(api_key, admin_key):
            return ADMIN_PRINCIPAL
        return await asyncio.to_thread(service.authenticate, api_key)

    running = await start_server(
        host=host,
        port=port,
        service_names=SERVICE_NAMES,
        register=lambda server: add_to_server(server, service, hub),
        authenticate=authenticate,
    )
    return running, service


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

    asyncio.run(run())


if __name__ == "__main__":
    main()
