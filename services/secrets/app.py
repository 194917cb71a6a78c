"""Entry point of the secrets service: ``python -m services.secrets``."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import pathlib

from sqlalchemy.orm import sessionmaker

from berth import local
from services.common import logs
from services.common.config import add_common_flags, env
from services.common.remote import RegistryAuthenticator
from services.common.server import RunningServer, serve_until_signalled, start_server
from services.registry.storage import make_engine
from services.secrets import crypto
from services.secrets.service import SecretsService
from services.secrets.servicer import SERVICE_NAMES, EnvironmentDirectory, add_to_server
from services.secrets.storage import migrate

log = logging.getLogger("berth.secrets")


async def start(
    *,
    host: str,
    port: int,
    database_url: str,
    registry: str,
    service_token: str,
    master_key: bytes | None = None,
    master_key_file: pathlib.Path | None = None,
    admin_key: str = "",
) -> tuple[RunningServer, list]:
    """``master_key`` (as from BERTH_MASTER_KEY: not rotatable) or
    ``master_key_file`` (created 0600 when absent; rotatable)."""
    if master_key is not None:
        keyring = crypto.MasterKeyring(master_key)
    else:
        keyring = await asyncio.to_thread(crypto.MasterKeyring.load, env_value="", key_file=master_key_file)
    engine = make_engine(database_url)
    await asyncio.to_thread(migrate, engine)
    service = SecretsService(sessionmaker(engine, expire_on_commit=False), keyring)
    await asyncio.to_thread(service.recover)
    missing = await asyncio.to_thread(service.missing_master_keys)
    if missing:
        log.error(
            "master_key_missing",
            extra={"held": keyring.current_id, "missing": sorted(missing), "data_keys": sum(missing.values())},
        )
    directory = EnvironmentDirectory(registry, service_token)
    # The admin key (checked locally, like the registry does) may only rotate the master key.
    authenticator = RegistryAuthenticator(registry, service_token, admin_key=admin_key)
    running = await start_server(
        host=host,
        port=port,
        service_names=SERVICE_NAMES,
        register=lambda server: add_to_server(server, service, directory),
        authenticate=authenticator,
    )
    return running, [directory, authenticator]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="berth-secrets", description="Berth secrets service")
    add_common_flags(parser, default_port=50052)
    data_dir = pathlib.Path(env("BERTH_DATA_DIR", os.path.expanduser("~/.local/share/berth")))
    parser.add_argument("--database-url", default=env("BERTH_SECRETS_DATABASE_URL") or f"sqlite:///{data_dir / 'secrets.db'}")
    parser.add_argument("--master-key-file", type=pathlib.Path, default=data_dir / "master.key")
    parser.add_argument(
        "--admin-key", default=env("BERTH_ADMIN_KEY"),
        help="the platform's admin key, for rotate-key (env BERTH_ADMIN_KEY; else <data dir>/admin.key)",
    )
    parser.add_argument("--log-file", default=env("BERTH_LOG_FILE"),
                        help="write JSON log lines here, rotated by size (env BERTH_LOG_FILE; "
                             "BERTH_LOG_MAX_BYTES, BERTH_LOG_BACKUPS); default stderr")
    args = parser.parse_args(argv)
    logs.configure("secrets", args.log_level, args.log_file)
    if not args.service_token:
        parser.error("--service-token (or BERTH_SERVICE_TOKEN) is required")
    if args.database_url.startswith("sqlite:///"):
        pathlib.Path(args.database_url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    admin_key = args.admin_key or local.admin_key(data_dir)
    env_key = env("BERTH_MASTER_KEY")
    master_key = crypto.load_master_key(env_value=env_key, key_file=None) if env_key else None

    async def run() -> None:
        running, closers = await start(
            host=args.host, port=args.port, database_url=args.database_url, master_key=master_key,
            master_key_file=None if master_key is not None else args.master_key_file,
            registry=args.registry, service_token=args.service_token, admin_key=admin_key,
        )

        async def close() -> None:
            for c in closers:
                await c.close()

        await serve_until_signalled(running, name="secrets", on_stop=close)

    asyncio.run(run())


if __name__ == "__main__":
    main()
