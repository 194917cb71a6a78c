"""The proxy's fast path (a request sent from the parser callback on a
pooled keep-alive connection, finished from the replica's callbacks) hands
every failure over to the general path. These requests all reuse a pooled
connection, so they take the fast path; the same failures on a fresh
connection are covered in test_proxy.py and test_ingress_features.py."""
from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from services.router.platform import Platform
from services.router.proxy import ProxySettings
from tests.router.backends import Backend, RouterHarness, wait_until

HEADERS = {"X-Berth-Project": "shop", "X-Berth-Environment": "production"}


def make_router(**overrides: Any) -> RouterHarness:
    settings = ProxySettings(**{"activation_timeout": 5.0, "upstream_timeout": 10.0, **overrides})
    router = RouterHarness(settings, Platform())
    router.environment("env-prod", "shop", "production", "dep-a")
    router.binding("env-prod", "dep-a", "shop")
    return router


def get(router: RouterHarness, path: str = "/") -> tuple[http.client.HTTPResponse, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", router.port, timeout=10)
    try:
        conn.request("GET", path, headers=HEADERS)
        resp = conn.getresponse()
        return resp, resp.read()
    finally:
        conn.close()


def pool_one_connection(router: RouterHarness, backend_address: str) -> None:
    router.endpoints({("env-prod", "dep-a"): [backend_address]})
    resp, _ = get(router)
    assert resp.status == 200
    wait_until(lambda: router.on_loop(lambda: router.proxy.pool.idle_count(backend_address)) == 1,
               what="the replica connection back in the pool")


@pytest.fixture
def backend() -> Iterator[Backend]:
    b = Backend("keepalive")
    yield b
    b.close()


def test_upstream_timeout_on_a_pooled_connection_is_504(backend: Backend) -> None:
    router = make_router(upstream_timeout=0.3)
    try:
        pool_one_connection(router, backend.address)
        resp, body = get(router, "/never")
        assert resp.status == 504 and json.loads(body)["error"]["code"] == "upstream_timeout"
        assert router.proxy.pool.connections_opened == 1  # it was the pooled connection that timed out
        backend.release.set()
        resp, body = get(router)
        assert resp.status == 200 and json.loads(body)["backend"] == "keepalive"
    finally:
        backend.release.set()
        router.close()


class SecondRequestDropper:
    """Answers the first request of each connection (keep-alive) and closes
    the connection, unanswered, when a second request arrives on it: to the
    router, a pooled connection that turned out to be stale."""

    RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nfresh"

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted = 0
        self.dropped = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                data += chunk
            conn.sendall(self.RESPONSE)
            if conn.recv(4096):
                self.dropped += 1

    def close(self) -> None:
        self.sock.close()


def test_stale_pooled_connection_is_replayed_on_a_fresh_one() -> None:
    dropper = SecondRequestDropper()
    router = make_router()
    try:
        pool_one_connection(router, dropper.address)
        resp, body = get(router)
        assert resp.status == 200 and body == b"fresh"
        assert dropper.dropped == 1 and dropper.accepted == 2
        wait_until(lambda: router.on_loop(lambda: router.proxy.pool.outstanding) == {}, what="no request outstanding")
    finally:
        router.close()
        dropper.close()


def test_client_gone_during_a_pooled_exchange_frees_everything(backend: Backend) -> None:
    router = make_router()
    try:
        pool_one_connection(router, backend.address)
        client = socket.create_connection(("127.0.0.1", router.port), timeout=10)
        client.sendall(b"GET /hold HTTP/1.1\r\nHost: x\r\nX-Berth-Project: shop\r\n"
                       b"X-Berth-Environment: production\r\n\r\n")
        assert backend.holding.wait(10)
        assert router.on_loop(lambda: router.proxy.load.in_flight) == 1
        client.close()
        wait_until(lambda: router.on_loop(lambda: router.proxy.load.in_flight) == 0, what="the request ended")
        assert router.on_loop(lambda: router.proxy.pool.outstanding) == {}
        # the replica connection carrying the abandoned answer is not reused
        assert router.on_loop(lambda: router.proxy.pool.idle_count(backend.address)) == 0
        backend.release.set()
        resp, body = get(router)
        assert resp.status == 200 and json.loads(body)["backend"] == "keepalive"
    finally:
        backend.release.set()
        router.close()
