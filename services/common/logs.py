"""Structured (JSON lines) logging for every service.

Call ``log.info("event_name", extra={"field": value})``; never log a secret
value or an API key.

Lines are formatted by a small formatter (a fixed envelope plus the record's
extra fields) and written in batches: the router logs one line per request,
and a formatter plus a write system call per line would cost about as much
as proxying the request. Warnings and errors are written at once; the rest
within ``FLUSH_INTERVAL`` seconds, and everything at exit.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any

FLUSH_INTERVAL = 0.25
MAX_BUFFERED = 256

# Attributes every LogRecord has; anything else came from ``extra=``.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


# (second, its text) and (millisecond, its text): each one tuple, replaced in
# one assignment whichever thread formats.
_second_stamp = (-1, "")
_milli_stamp = (-1, "")


def timestamp(created: float) -> str:
    """``created`` (seconds since the epoch) as the ``time`` field of a line;
    strftime runs once per second, the milliseconds once per millisecond (a
    busy router writes dozens of lines in one)."""
    global _second_stamp, _milli_stamp
    milli = int(created * 1000)
    cached_milli, text = _milli_stamp
    if milli == cached_milli:
        return text
    second, fraction = divmod(milli, 1000)
    cached_second, stamp = _second_stamp
    if second != cached_second:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        _second_stamp = (second, stamp)
    text = f"{stamp},{fraction:03d}"
    _milli_stamp = (milli, text)
    return text


class JsonLineFormatter(logging.Formatter):
    """``{"time", "level", "logger", "event", "service", ...extra}`` per line."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
            "service": self._service,
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS:
                line[key] = value
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class BatchingStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Buffers formatted lines; writes them when ``MAX_BUFFERED`` are waiting,
    at once for WARNING and above, from a timer every ``FLUSH_INTERVAL``, and
    on close."""

    def __init__(self, stream: IO[str]) -> None:
        super().__init__(stream)
        self._lines: list[str] = []
        self._stop = threading.Event()
        self._timer = threading.Thread(target=self._flush_periodically, name="log-flush", daemon=True)
        self._timer.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)
            return
        with self.lock:  # type: ignore[union-attr]
            self._lines.append(line)
            urgent = record.levelno >= logging.WARNING or len(self._lines) >= MAX_BUFFERED
        if urgent:
            self.flush()

    def write_lines(self, lines: list[str]) -> None:
        """Adds lines formatted by the caller (INFO lines) to the batch."""
        with self.lock:  # type: ignore[union-attr]
            self._lines += lines
            urgent = len(self._lines) >= MAX_BUFFERED
        if urgent:
            self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if not self._lines:
                return
            text = "\n".join(self._lines) + "\n"
            self._lines.clear()
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):
                pass  # the stream is gone (shutdown); nothing useful to do

    def _flush_periodically(self) -> None:
        while not self._stop.wait(FLUSH_INTERVAL):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        self.flush()
        super().close()


def lines_writer() -> Callable[[list[str]], None] | None:
    """Where a hot path may hand preformatted JSON lines directly: the
    batching handler installed by ``configure``, or None when logging is set
    up otherwise (tests, embedding), where records must go through
    ``logging``."""
    handlers = logging.getLogger().handlers
    if len(handlers) == 1 and isinstance(handlers[0], BatchingStreamHandler):
        return handlers[0].write_lines
    return None


def configure(service: str, level: str | None = None) -> None:
    handler = BatchingStreamHandler(sys.stderr)
    handler.setFormatter(JsonLineFormatter(service))
    root = logging.getLogger()
    for old in root.handlers:
        old.close()
    root.handlers[:] = [handler]
    root.setLevel((level or os.environ.get("BERTH_LOG_LEVEL", "INFO")).upper())
    # The Docker SDK, urllib3 and Alembic are chatty at DEBUG/INFO.
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    logging.getLogger("docker").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
