"""Configuration shared by the services: flags override environment
variables, which override defaults on 127.0.0.1."""
from __future__ import annotations

import argparse
import os

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


def add_common_flags(parser: argparse.ArgumentParser, *, default_port: int) -> None:
    parser.add_argument("--host", default=env("BERTH_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(env("BERTH_PORT", str(default_port))))
    parser.add_argument("--registry", default=env("BERTH_REGISTRY_ADDR", DEFAULT_REGISTRY_ADDR))
    parser.add_argument("--secrets", default=env("BERTH_SECRETS_ADDR", DEFAULT_SECRETS_ADDR))
    parser.add_argument("--scheduler", default=env("BERTH_SCHEDULER_ADDR", DEFAULT_SCHEDULER_ADDR))
    parser.add_argument(
        "--service-token",
        default=env("BERTH_SERVICE_TOKEN"),
        help="credential the services use between themselves (env BERTH_SERVICE_TOKEN)",
    )
    parser.add_argument("--log-level", default=env("BERTH_LOG_LEVEL", "INFO"))
