"""Configuration shared by the services: flags override environment
variables, which override defaults on 127.0.0.1."""
from __future__ import annotations

import argparse
import os

from berth.client import split_addresses

DEFAULT_REGISTRY_ADDR = "127.0.0.1:50051"
DEFAULT_SECRETS_ADDR = "127.0.0.1:50052"
DEFAULT_SCHEDULER_ADDR = "127.0.0.1:50053"
DEFAULT_ROUTER_PORT = 8080


def env(name: str, default: str = "") -> str:
    """``$NAME``, else the content of the file named by ``$NAME_FILE`` (a
    Docker secret under /run/secrets: credentials stay out of the
    environment), else ``default``."""
    if name in os.environ:
        return os.environ[name]
    path = os.environ.get(f"{name}_FILE")
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                return f.read().rstrip("\r\n")
        except OSError as exc:
            raise SystemExit(f"{name}_FILE: cannot read {path}: {exc.strerror}") from None
    return default


def addresses(value: str) -> str:
    """An address flag: ``host:port``, or several instances of the service
    separated by commas (reached round_robin, health-checked; see
    ``berth.client.channel_arguments``). Kept as given once it parses."""
    try:
        split_addresses(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def add_common_flags(parser: argparse.ArgumentParser, *, default_port: int) -> None:
    parser.add_argument("--host", default=env("BERTH_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(env("BERTH_PORT", str(default_port))))
    lists = "host:port, or several instances separated by commas"
    parser.add_argument("--registry", type=addresses, default=env("BERTH_REGISTRY_ADDR", DEFAULT_REGISTRY_ADDR),
                        help=f"the registry: {lists} (env BERTH_REGISTRY_ADDR)")
    parser.add_argument("--secrets", type=addresses, default=env("BERTH_SECRETS_ADDR", DEFAULT_SECRETS_ADDR),
                        help=f"the secrets service: {lists} (env BERTH_SECRETS_ADDR)")
    parser.add_argument("--scheduler", type=addresses, default=env("BERTH_SCHEDULER_ADDR", DEFAULT_SCHEDULER_ADDR),
                        help=f"the scheduler: {lists}; a standby is skipped (env BERTH_SCHEDULER_ADDR)")
    parser.add_argument(
        "--service-token",
        default=env("BERTH_SERVICE_TOKEN"),
        help="credential the services use between themselves (env BERTH_SERVICE_TOKEN)",
    )
    parser.add_argument("--log-level", default=env("BERTH_LOG_LEVEL", "INFO"))
