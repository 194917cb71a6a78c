"""Structured (JSON lines) logging for every service.

Call ``log.info("event_name", extra={"field": value})``; never log a secret
value or an API key.

Lines are formatted by a small formatter (a fixed envelope plus the record's
extra fields) and written in batches: the router logs one line per request,
and a formatter plus a write system call per line would cost about as much
as proxying the request. Warnings and errors are written at once; the rest
within ``FLUSH_INTERVAL`` seconds, and everything at exit.

Where the lines go: stderr, or with ``--log-file``/``BERTH_LOG_FILE`` (what
``berth up`` passes each service) a file rotated by size
(``BERTH_LOG_MAX_BYTES``, default 50 MB, and ``BERTH_LOG_BACKUPS`` older
files, default 5: ``router.log``, ``router.log.1`` ... ``router.log.5``).
Several processes may append to one file (the router's workers share
``router.log``): each writes with O_APPEND, checks the file's size before
each batch and rotates under an exclusive lock on ``<file>.lock`` only after
checking that no other process rotated it first; a process whose file was
rotated by another reopens the path before its next batch. The standard
library's RotatingFileHandler does the same for one process only (two
processes rotating one file lose lines and old files), hence this small
equivalent under the batched writer. The process's own stdout and stderr
are pointed at the current file too, so a traceback printed after logging
is set up lands in the bounded log (what comes before goes wherever the
parent sent stderr; ``berth up`` keeps that in a small
``<service>.stderr.log``).
"""
from __future__ import annotations

import fcntl
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
DEFAULT_MAX_BYTES = 50 * 1024 * 1024
DEFAULT_BACKUPS = 5

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


class RotatingLogFile:
    """A file-like target for ``BatchingStreamHandler`` that rotates by size
    and tolerates other processes appending to and rotating the same path
    (see the module doc). At most ``backups`` older files are kept; a batch
    is split between files at line ends, so a file exceeds ``max_bytes``
    only by a single line longer than that, or when another process appended
    between this one's size check and its write."""

    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES,
                 backups: int = DEFAULT_BACKUPS, capture_std: bool = False) -> None:
        if max_bytes < 0 or backups < 0:
            raise ValueError("the log size limit and the number of backups cannot be negative")
        self.path = os.fspath(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.capture_std = capture_std
        self._fd = -1
        self._identity = (0, 0)
        self._open()

    def _open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        st = os.fstat(fd)
        self._identity = (st.st_dev, st.st_ino)
        if self.capture_std:
            for std in (1, 2):
                os.dup2(fd, std)  # the duplicates are inheritable: children's stray output lands here too

    def _follow(self) -> None:
        """Reopens the path if another process rotated the file away."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._open()
            return
        if (st.st_dev, st.st_ino) != self._identity:
            self._open()

    def _rotate(self, incoming: int) -> None:
        lock_fd = os.open(self.path + ".lock", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            self._follow()  # another process may have rotated while we waited
            size = os.fstat(self._fd).st_size
            if size == 0 or size + incoming <= self.max_bytes:
                return
            if self.backups == 0:
                os.unlink(self.path)
            else:
                for i in range(self.backups - 1, 0, -1):
                    older = f"{self.path}.{i}"
                    if os.path.exists(older):
                        os.replace(older, f"{self.path}.{i + 1}")
                os.replace(self.path, f"{self.path}.1")
            self._open()
        finally:
            os.close(lock_fd)  # releases the lock

    def write(self, text: str) -> int:
        """Appends whole lines; the lines that do not fit the current file
        go to the next one (a line longer than the limit gets a file of its
        own)."""
        data = text.encode("utf-8", "replace")
        self._follow()
        rotated = False
        while data:
            size = os.fstat(self._fd).st_size
            if not self.max_bytes or size + len(data) <= self.max_bytes:
                self._write_all(data)
                return len(text)
            room = self.max_bytes - size
            cut = data.rfind(b"\n", 0, room) + 1 if room > 0 else 0
            if cut == 0 and (size == 0 or rotated):  # a line longer than the limit: it still gets written
                cut = data.find(b"\n") + 1 or len(data)
            if cut:
                self._write_all(data[:cut])
                data = data[cut:]
            if data:
                self._rotate(len(data))
                rotated = True
        return len(text)

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def flush(self) -> None:
        pass  # every write is a system call already

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a whole number, not {raw!r}") from None
    if value < 0:
        raise ValueError(f"{name} cannot be negative")
    return value


class BatchingStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Buffers formatted lines; writes them when ``MAX_BUFFERED`` are waiting,
    at once for WARNING and above, from a timer every ``FLUSH_INTERVAL``, and
    on close."""

    def __init__(self, stream: IO[str] | RotatingLogFile) -> None:
        super().__init__(stream)  # type: ignore[arg-type]
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
        if isinstance(self.stream, RotatingLogFile):
            self.stream.close()


def lines_writer() -> Callable[[list[str]], None] | None:
    """Where a hot path may hand preformatted JSON lines directly: the
    batching handler installed by ``configure``, or None when logging is set
    up otherwise (tests, embedding), where records must go through
    ``logging``."""
    handlers = logging.getLogger().handlers
    if len(handlers) == 1 and isinstance(handlers[0], BatchingStreamHandler):
        return handlers[0].write_lines
    return None


def configure(service: str, level: str | None = None, log_file: str | None = None) -> None:
    """JSON lines on stderr, or into ``log_file`` (default
    ``BERTH_LOG_FILE``), rotated by ``BERTH_LOG_MAX_BYTES`` and
    ``BERTH_LOG_BACKUPS``."""
    path = os.environ.get("BERTH_LOG_FILE", "") if log_file is None else log_file
    target: IO[str] | RotatingLogFile = sys.stderr
    if path:
        target = RotatingLogFile(path, max_bytes=_env_int("BERTH_LOG_MAX_BYTES", DEFAULT_MAX_BYTES),
                                 backups=_env_int("BERTH_LOG_BACKUPS", DEFAULT_BACKUPS), capture_std=True)
    handler = BatchingStreamHandler(target)
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
