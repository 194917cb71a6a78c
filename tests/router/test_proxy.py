"""The proxy over real sockets: a router on port 0, real HTTP backends on
127.0.0.1, and clients speaking HTTP/1.1 (http.client and raw sockets)."""
from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from services.router.platform import Platform, json_response
from services.router.proxy import ProxySettings
from tests.router.backends import Backend, RouterHarness, refused_address, wait_until

HEADERS = {"X-Berth-Project": "shop", "X-Berth-Environment": "production"}


@pytest.fixture
def busybox() -> Iterator[Backend]:
    b = Backend("busybox", keep_alive=False)
    yield b
    b.close()


@pytest.fixture
def keepalive() -> Iterator[Backend]:
    b = Backend("keepalive", keep_alive=True)
    yield b
    b.close()


@pytest.fixture
def second() -> Iterator[Backend]:
    b = Backend("second", keep_alive=True)
    yield b
    b.close()


def make_router(**overrides: Any) -> RouterHarness:
    platform = Platform()

    async def healthz(request: Any) -> Any:
        return json_response(200, {"status": "ok"})

    platform.route("GET", "/healthz", healthz)
    options: dict[str, Any] = {"activation_timeout": 5.0, "upstream_timeout": 10.0, "max_body_bytes": 1024}
    settings = ProxySettings(**{**options, **overrides})
    router = RouterHarness(settings, platform)
    router.environment("env-prod", "shop", "production", "dep-a")
    router.environment("env-stg", "shop", "staging", "dep-b")
    router.environment("env-prev", "shop", "preview", "")
    router.binding("env-prod", "dep-a", "shop")
    router.binding("env-stg", "dep-b", "shop")
    return router


@pytest.fixture
def router() -> Iterator[RouterHarness]:
    r = make_router()
    yield r
    r.close()


def connect(router: RouterHarness) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", router.port, timeout=10)


def get(router: RouterHarness, path: str = "/", headers: dict[str, str] | None = None, **kw: Any):  # type: ignore[no-untyped-def]
    conn = connect(router)
    conn.request(kw.pop("method", "GET"), path, headers=HEADERS if headers is None else headers, **kw)
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp, body


def seen_headers(body: bytes) -> dict[str, str]:
    return {k.lower(): v for k, v in json.loads(body)["headers"]}


def test_proxies_to_busybox_like_backend_with_keepalive_client(router: RouterHarness, busybox: Backend) -> None:
    router.endpoints({("env-prod", "dep-a"): [busybox.address]})
    conn = connect(router)
    first_sock = None
    for i in range(4):
        conn.request("GET", f"/hello?i={i}", headers=HEADERS)
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200
        assert resp.getheader("X-Berth-Deployment") == "dep-a"
        assert resp.getheader("X-Backend") == "busybox"
        # EOF-framed upstream body, re-framed for the keep-alive client
        assert resp.getheader("Transfer-Encoding") == "chunked"
        assert json.loads(body)["path"] == f"/hello?i={i}"
        first_sock = first_sock or conn.sock
        assert conn.sock is first_sock, "the router closed the client connection"
    conn.close()
    assert router.proxy.accepted == 1
    assert len(busybox.peers) == 4  # busybox closes after each response: 4 upstream connections


def test_host_form_addressing(router: RouterHarness, keepalive: Backend) -> None:
    router.endpoints({("env-stg", "dep-b"): [keepalive.address]})
    resp, body = get(router, "/x", headers={"Host": "staging.shop.localhost:8080"})
    assert resp.status == 200
    assert resp.getheader("X-Berth-Deployment") == "dep-b"
    assert json.loads(body)["path"] == "/x"


def test_upstream_keepalive_pool_reuses_one_connection(router: RouterHarness, keepalive: Backend) -> None:
    router.endpoints({("env-prod", "dep-a"): [keepalive.address]})
    for _ in range(5):
        resp, body = get(router)
        assert resp.status == 200 and json.loads(body)["backend"] == "keepalive"
    assert router.proxy.pool.connections_opened == 1
    assert len(keepalive.peers) == 1


