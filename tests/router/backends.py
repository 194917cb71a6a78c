"""Real HTTP backends and a router running in a background event loop, for
the proxy tests (which talk to both over real sockets)."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

from services.router.platform import Platform
from services.router.proxy import ProxyServer, ProxySettings
from services.router.table import BindingEntry, EnvironmentEntry, RoutingState

T = TypeVar("T")


def wait_until(condition: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


class Backend:
    """A replica: answers JSON describing the request it received.

    ``keep_alive=False`` behaves like busybox httpd: HTTP/1.0, no
    Content-Length, closes after every response. Paths: ``/chunked`` answers
    with a chunked body, ``/hold`` waits until ``release`` is set, ``/big``
    answers ``size`` bytes, ``/never`` never answers."""

    def __init__(self, name: str, *, keep_alive: bool = True) -> None:
        self.name = name
        self.requests: list[dict[str, Any]] = []
        self.peers: set[tuple[str, int]] = set()
        self.holding = threading.Event()
        self.release = threading.Event()
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if keep_alive else "HTTP/1.0"

            def log_message(self, *args: Any) -> None:
                pass

            def _read_body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", ""):
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length", "0"))
                return self.rfile.read(length) if length else b""

            def _answer(self) -> None:
                body = self._read_body()
                backend.peers.add(self.client_address)
                seen = {
                    "backend": backend.name,
                    "method": self.command,
                    "path": self.path,
                    "headers": [[k, v] for k, v in self.headers.items()],
                    "body": body.decode("latin-1"),
                }
                backend.requests.append(seen)
                path = self.path.split("?")[0]
                if path == "/never":
                    backend.holding.set()
                    backend.release.wait(10)
                    return
                if path == "/hold":
                    backend.holding.set()
                    backend.release.wait(10)
                if path == "/big":
                    payload = b"x" * int(self.path.split("size=")[1])
                else:
                    payload = json.dumps(seen).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("X-Backend", backend.name)
                self.send_header("Keep-Alive", "timeout=5")
                self.send_header("X-Resp-Hop", "secret-hop")
                self.send_header("Connection", "X-Resp-Hop" if keep_alive else "close")
                if path == "/chunked" and keep_alive:
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    if self.command != "HEAD":
                        for i in range(0, len(payload), 7):
                            piece = payload[i : i + 7]
                            self.wfile.write(b"%x\r\n%b\r\n" % (len(piece), piece))
                        self.wfile.write(b"0\r\n\r\n")
                    return
                if keep_alive:
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_HEAD = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def refused_address() -> str:
    """An address nothing listens on (connect is refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"127.0.0.1:{port}"


class RouterHarness:
    """A ProxyServer on port 0 in its own event loop thread, with its table
    fed directly."""

    def __init__(self, settings: ProxySettings, platform: Platform | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.state = RoutingState()
        self.proxy = ProxyServer(self.state, platform or Platform(), settings)
        self.port = self.call(self.proxy.start("127.0.0.1", 0))

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def submit(self, coro: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def on_loop(self, fn: Callable[[], T]) -> T:
        async def run() -> T:
            return fn()

        return self.call(run())

    def environment(self, env_id: str, project: str, name: str, deployment_id: str, project_id: str = "") -> None:
        entry = EnvironmentEntry(env_id, project_id or f"id-{project}", project, name, deployment_id)
        self.on_loop(lambda: self.state.table.upsert_environment(entry))

    def binding(self, env_id: str, deployment_id: str, project: str, state: str = "active") -> None:
        entry = BindingEntry(f"id-{project}", env_id, deployment_id, state, True)
        self.on_loop(lambda: self.state.table.upsert_binding(entry, project))

    def endpoints(self, sets: dict[tuple[str, str], list[str]]) -> None:
        self.on_loop(lambda: self.state.endpoints.replace((e, d, a) for (e, d), a in sets.items()))

    def close(self) -> None:
        self.call(self.proxy.shutdown(1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()
