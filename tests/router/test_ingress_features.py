"""Router features over real sockets, without Docker: WebSocket tunnels,
fallback to the previous deployment, replicas leaving the pool while they
serve, activation, load reports, metrics and the access log."""
from __future__ import annotations

import asyncio
import http.client
import json
import logging
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest

from berth.internal.v1 import scheduler_internal_pb2, scheduler_internal_pb2_grpc
from services.router.control import Activator, LoadReporter, LoadTracker, SchedulerLink
from services.router.metrics import RouterMetrics
from services.router.platform import Platform
from services.router.proxy import ProxySettings
from services.router.table import EnvironmentEntry, Route
from tests.router.backends import Backend, RouterHarness, wait_until

HEADERS = {"X-Berth-Project": "shop", "X-Berth-Environment": "production"}


class UpgradeBackend:
    """Answers an upgrade request with 101 plus a greeting, then echoes
    every byte it receives prefixed with ``echo:``."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.heads: list[bytes] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            self.heads.append(head)
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Accept: test\r\n\r\nhello")
            if rest:
                conn.sendall(b"echo:" + rest)
            while True:
                chunk = conn.recv(4096)
                if not chunk or chunk == b"bye":
                    return
                conn.sendall(b"echo:" + chunk)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def harness() -> Iterator[RouterHarness]:
    r = RouterHarness(ProxySettings(activation_timeout=5.0, upstream_timeout=10.0), Platform())
    r.environment("env-prod", "shop", "production", "dep-a")
    r.binding("env-prod", "dep-a", "shop")
    yield r
    r.close()


def recv_until(sock: socket.socket, marker: bytes, limit: int = 65536) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
        assert len(data) < limit
    return data


def test_websocket_upgrade_is_tunnelled_both_ways(harness: RouterHarness) -> None:
    backend = UpgradeBackend()
    try:
        harness.endpoints({("env-prod", "dep-a"): [backend.address]})
        with socket.create_connection(("127.0.0.1", harness.port), timeout=10) as s:
            # The first frame travels in the same packet as the request head.
            s.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nX-Berth-Project: shop\r\nX-Berth-Environment: production\r\n"
                      b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: abc\r\n"
                      b"Sec-WebSocket-Version: 13\r\n\r\nearly")
            data = recv_until(s, b"echo:early")
            head, _, after = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101")
            lines = head.lower().split(b"\r\n")
            assert b"upgrade: websocket" in lines and b"connection: upgrade" in lines
            assert b"x-berth-deployment: dep-a" in lines
            assert after.startswith(b"hello")
            for i in range(3):
                s.sendall(b"frame%d" % i)
                assert recv_until(s, b"echo:frame%d" % i).endswith(b"echo:frame%d" % i)
            s.sendall(b"bye")  # the backend closes: so does the router's side
            s.settimeout(5)
            assert s.recv(100) == b""
        sent = backend.heads[0].lower()
        assert b"upgrade: websocket" in sent and b"connection: upgrade" in sent and b"sec-websocket-key: abc" in sent
    finally:
        backend.close()


def test_upgrade_refused_by_replica_is_relayed_then_closed(harness: RouterHarness) -> None:
    backend = Backend("plain", keep_alive=True)
    try:
        harness.endpoints({("env-prod", "dep-a"): [backend.address]})
        with socket.create_connection(("127.0.0.1", harness.port), timeout=10) as s:
            s.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nX-Berth-Project: shop\r\nX-Berth-Environment: production\r\n"
                      b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        assert data.startswith(b"HTTP/1.1 200") and b'"backend": "plain"' in data
    finally:
        backend.close()


def test_failed_binding_falls_back_to_previous_deployment(harness: RouterHarness) -> None:
    old, new = Backend("old"), Backend("new")
    try:
        entry = EnvironmentEntry("env-prod", "id-shop", "shop", "production", "dep-b", sequence=2,
                                 previous_deployment_id="dep-a")
        harness.on_loop(lambda: harness.state.table.upsert_environment(entry))
        harness.binding("env-prod", "dep-b", "shop")

        def endpoints(status_b: str, b_addresses: list[str]) -> None:
            harness.on_loop(lambda: harness.state.endpoints.replace(
                [("env-prod", "dep-a", [old.address]), ("env-prod", "dep-b", b_addresses)],
                {("env-prod", "dep-b"): status_b, ("env-prod", "dep-a"): "running"},
            ))

        endpoints("failed", [])
        resp, body = request(harness)
        assert resp.status == 200 and json.loads(body)["backend"] == "old"
        assert resp.getheader("X-Berth-Deployment") == "dep-a" and resp.getheader("X-Berth-Fallback") == "1"
        # Pinned requests never fall back.
        resp, _ = request(harness, headers={**HEADERS, "X-Berth-Deployment": "dep-b"}, timeout=0.5)
        assert resp is None  # held for dep-b's own replicas, not answered by dep-a
        endpoints("running", [new.address])
        resp, body = request(harness)
        assert json.loads(body)["backend"] == "new" and resp.getheader("X-Berth-Fallback") is None
    finally:
        old.close()
        new.close()


def request(harness: RouterHarness, path: str = "/", headers: dict[str, str] | None = None,
            timeout: float = 10) -> tuple[http.client.HTTPResponse, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", harness.port, timeout=timeout)
    try:
        conn.request("GET", path, headers=HEADERS if headers is None else headers)
        resp = conn.getresponse()
        return resp, resp.read()
    except TimeoutError:
        return None, b""  # type: ignore[return-value]
    finally:
        conn.close()


def test_replica_leaving_the_pool_finishes_in_flight_and_gets_nothing_new(harness: RouterHarness) -> None:
    leaving, staying = Backend("leaving"), Backend("staying")
    try:
        harness.endpoints({("env-prod", "dep-a"): [leaving.address]})
        with ThreadPoolExecutor(4) as pool:
            held = pool.submit(request, harness, "/hold")
            assert leaving.holding.wait(5)
            # Scale-down: the address leaves the endpoint set; idle pooled
            # connections to it are closed, the in-flight one is not.
            harness.on_loop(lambda: harness.proxy.pool.forget(
                harness.state.endpoints.replace([("env-prod", "dep-a", [staying.address])])
            ))
            answers = [request(harness) for _ in range(10)]
            assert [json.loads(b)["backend"] for _, b in answers] == ["staying"] * 10
            assert not held.done()
            leaving.release.set()
            resp, body = held.result(10)
        assert resp.status == 200 and json.loads(body)["backend"] == "leaving"
        assert len(leaving.requests) == 1
    finally:
        leaving.close()
        staying.close()


def test_activation_is_asked_once_per_binding_and_held_requests_complete(harness: RouterHarness) -> None:
    backend = Backend("cold")
    calls: list[Route] = []

    async def activate(route: Route) -> str:
        calls.append(route)
        return "deploying"

    harness.proxy.activator = Activator(activate, hold=5.0)
    try:
        with ThreadPoolExecutor(6) as pool:
            held = [pool.submit(request, harness) for _ in range(6)]
            wait_until(lambda: harness.state.endpoints.waiting == 6, what="6 requests held")
            harness.endpoints({("env-prod", "dep-a"): [backend.address]})
            answers = [f.result(10) for f in held]
        assert [r.status for r, _ in answers] == [200] * 6
        assert [(c.environment_id, c.deployment_id, c.project_id) for c in calls] == [("env-prod", "dep-a", "id-shop")]
    finally:
        backend.close()


def test_no_replica_within_activation_timeout_is_503_with_retry_after() -> None:
    r = RouterHarness(ProxySettings(activation_timeout=0.3), Platform())
    try:
        r.environment("env-prod", "shop", "production", "dep-a")
        r.binding("env-prod", "dep-a", "shop")
        link = SchedulerLink("127.0.0.1:1", "berth_svc_x")  # nothing listens: activation fails, routing does not
        r.proxy.activator = Activator(link.activate, hold=0.3)
        resp, body = request(r)
        assert resp.status == 503 and int(resp.getheader("Retry-After")) >= 1
        assert json.loads(body)["error"]["code"] == "no_ready_replica"
        r.call(link.close())
    finally:
        r.close()


class NoLoadScheduler(scheduler_internal_pb2_grpc.SchedulerInternalServicer):
    """A scheduler that has not implemented ReportLoad/Activate yet."""


class RecordingScheduler(scheduler_internal_pb2_grpc.SchedulerInternalServicer):
    def __init__(self) -> None:
        self.reports: list[scheduler_internal_pb2.ReportLoadRequest] = []
        self.tokens: list[str] = []

    async def ReportLoad(self, request, context):  # type: ignore[no-untyped-def,override]
        self.tokens.append(dict(context.invocation_metadata()).get("x-api-key", ""))
        self.reports.append(request)
        return scheduler_internal_pb2.ReportLoadResponse()


async def _serve(servicer: Any) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    scheduler_internal_pb2_grpc.add_SchedulerInternalServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def route(env: str = "env-1", dep: str = "dep-1") -> Route:
    return Route("prj-1", "shop", env, "production", dep)


async def test_load_reports_carry_in_flight_and_completed_then_a_final_zero() -> None:
    scheduler = RecordingScheduler()
    server, port = await _serve(scheduler)
    link = SchedulerLink(f"127.0.0.1:{port}", "berth_svc_token")
    tracker = LoadTracker()
    reporter = LoadReporter(tracker, link.report_load, interval=0.01)
    try:
        loads = [tracker.begin(route()) for _ in range(3)]
        tracker.end(loads[0])
        await reporter.tick()
        await reporter.tick()  # still 2 in flight
        for load in loads[1:]:
            tracker.end(load)
        await reporter.tick()  # 2 completed, 0 in flight
        await reporter.tick()  # quiet: a final zero
        await reporter.tick()  # nothing to say: no call
        seen = [[(b.environment_id, b.deployment_id, b.project_id, b.in_flight, b.requests) for b in r.bindings]
                for r in scheduler.reports]
        assert seen == [
            [("env-1", "dep-1", "prj-1", 2, 1)],
            [("env-1", "dep-1", "prj-1", 2, 0)],
            [("env-1", "dep-1", "prj-1", 0, 2)],
            [("env-1", "dep-1", "prj-1", 0, 0)],
        ]
        assert set(scheduler.tokens) == {"berth_svc_token"}
    finally:
        await link.close()
        await server.stop(0)


async def test_unimplemented_scheduler_breaks_neither_reports_nor_activation(caplog: Any) -> None:
    server, port = await _serve(NoLoadScheduler())
    link = SchedulerLink(f"127.0.0.1:{port}", "berth_svc_token")
    tracker = LoadTracker()
    reporter = LoadReporter(tracker, link.report_load)
    activator = Activator(link.activate, hold=10)
    try:
        with caplog.at_level(logging.DEBUG, logger="berth.router.control"):
            for _ in range(3):
                tracker.end(tracker.begin(route()))
                await reporter.tick()
            activator.request(route())
            activator.request(route())  # within the hold period: not asked again
            activator.request(route(dep="dep-2"))
            await asyncio.sleep(0)
            await asyncio.gather(*activator._tasks)
        assert reporter.reports == 0 and activator.calls == 2
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert [r.getMessage() for r in warnings] == ["load_report_failed", "activation_failed"]
        assert all(r.code == "UNIMPLEMENTED" for r in warnings)  # type: ignore[attr-defined]
    finally:
        await activator.close()
        await link.close()
        await server.stop(0)


def test_metrics_and_access_log(harness: RouterHarness, caplog: Any) -> None:
    backend = Backend("m")
    metrics = RouterMetrics(harness.state, harness.proxy.load)
    harness.proxy.metrics = metrics
    harness.proxy.platform.route("GET", "/metrics", metrics.handle)
    try:
        harness.endpoints({("env-prod", "dep-a"): [backend.address]})
        harness.state.revision = 42
        secret_headers = {**HEADERS, "X-API-KEY": "berth_pk_SHOULD-NOT-LEAK", "Authorization": "Bearer tok-LEAK",
                          "Cookie": "session=cookie-LEAK"}
        with caplog.at_level(logging.INFO, logger="berth.router.access"):
            for _ in range(3):
                resp, _ = request(harness, "/?token=query-LEAK", headers=secret_headers)
                assert resp.status == 200
            resp, _ = request(harness, headers={"X-Berth-Project": "nope", "X-Berth-Environment": "x"})
            assert resp.status == 404
        logged = "\n".join(json.dumps(r.__dict__, default=str) for r in caplog.records)
        assert caplog.records and "LEAK" not in logged
        assert any(getattr(r, "status", None) == 200 and getattr(r, "deployment", "") == "dep-a"
                   for r in caplog.records)
        resp, body = request(harness, "/metrics", headers={})
        text = body.decode()
        assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/plain")
        assert ('berth_router_requests_total{deployment="dep-a",environment="production",project="shop",'
                'status_class="2xx"} 3.0') in text
        assert 'berth_router_request_duration_seconds_bucket{deployment="dep-a",environment="production",' in text
        assert 'status_class="4xx"' in text
        assert "berth_router_pointer_table_revision 42.0" in text
        assert "berth_router_in_flight_total" in text
    finally:
        backend.close()


class DyingBackend:
    """Accepts, reads the request, then resets the connection without a byte
    of answer (a replica killed while stopping)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.recv(65536)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            conn.close()  # RST

    def close(self) -> None:
        self.sock.close()


