"""The router's access log: one JSON line per finished request, in the same
envelope as every other log line (``services.common.logs``).

Only these fields are written: never a header value (API keys,
Authorization, Cookie) and never the query string (tokens travel there too).

A line per request through ``logging`` (a LogRecord, a formatter, a handler
lock) costs about as much as proxying the request itself, so when the
process logs through Berth's batching handler the line is formatted here
(the route's part once per route), gathered on the event loop and handed to
that handler in batches (at most ``FLUSH_INTERVAL`` seconds later).
Elsewhere (tests, embedding) it goes through the ``berth.router.access``
logger like any other record.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

from services.common import logs
from services.router.table import Route

logger = logging.getLogger("berth.router.access")
EVENT = "request"
ROUTE_FRAGMENT_CACHE_SIZE = 4096
QUOTED_CACHE_SIZE = 4096
FLUSH_INTERVAL = 0.25
MAX_PENDING = 512

_quote = json.encoder.encode_basestring  # type: ignore[attr-defined]  # the C-accelerated JSON string encoder
_NO_ROUTE = ', "project": "", "environment": "", "deployment": "", "fallback": false}'


class AccessLog:
    def __init__(self, write_lines: Callable[[list[str]], None] | None = None, *, service: str = "router") -> None:
        """``write_lines``: where batches of preformatted lines go; by default
        the batching handler of the process's logging when ``logs.configure``
        installed it. With one, whether to log is decided now (the level is
        the process's configuration); without, per request by the logger."""
        self._write_lines = write_lines if write_lines is not None else logs.lines_writer()
        self.enabled = self._write_lines is None or logger.isEnabledFor(logging.INFO)
        self._pending: list[str] = []
        self._flush_timer: asyncio.TimerHandle | None = None
        self._prefix_tail = f'"level": "INFO", "logger": {_quote(logger.name)}, "event": "{EVENT}", ' \
                            f'"service": {_quote(service)}, '
        self._fragments: dict[int, tuple[Route, str]] = {}
        self._quoted: dict[bytes | str, str] = {}  # methods, paths and peers as JSON strings

    def record(self, method: bytes, target: bytes, status: int, seconds: float, peer: str,
               route: Route | None, wall_time: float) -> None:
        if self._write_lines is None:
            if not logger.isEnabledFor(logging.INFO):
                return
            path = target.split(b"?", 1)[0].decode("latin-1")
            logger.info(EVENT, extra={
                "method": method.decode("latin-1"), "path": path, "status": status, "ms": round(seconds * 1000, 2),
                "peer": peer, "project": route.project_name if route else "",
                "environment": route.environment_name if route else "",
                "deployment": route.deployment_id if route else "", "fallback": bool(route and route.fallback),
            })
            return
        quoted = self._quoted
        method_json = quoted.get(method) or self._quote(method, method)
        path_json = quoted.get(target) or self._quote(target, target.split(b"?", 1)[0])
        peer_json = quoted.get(peer) or self._quote(peer, peer)
        pending = self._pending
        pending.append(
            f'{{"time": "{logs.timestamp(wall_time)}", {self._prefix_tail}"method": {method_json}, '
            f'"path": {path_json}, "status": {status}, "ms": {seconds * 1000:.2f}, "peer": {peer_json}'
            f'{self._route_fragment(route)}'
        )
        if len(pending) >= MAX_PENDING:
            self.flush()
        elif self._flush_timer is None:
            self._flush_timer = asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        """Hands the lines gathered so far to the log handler."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self._pending and self._write_lines is not None:
            lines, self._pending = self._pending, []
            self._write_lines(lines)

    def _quote(self, key: bytes | str, text: bytes | str) -> str:
        """``text`` as a JSON string, remembered under ``key`` (bounded)."""
        quoted = _quote(text.decode("latin-1") if isinstance(text, bytes) else text)
        if len(self._quoted) >= QUOTED_CACHE_SIZE:
            self._quoted.clear()
        self._quoted[key] = quoted
        return quoted

    def _route_fragment(self, route: Route | None) -> str:
        if route is None:
            return _NO_ROUTE
        cached = self._fragments.get(id(route))
        if cached is not None and cached[0] is route:  # the id of a freed route may be reused
            return cached[1]
        fragment = (f', "project": {_quote(route.project_name)}, "environment": {_quote(route.environment_name)}, '
                    f'"deployment": {_quote(route.deployment_id)}, "fallback": {"true" if route.fallback else "false"}}}')
        if len(self._fragments) >= ROUTE_FRAGMENT_CACHE_SIZE:
            self._fragments.clear()
        self._fragments[id(route)] = (route, fragment)
        return fragment
