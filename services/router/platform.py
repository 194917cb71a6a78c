"""The router's own endpoints (requests with no routing headers and a host
that does not name an environment): ``/healthz`` now, the REST API
``/api/v1`` later.

A handler has the shape::

    async def handler(request: PlatformRequest) -> PlatformResponse

and is registered with ``Platform.route(method, path, handler)`` for one exact
path, or ``Platform.mount(prefix, handler)`` for everything under a prefix
(e.g. the REST API: ``platform.mount("/api/v1", api.handle)``). The proxy
calls ``Platform.respond(method, path, query, headers, body)`` with the whole
request body already read (bounded by ``--max-body-bytes``). A response with a
``stream`` (server-sent events) has a body of unknown length: the proxy sends
its chunks as they come and closes the connection after the last.
"""
from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

Headers = list[tuple[str, str]]


@dataclass(frozen=True)
class PlatformRequest:
    method: str  # "GET", "POST", ...
    path: str  # raw path, e.g. "/api/v1/deployments/abc"
    query: str  # raw query string without "?", "" if none
    headers: Mapping[str, str]  # lower-case names; repeated headers joined by ", "
    body: bytes


@dataclass
class PlatformResponse:
    status: int
    headers: Headers = field(default_factory=list)
    body: bytes = b""
    # Instead of ``body``: chunks sent as they come, the end of the stream
    # delimited by closing the connection (text/event-stream).
    stream: AsyncIterator[bytes] | None = None


Handler = Callable[[PlatformRequest], Awaitable[PlatformResponse]]


def json_response(status: int, payload: Any, headers: Headers | None = None) -> PlatformResponse:
    return PlatformResponse(
        status, [("Content-Type", "application/json"), *(headers or [])], json.dumps(payload).encode()
    )


def error_response(status: int, code: str, message: str, headers: Headers | None = None) -> PlatformResponse:
    return json_response(status, {"error": {"code": code, "message": message}}, headers)


class Platform:
    """A small dispatcher: exact routes first, then the longest mounted prefix."""

    def __init__(self) -> None:
        self._routes: dict[tuple[str, str], Handler] = {}
        self._paths: set[str] = set()
        self._mounts: list[tuple[str, Handler]] = []

    def route(self, method: str, path: str, handler: Handler) -> None:
        self._routes[(method.upper(), path)] = handler
        self._paths.add(path)

    def mount(self, prefix: str, handler: Handler) -> None:
        self._mounts.append((prefix.rstrip("/"), handler))
        self._mounts.sort(key=lambda m: len(m[0]), reverse=True)

    async def handle(
        self, method: str, path: str, query: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, Headers, bytes]:
        response = await self.respond(method, path, query, headers, body)
        return response.status, response.headers, response.body

    async def respond(
        self, method: str, path: str, query: str, headers: Mapping[str, str], body: bytes
    ) -> PlatformResponse:
        request = PlatformRequest(method.upper(), path, query, headers, body)
        handler = self._routes.get((request.method, path))
        if handler is None and request.method == "HEAD":
            handler = self._routes.get(("GET", path))
        if handler is None:
            for prefix, mounted in self._mounts:
                if path == prefix or path.startswith(prefix + "/"):
                    handler = mounted
                    break
        if handler is None:
            if path in self._paths:
                allowed = sorted(m for (m, p) in self._routes if p == path)
                response = error_response(
                    405, "method_not_allowed", f"{path} accepts {', '.join(allowed)}", [("Allow", ", ".join(allowed))]
                )
            else:
                response = error_response(
                    404,
                    "not_found",
                    f"no platform endpoint {path}; to reach an application, send X-Berth-Project and "
                    "X-Berth-Environment headers or use the host {environment}.{project}.<domain>",
                )
        else:
            response = await handler(request)
        return response


class Readiness:
    """What /healthz reports: the first snapshot of each watch, and the
    dependencies' gRPC health as last probed in the background."""

    def __init__(self, checks: Callable[[], list[str]]) -> None:
        self._checks = checks  # returns what is not ready; [] when all is

    async def healthz(self, request: PlatformRequest) -> PlatformResponse:
        waiting = self._checks()
        if not waiting:
            return json_response(200, {"status": "ok"})
        return json_response(
            503,
            {
                "status": "unavailable",
                "not_ready": waiting,
                "error": {"code": "not_ready", "message": "the router is not ready: " + "; ".join(waiting)},
            },
        )


def build_platform(readiness: Readiness) -> Platform:
    platform = Platform()
    platform.route("GET", "/healthz", readiness.healthz)
    return platform