def test_idempotent_request_cut_before_any_answer_is_retried_elsewhere(harness: RouterHarness) -> None:
    dying, healthy = DyingBackend(), Backend("healthy")
    try:
        harness.endpoints({("env-prod", "dep-a"): [dying.address, healthy.address]})
        for _ in range(40):  # ties are broken at random: the dying one is tried (all but surely)
            resp, body = request(harness)
            assert resp.status == 200 and json.loads(body)["backend"] == "healthy"
        assert dying.accepted >= 1
        # A request with a body is never replayed: 502.
        harness.endpoints({("env-prod", "dep-a"): [dying.address]})
        conn = http.client.HTTPConnection("127.0.0.1", harness.port, timeout=10)
        conn.request("POST", "/", body=b"x", headers=HEADERS)
        resp = conn.getresponse()
        assert resp.status == 502 and json.loads(resp.read())["error"]["code"] == "upstream_failed"
        conn.close()
    finally:
        dying.close()
        healthy.close()


class BlackHoleBackend:
    """Takes requests and never answers nor closes; ``vanish()`` stops
    listening (probes fail) while the taken connections stay silent, like a
    container removed with its network."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.taken: list[socket.socket] = []
        self.got_request = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.taken.append(conn)
            conn.recv(65536)
            self.got_request.set()

    def vanish(self) -> None:
        self.sock.close()

    def close(self) -> None:
        self.vanish()
        for conn in self.taken:
            conn.close()


def test_in_flight_request_on_a_vanished_replica_is_retried_not_hung(harness: RouterHarness) -> None:
    hole, healthy = BlackHoleBackend(), Backend("healthy")
    harness.proxy.pool.gone_probe_interval = 0.2
    try:
        harness.endpoints({("env-prod", "dep-a"): [hole.address]})
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(request, harness)
            assert hole.got_request.wait(5)
            hole.vanish()
            harness.on_loop(lambda: harness.proxy.pool.forget(
                harness.state.endpoints.replace([("env-prod", "dep-a", [healthy.address])])
            ))
            resp, body = pending.result(10)  # well before the 10 s upstream timeout
        assert resp.status == 200 and json.loads(body)["backend"] == "healthy"
    finally:
        hole.close()
        healthy.close()


def test_before_the_routing_table_is_loaded_requests_get_503_not_404(harness: RouterHarness) -> None:
    """A router that has just started has an empty table: that means "not
    loaded yet" (retry), never "no such project"."""
    backend = Backend("loaded")
    try:
        harness.endpoints({("env-prod", "dep-a"): [backend.address]})
        harness.state.loaded = False
        resp, body = request(harness)
        assert resp.status == 503 and json.loads(body)["error"]["code"] == "router_starting"
        assert resp.getheader("Retry-After") == "1"
        resp, _ = request(harness, headers={"X-Berth-Project": "nope", "X-Berth-Environment": "x"})
        assert resp.status == 503
        harness.state.loaded = True
        resp, body = request(harness)
        assert resp.status == 200 and resp.getheader("X-Berth-Deployment") == "dep-a"
    finally:
        backend.close()
