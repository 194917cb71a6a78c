"""Structured (JSON lines) logging for every service.

Call ``log.info("event_name", extra={"field": value})``; never log a secret
value or an API key.
"""
from __future__ import annotations

import logging
import os
import sys

from pythonjsonlogger.json import JsonFormatter


def configure(service: str, level: str | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger", "message": "event"},
            static_fields={"service": service},
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel((level or os.environ.get("BERTH_LOG_LEVEL", "INFO")).upper())
    # The Docker SDK and urllib3 are chatty at DEBUG/INFO.
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    logging.getLogger("docker").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