def test_chunked_request_and_response_bodies(router: RouterHarness, keepalive: Backend, busybox: Backend) -> None:
    router.endpoints({("env-prod", "dep-a"): [keepalive.address]})
    conn = connect(router)
    conn.request("POST", "/chunked", body=iter([b"hello ", b"chunked ", b"world"]), headers=HEADERS,
                 encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.getheader("Transfer-Encoding") == "chunked"
    body = resp.read()
    seen = json.loads(body)
    assert seen["body"] == "hello chunked world"
    assert seen_headers(body)["transfer-encoding"] == "chunked"
    # Content-Length request bodies too, on the same client connection
    conn.request("PUT", "/cl", body=b"x" * 1000, headers=HEADERS)
    resp = conn.getresponse()
    assert json.loads(resp.read())["body"] == "x" * 1000
    conn.close()


def test_large_eof_framed_response_streams_intact(busybox: Backend) -> None:
    router = make_router()
    try:
        router.endpoints({("env-prod", "dep-a"): [busybox.address]})
        resp, body = get(router, "/big?size=3000000")
        assert resp.status == 200
        assert body == b"x" * 3_000_000
    finally:
        router.close()


def test_head_request_keeps_connection_usable(router: RouterHarness, keepalive: Backend) -> None:
    router.endpoints({("env-prod", "dep-a"): [keepalive.address]})
    conn = connect(router)
    conn.request("HEAD", "/", headers=HEADERS)
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read() == b""
    conn.request("GET", "/after-head", headers=HEADERS)
    resp = conn.getresponse()
    assert json.loads(resp.read())["path"] == "/after-head"
    conn.close()


def test_pinning_a_deployment(router: RouterHarness, keepalive: Backend, second: Backend) -> None:
    router.binding("env-prod", "dep-old", "shop")
    router.endpoints({("env-prod", "dep-a"): [keepalive.address], ("env-prod", "dep-old"): [second.address]})
    resp, body = get(router, headers={**HEADERS, "X-Berth-Deployment": "dep-old"})
    assert resp.status == 200 and resp.getheader("X-Berth-Deployment") == "dep-old"
    assert json.loads(body)["backend"] == "second"
    resp, body = get(router, headers={**HEADERS, "X-Berth-Deployment": "dep-missing"})
    assert resp.status == 404
    assert json.loads(body)["error"]["code"] == "deployment_not_bound"


def test_unknown_project_is_404_json(router: RouterHarness) -> None:
    resp, body = get(router, headers={"X-Berth-Project": "nope", "X-Berth-Environment": "production"})
    assert resp.status == 404
    assert resp.getheader("Content-Type") == "application/json"
    error = json.loads(body)["error"]
    assert error["code"] == "project_not_found" and "nope" in error["message"]
    assert resp.getheader("X-Berth-Deployment") is None


def test_environment_without_deployment_is_404(router: RouterHarness) -> None:
    resp, body = get(router, headers={"X-Berth-Project": "shop", "X-Berth-Environment": "preview"})
    assert resp.status == 404
    assert "no deployment yet" in json.loads(body)["error"]["message"]


def test_no_ready_replica_is_503_with_retry_after() -> None:
    router = make_router(activation_timeout=0.2)
    try:
        resp, body = get(router)
        assert resp.status == 503
        assert resp.getheader("Retry-After") is not None and int(resp.getheader("Retry-After")) >= 1
        assert resp.getheader("X-Berth-Deployment") == "dep-a"
        assert json.loads(body)["error"]["code"] == "no_ready_replica"
    finally:
        router.close()


def test_held_request_completes_when_an_endpoint_appears(router: RouterHarness, keepalive: Backend) -> None:
    result: dict[str, Any] = {}

    def call() -> None:
        resp, body = get(router, "/held")
        result["status"], result["body"] = resp.status, body

    t = threading.Thread(target=call)
    t.start()
    wait_until(lambda: router.on_loop(lambda: router.state.endpoints.waiting) == 1, what="request held")
    router.endpoints({("env-prod", "dep-a"): [keepalive.address]})
    t.join(10)
    assert result["status"] == 200
    assert json.loads(result["body"])["path"] == "/held"


def test_refused_upstream_without_alternative_is_502(router: RouterHarness) -> None:
    router.endpoints({("env-prod", "dep-a"): [refused_address()]})
    resp, body = get(router)
    assert resp.status == 502
    assert resp.getheader("X-Berth-Deployment") == "dep-a"
    assert json.loads(body)["error"]["code"] == "upstream_unreachable"


def test_connect_failure_is_retried_on_another_address(router: RouterHarness, keepalive: Backend) -> None:
    router.endpoints({("env-prod", "dep-a"): [refused_address(), keepalive.address]})
    statuses = [get(router)[0].status for _ in range(12)]
    assert statuses == [200] * 12
    assert len(keepalive.requests) == 12


def test_oversized_bodies_are_413(router: RouterHarness, keepalive: Backend) -> None:
    router.endpoints({("env-prod", "dep-a"): [keepalive.address]})
    resp, body = get(router, method="POST", body=b"x" * 2000)
    assert resp.status == 413
    assert json.loads(body)["error"]["code"] == "body_too_large"
    resp, body = get(router, method="POST", body=iter([b"y" * 600, b"y" * 600]), encode_chunked=True)
    assert resp.status == 413
    assert all(r["body"] == "" or len(r["body"]) <= 1024 for r in keepalive.requests)


def test_forwarded_headers_and_hop_by_hop(router: RouterHarness, keepalive: Backend) -> None:
    router.endpoints({("env-prod", "dep-a"): [keepalive.address]})
    resp, body = get(
        router,
        headers={
            **HEADERS,
            "Host": "example.test",
            "Connection": "keep-alive, X-Custom-Hop",
            "X-Custom-Hop": "1",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic abc",
            "X-Forwarded-For": "10.0.0.7",
            "X-End-To-End": "kept",
        },
    )
    assert resp.status == 200
    seen = seen_headers(body)
    assert seen["x-forwarded-for"] == "10.0.0.7, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == "example.test"
    assert seen["host"] == "example.test"
    assert seen["x-end-to-end"] == "kept"
    for hop in ("connection", "x-custom-hop", "keep-alive", "te", "proxy-authorization", "upgrade"):
        assert hop not in seen, hop
    # and on the way back
    assert resp.getheader("Keep-Alive") is None
    assert resp.getheader("X-Resp-Hop") is None
    assert resp.getheader("X-Backend") == "keepalive"


def test_in_flight_request_finishes_on_its_deployment_after_pointer_moves(
    router: RouterHarness, keepalive: Backend, second: Backend
) -> None:
    router.binding("env-prod", "dep-new", "shop")
    router.endpoints({("env-prod", "dep-a"): [keepalive.address], ("env-prod", "dep-new"): [second.address]})
    result: dict[str, Any] = {}

    def call() -> None:
        resp, body = get(router, "/hold")
        result["deployment"], result["body"] = resp.getheader("X-Berth-Deployment"), body

    t = threading.Thread(target=call)
    t.start()
    assert keepalive.holding.wait(10)
    router.environment("env-prod", "shop", "production", "dep-new")  # the pointer moves
    resp, body = get(router, "/after-move")
    assert resp.getheader("X-Berth-Deployment") == "dep-new" and json.loads(body)["backend"] == "second"
    keepalive.release.set()
    t.join(10)
    assert result["deployment"] == "dep-a"
    assert json.loads(result["body"])["backend"] == "keepalive"


def test_upstream_timeout_is_504(keepalive: Backend) -> None:
    router = make_router(upstream_timeout=0.3)
    try:
        router.endpoints({("env-prod", "dep-a"): [keepalive.address]})
        resp, body = get(router, "/never")
        assert resp.status == 504
        assert json.loads(body)["error"]["code"] == "upstream_timeout"
    finally:
        keepalive.release.set()
        router.close()


def test_platform_endpoint_without_routing_headers(router: RouterHarness) -> None:
    resp, body = get(router, "/healthz", headers={"Host": "localhost:8080"})
    assert resp.status == 200 and json.loads(body) == {"status": "ok"}
    resp, body = get(router, "/nothing-here", headers={"Host": "localhost:8080"})
    assert resp.status == 404 and json.loads(body)["error"]["code"] == "not_found"


def test_malformed_request_is_400(router: RouterHarness) -> None:
    with socket.create_connection(("127.0.0.1", router.port), timeout=10) as s:
        s.sendall(b"GARBAGE\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 400 ")


def test_graceful_shutdown_lets_in_flight_request_finish(keepalive: Backend) -> None:
    router = make_router()
    router.endpoints({("env-prod", "dep-a"): [keepalive.address]})
    result: dict[str, Any] = {}

    def call() -> None:
        resp, body = get(router, "/hold")
        result["status"], result["conn"] = resp.status, resp.getheader("Connection")

    t = threading.Thread(target=call)
    t.start()
    assert keepalive.holding.wait(10)
    idle = socket.create_connection(("127.0.0.1", router.port), timeout=10)
    wait_until(lambda: router.proxy.accepted == 2, what="idle connection accepted")
    stopping = router.submit(router.proxy.shutdown(10.0))
    assert idle.recv(1) == b""  # idle keep-alive connections are closed at once
    idle.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", router.port), timeout=2)
    assert not stopping.done()
    keepalive.release.set()
    t.join(10)
    stopping.result(10)
    assert result == {"status": 200, "conn": "close"}
    router.loop.call_soon_threadsafe(router.loop.stop)
