"""The HTTP ingress: an asyncio Protocol server parsing requests with
httptools (llhttp), and a pool of keep-alive connections per upstream replica.

Bodies are streamed both ways with back-pressure (a slow reader pauses the
other side's socket). Responses framed by EOF (busybox httpd) are re-framed as
chunked for HTTP/1.1 clients, so the client's connection stays alive.
Upgrades (WebSocket) are relayed, and after the replica's 101 the two
connections become a byte tunnel until either side closes.

A request is bound to the route (environment, deployment) resolved when its
head arrived and finishes there; replicas are chosen among the addresses
ready *now*, so an address that left the endpoint set gets no new request
while the ones it is serving finish.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus

import httptools

from services.router.control import Activator, LoadTracker
from services.router.metrics import RouterMetrics
from services.router.platform import Platform
from services.router.table import Route, RouteError, RoutingState, parse_host

log = logging.getLogger("berth.router.proxy")
access_log = logging.getLogger("berth.router.access")

# Headers meaningful for one connection only (RFC 9110 §7.6.1), plus the
# proxy's own concerns; never forwarded in either direction.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Set by the router itself on the way in.
OVERRIDDEN_REQUEST = frozenset({b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-for", b"expect"})

BODY_BUFFER_HIGH = 256 * 1024  # pause reading the client beyond this many unforwarded bytes
MAX_PENDING_REQUESTS = 4  # requests parsed ahead (pipelining) before the client's socket is paused
MAX_IDLE_PER_ADDRESS = 64
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
MAX_REPLICA_RETRIES = 3
NO_BODY_STATUSES = frozenset({204, 304})


class ProxyError(Exception):
    def __init__(self, status: int, code: str, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


class _ConnectFailed(Exception):
    """The replica never received the request: safe to try another."""


class _ReplicaGone(Exception):
    """The replica closed or reset the connection before sending one byte of
    an answer to an idempotent request without a body (typically: it was
    stopped while leaving the pool). Like nginx's ``proxy_next_upstream
    error``, the request is tried on another ready replica."""


class _StaleConnection(Exception):
    """A reused keep-alive connection was closed by the replica before it
    sent anything back: the request may be replayed on a fresh connection."""


@dataclass
class ProxySettings:
    domain: str = "localhost"
    activation_timeout: float = 30.0
    upstream_timeout: float = 60.0
    max_body_bytes: int = 10 * 1024 * 1024
    connect_timeout: float = 5.0
    keepalive_timeout: float = 75.0  # idle client connections
    upstream_idle_timeout: float = 30.0  # idle pooled upstream connections


# --------------------------------------------------------------------------
# Request side
# --------------------------------------------------------------------------


class RequestBody:
    """The request body as the client sends it. Until a consumer attaches,
    chunks are buffered (reading pauses beyond a bound); once attached they are
    handed straight to it."""

    def __init__(self, conn: ClientConnection, *, expect_continue: bool) -> None:
        self._conn = conn
        self._buffer: deque[bytes] = deque()
        self._buffered = 0
        self.received = 0
        self.complete = False
        self.too_large = False
        self.limit = conn.server.settings.max_body_bytes
        self._sink: Callable[[bytes], None] | None = None
        self._on_end: Callable[[], None] | None = None
        self._on_too_large: Callable[[], None] | None = None
        self._expect_continue = expect_continue
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def empty(self) -> bool:
        return self.complete and self.received == 0

    def feed(self, data: bytes) -> None:
        if self.too_large:
            return
        self.received += len(data)
        if self.received > self.limit:
            self.too_large = True
            self._buffer.clear()
            self._conn.pause_reading("too_large")
            if self._on_too_large is not None:
                self._on_too_large()
            if not self._done.done():
                self._done.set_result(None)
            return
        if self._sink is not None:
            self._sink(data)
            return
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered > BODY_BUFFER_HIGH:
            self._conn.pause_reading("body")

    def finish(self) -> None:
        self.complete = True
        if self._sink is not None and self._on_end is not None and not self.too_large:
            self._on_end()
        if not self._done.done():
            self._done.set_result(None)

    def _send_continue(self) -> None:
        if self._expect_continue and not self.complete:
            self._expect_continue = False
            self._conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def attach(self, sink: Callable[[bytes], None], on_end: Callable[[], None], on_too_large: Callable[[], None]) -> None:
        self._sink, self._on_end, self._on_too_large = sink, on_end, on_too_large
        while self._buffer:
            sink(self._buffer.popleft())
        self._buffered = 0
        self._conn.resume_reading("body")
        if self.too_large:
            on_too_large()
        elif self.complete:
            on_end()
        else:
            self._send_continue()

    def detach(self) -> None:
        self._sink = self._on_end = self._on_too_large = None

    async def read_all(self) -> bytes:
        """The whole body (for the platform's own endpoints)."""
        chunks: list[bytes] = []
        self._sink = chunks.append
        self._on_end = lambda: None
        while self._buffer:
            chunks.append(self._buffer.popleft())
        self._buffered = 0
        self._conn.resume_reading("body")
        self._send_continue()
        await self._done
        self.detach()
        if self.too_large:
            raise ProxyError(413, "body_too_large", f"request body exceeds the router's limit of {self.limit} bytes")
        return b"".join(chunks)


@dataclass
class Request:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    version: str
    keep_alive: bool
    body: RequestBody
    content_length: int | None
    chunked: bool
    upgrade: bool = False
    started: float = field(default_factory=time.perf_counter)
    fallback: bool = False  # served by the previous deployment (the current one failed)

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


class ClientConnection(asyncio.Protocol):
    """One client connection: parses requests and serves them in order."""

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._incoming: Request | None = None
        self._pending: deque[Request] = deque()
        self._worker: asyncio.Task[None] | None = None
        self._pause_reasons: set[str] = set()
        self._write_paused = False
        self.upstream_transport: asyncio.Transport | None = None  # paused while the client is slow
        self._idle_timer: asyncio.TimerHandle | None = None
        self._broken = False  # unparseable input: stop after what is in flight
        self.closed = False
        self.written = 0  # bytes written to the client so far
        self.upgrade_buffer = b""  # bytes after an upgrade request's head (the new protocol's first bytes)
        self.tunnel: UpstreamConnection | None = None  # after a 101: raw bytes go straight there
        self._corked: list[bytes] | None = None  # writes gathered into one send (see cork)

    # -- transport ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""
        self.server.connections.add(self)
        self.server.accepted += 1
        self._arm_idle_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_idle_timer()
        if self.tunnel is not None:
            self.tunnel.close()
        self.server.connection_gone(self)
        if self._worker is not None:
            self._worker.cancel()
        if self.upstream_transport is not None:
            self.upstream_transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.write(data)
            return
        if self._broken:
            if self.upgrade_buffer or "upgrade" in self._pause_reasons:
                self.upgrade_buffer += data  # arrived before the pause took effect
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # The request itself was parsed; what follows is another protocol.
            # Held until the replica answers: a 101 turns this connection into
            # a tunnel (see Exchange.start_tunnel); anything else is served
            # and the connection closes.
            self._broken = True
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            self.upgrade_buffer = data[offset:]
            self.pause_reading("upgrade")
        except httptools.HttpParserError as exc:
            self._broken = True
            self.pause_reading("broken")
            if self._incoming is not None:
                # Garbage inside a request being received: it can never complete.
                self.abort()
            elif not self._pending and self._worker is None:
                self.write_error(400, "bad_request", f"malformed HTTP request: {exc}", close=True)
                self.close()
            # else: requests already parsed are served, then the connection closes.

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.upstream_transport is not None:
            self.upstream_transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.upstream_transport is not None:
            self.upstream_transport.resume_reading()

    def pause_reading(self, reason: str) -> None:
        if not self._pause_reasons and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self._pause_reasons.add(reason)

    def resume_reading(self, reason: str) -> None:
        if reason not in self._pause_reasons:
            return
        self._pause_reasons.discard(reason)
        if not self._pause_reasons and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.written += len(data)
            if self._corked is not None:
                self._corked.append(data)
            else:
                self.transport.write(data)

    def cork(self) -> bool:
        """Gathers writes until ``uncork``: a response head and the body that
        arrived with it leave in one send. Returns False when already corked."""
        if self._corked is not None:
            return False
        self._corked = []
        return True

    def uncork(self) -> None:
        pending, self._corked = self._corked, None
        if pending and not self.closed and self.transport is not None:
            self.transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()

    @property
    def idle(self) -> bool:
        return self._incoming is None and not self._pending and self._worker is None

    def _arm_idle_timer(self) -> None:
        self._cancel_idle_timer()
        self._idle_timer = asyncio.get_running_loop().call_later(
            self.server.settings.keepalive_timeout, self._idle_expired
        )

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _idle_expired(self) -> None:
        if self.idle:
            self.close()

    # -- parser callbacks --------------------------------------------------
    def on_message_begin(self) -> None:
        self._cancel_idle_timer()
        self._url = b""
        self._headers = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        content_length: int | None = None
        chunked = False
        expect_continue = False
        for name, value in self._headers:
            lname = name.lower()
            if lname == b"content-length":
                content_length = int(value)
            elif lname == b"transfer-encoding":
                chunked = chunked or b"chunked" in value.lower()
            elif lname == b"expect":
                expect_continue = value.strip().lower() == b"100-continue"
        body = RequestBody(self, expect_continue=expect_continue)
        request = Request(
            method=self._parser.get_method(),
            target=self._url,
            headers=self._headers,
            version=self._parser.get_http_version(),
            keep_alive=self._parser.should_keep_alive(),
            body=body,
            content_length=content_length,
            chunked=chunked,
            upgrade=self._parser.should_upgrade(),
        )
        self._incoming = request
        self._pending.append(request)
        if len(self._pending) >= MAX_PENDING_REQUESTS:
            self.pause_reading("pipeline")
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._serve())

    def on_body(self, data: bytes) -> None:
        if self._incoming is not None:
            self._incoming.body.feed(data)

    def on_message_complete(self) -> None:
        if self._incoming is not None:
            self._incoming.body.finish()
            self._incoming = None

    # -- serving -----------------------------------------------------------
    async def _serve(self) -> None:
        try:
            while self._pending:
                request = self._pending[0]
                written_before = self.written
                try:
                    keep_alive = await self.server.handle(self, request)
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001 - a bug must not hang the client: 500, then close
                    log.exception("request_failed")
                    if self.written == written_before:
                        self.write_error(500, "internal", "the router failed on this request; see its log", close=True)
                        self.close()
                    else:
                        self.abort()
                    return
                self._pending.popleft()
                if len(self._pending) < MAX_PENDING_REQUESTS:
                    self.resume_reading("pipeline")
                if not keep_alive or self._broken or self.server.closing:
                    self.close()
                    return
        except asyncio.CancelledError:
            return
        finally:
            self._worker = None
        if not self.closed:
            self._arm_idle_timer()

    def keep_alive_after(self, request: Request) -> bool:
        """Whether the connection may serve another request after this one."""
        return (
            request.keep_alive
            and not request.upgrade
            and not self._broken
            and not self.server.closing
            and request.body.complete
            and not request.body.too_large
        )

    def write_response(
        self,
        request: Request | None,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        *,
        close: bool = False,
    ) -> bool:
        """Writes a complete response; returns whether the connection stays open."""
        keep = not close and request is not None and self.keep_alive_after(request)
        head = [b"HTTP/1.1 %d %s\r\n" % (status, _reason(status))]
        for name, value in headers:
            head.append(name + b": " + value + b"\r\n")
        head_only = request is not None and request.method == b"HEAD"
        head.append(b"Content-Length: %d\r\n" % len(body))
        if not keep:
            head.append(b"Connection: close\r\n")
        elif request is not None and request.version == "1.0":
            head.append(b"Connection: keep-alive\r\n")
        head.append(b"\r\n")
        if not head_only:
            head.append(body)
        self.write(b"".join(head))
        return keep

    def write_error(
        self,
        status: int,
        code: str,
        message: str,
        *,
        request: Request | None = None,
        deployment_id: str = "",
        retry_after: int | None = None,
        close: bool = False,
    ) -> bool:
        headers = [(b"Content-Type", b"application/json")]
        if deployment_id:
            headers.append((b"X-Berth-Deployment", deployment_id.encode()))
        if retry_after is not None:
            headers.append((b"Retry-After", str(retry_after).encode()))
        body = json.dumps({"error": {"code": code, "message": message}}).encode()
        return self.write_response(request, status, headers, body, close=close)


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


# --------------------------------------------------------------------------
# Upstream side
# --------------------------------------------------------------------------


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to a replica, carrying one exchange at a time."""

    def __init__(self, pool: UpstreamPool, address: str) -> None:
        self.pool = pool
        self.address = address
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
        self.closed = False
        self.uses = 0
        self._parser = httptools.HttpResponseParser(self)
        # Workers such as busybox httpd CGIs end header lines with a bare LF;
        # accept that from replicas, as nginx does (clients stay strict).
        self._parser.set_dangerous_leniencies(lenient_optional_cr_before_lf=True)
        self._idle_timer: asyncio.TimerHandle | None = None
        self._write_paused = False
        self.tunnel = False  # after a 101: bytes go straight to the client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.discard(self)
        if self.exchange is not None:
            self.exchange.upstream_closed(exc)

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            # Bytes while idle: the replica is confused; never reuse this one.
            self.close()
            return
        exchange.activity()
        client = exchange.client
        if self.tunnel:
            client.write(data)
            return
        corked = client.cork()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            exchange.start_tunnel(data[offset:])
        except httptools.HttpParserError as exc:
            exchange.fail(ProxyError(502, "bad_upstream_response", f"the replica sent an invalid response ({exc})"))
            self.close()
        finally:
            if corked:
                client.uncork()

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.exchange is not None:
            self.exchange.client.pause_reading("upstream")

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.exchange is not None:
            self.exchange.client.resume_reading("upstream")

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        self._cancel_idle()
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True
        self.pool.discard(self)

    def start_idle(self, timeout: float) -> None:
        self._cancel_idle()
        self._idle_timer = asyncio.get_running_loop().call_later(timeout, self.close)

    def _cancel_idle(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def take(self) -> None:
        self._cancel_idle()
        self.uses += 1

    def should_keep_alive(self) -> bool:
        return self._parser.should_keep_alive()

    # parser callbacks, forwarded to the exchange
    def on_message_begin(self) -> None:
        if self.exchange is not None:
            self.exchange.on_message_begin()

    def on_status(self, status: bytes) -> None:
        if self.exchange is not None:
            self.exchange.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.exchange is not None:
            self.exchange.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.exchange is not None:
            self.exchange.on_headers_complete(self._parser.get_status_code(), self._parser.get_http_version())

    def on_body(self, data: bytes) -> None:
        if self.exchange is not None:
            self.exchange.on_body(data)

    def on_message_complete(self) -> None:
        if self.exchange is not None:
            self.exchange.on_message_complete()


class Exchange:
    """One request relayed to one replica and its response relayed back."""

    def __init__(self, client: ClientConnection, request: Request, upstream: UpstreamConnection, route: Route) -> None:
        self.client = client
        self.request = request
        self.upstream = upstream
        self.route = route
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.status = 0
        self.response_started = False  # head written to the client
        self.received_any = False
        self.request_sent = False  # body fully written upstream
        self.eof_framed = False
        self.chunked_to_client = False
        self.keep_client = False
        self.upgraded = False  # the replica answered 101: a tunnel, not a response
        self.head_only = request.method == b"HEAD"
        self.last_activity = asyncio.get_running_loop().time()
        self.done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def activity(self) -> None:
        self.received_any = True
        self.last_activity = asyncio.get_running_loop().time()

    def fail(self, error: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(error)

    # -- request -----------------------------------------------------------
    def send_request(self) -> None:
        request = self.request
        out = [request.method, b" ", _origin_form(request.target), b" HTTP/1.1\r\n"]
        drop = set(HOP_BY_HOP) | OVERRIDDEN_REQUEST
        forwarded_for = b""
        host = b""
        for name, value in request.headers:
            lname = name.lower()
            if lname == b"connection":
                drop.update(t.strip().lower() for t in value.split(b",") if t.strip())
            elif lname == b"x-forwarded-for":
                forwarded_for = forwarded_for + b", " + value if forwarded_for else value
            elif lname == b"host":
                host = value
        if request.upgrade:
            drop.discard(b"upgrade")
            out.append(b"Connection: Upgrade\r\n")
        for name, value in request.headers:
            if name.lower() not in drop:
                out += (name, b": ", value, b"\r\n")
        peer = self.client.peer.encode()
        out += (b"X-Forwarded-For: ", forwarded_for + b", " + peer if forwarded_for else peer, b"\r\n")
        out.append(b"X-Forwarded-Proto: http\r\n")
        if host:
            out += (b"X-Forwarded-Host: ", host, b"\r\n")
        if request.chunked:
            out.append(b"Transfer-Encoding: chunked\r\n")
        out.append(b"\r\n")
        self.upstream.write(b"".join(out))
        if request.has_body:
            request.body.attach(self._send_body, self._end_body, self._too_large)
        else:
            self.request_sent = True

    def _send_body(self, data: bytes) -> None:
        if self.request.chunked:
            self.upstream.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self.upstream.write(data)

    def _end_body(self) -> None:
        if self.request.chunked:
            self.upstream.write(b"0\r\n\r\n")
        self.request_sent = True

    def _too_large(self) -> None:
        limit = self.request.body.limit
        self.fail(ProxyError(413, "body_too_large", f"request body exceeds the router's limit of {limit} bytes"))

    # -- response ----------------------------------------------------------
    def on_message_begin(self) -> None:
        self.reason = b""
        self.headers = []

    def on_headers_complete(self, status: int, version: str) -> None:
        if status == 101:
            if not self.request.upgrade:
                self.fail(ProxyError(502, "bad_upstream_response", "the replica switched protocols unasked"))
                return
            self._switch_protocols()
            return
        if 100 <= status < 200:
            return  # informational (e.g. 103): not relayed; the final response follows
        self.status = status
        client = self.client
        content_length: bytes | None = None
        chunked = False
        drop = set(HOP_BY_HOP) | {b"x-berth-deployment"}
        for name, value in self.headers:
            lname = name.lower()
            if lname == b"content-length":
                content_length = value
            elif lname == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif lname == b"connection":
                drop.update(t.strip().lower() for t in value.split(b",") if t.strip())
        no_body = self.head_only or status in NO_BODY_STATUSES
        self.eof_framed = not no_body and not chunked and content_length is None
        client_11 = self.request.version != "1.0"
        self.chunked_to_client = not no_body and (chunked or content_length is None) and client_11
        framed_for_client = no_body or content_length is not None or self.chunked_to_client
        self.keep_client = framed_for_client and client.keep_alive_after(self.request)
        out = [b"HTTP/1.1 %d %s\r\n" % (status, self.reason or _reason(status))]
        for name, value in self.headers:
            lname = name.lower()
            if lname in drop or (lname == b"content-length" and chunked):
                continue
            out += (name, b": ", value, b"\r\n")
        out += (b"X-Berth-Deployment: ", self.route.deployment_id.encode(), b"\r\n")
        if self.route.fallback:
            out.append(b"X-Berth-Fallback: 1\r\n")
        if self.chunked_to_client:
            out.append(b"Transfer-Encoding: chunked\r\n")
        if not self.keep_client:
            out.append(b"Connection: close\r\n")
        elif not client_11:
            out.append(b"Connection: keep-alive\r\n")
        out.append(b"\r\n")
        client.write(b"".join(out))
        self.response_started = True
        if self.head_only:
            # llhttp cannot be told the response to a HEAD has no body: finish
            # here and do not reuse this connection.
            self._finish(reusable=False)

    def _switch_protocols(self) -> None:
        """Relays the 101 (with its Upgrade header); the tunnel starts when
        the parser hands over the bytes after it (``start_tunnel``)."""
        self.status = 101
        self.upgraded = True
        drop = set(HOP_BY_HOP) - {b"upgrade"} | {b"x-berth-deployment", b"content-length"}
        out = [b"HTTP/1.1 101 %s\r\n" % (self.reason or b"Switching Protocols")]
        for name, value in self.headers:
            if name.lower() not in drop:
                out += (name, b": ", value, b"\r\n")
        out += (b"Connection: Upgrade\r\n", b"X-Berth-Deployment: ", self.route.deployment_id.encode(), b"\r\n\r\n")
        self.client.write(b"".join(out))
        self.response_started = True

    def start_tunnel(self, upstream_bytes: bytes) -> None:
        if not self.upgraded:
            self.fail(ProxyError(502, "bad_upstream_response", "the replica switched protocols unasked"))
            return
        self.upstream.tunnel = True
        client = self.client
        client.tunnel = self.upstream
        if upstream_bytes:
            client.write(upstream_bytes)
        early, client.upgrade_buffer = client.upgrade_buffer, b""
        if early:
            self.upstream.write(early)
        client.resume_reading("upgrade")

    def on_body(self, data: bytes) -> None:
        if not self.response_started or self.done.done():
            return
        if self.chunked_to_client:
            self.client.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self.client.write(data)

    def on_message_complete(self) -> None:
        if self.status == 0 or self.upgraded or self.done.done():
            return  # end of an informational response or a 101, or already finished
        if self.chunked_to_client:
            self.client.write(b"0\r\n\r\n")
        self._finish(reusable=self.upstream.should_keep_alive() and not self.eof_framed)

    def upstream_closed(self, exc: Exception | None) -> None:
        if self.done.done():
            return
        if self.upgraded:
            # End of a tunnel: the client's side closes too (after what was written).
            self.client.tunnel = None
            self._finish(reusable=False)
            return
        if self.response_started and self.eof_framed and exc is None:
            # The body ended at EOF (HTTP/1.0 style, e.g. busybox httpd).
            if self.chunked_to_client:
                self.client.write(b"0\r\n\r\n")
            self._finish(reusable=False)
        elif not self.received_any and self.upstream.uses > 1:
            self.fail(_StaleConnection())
        elif not self.received_any and self.request.method in IDEMPOTENT_METHODS and not self.request.has_body \
                and not self.request.upgrade:
            self.fail(_ReplicaGone())
        else:
            what = "reset the connection" if exc else "closed the connection"
            self.fail(ProxyError(502, "upstream_failed", f"the replica {what} before a complete response"))

    def _finish(self, *, reusable: bool) -> None:
        if not self.done.done():
            self.done.set_result(reusable and self.request_sent)


def _origin_form(target: bytes) -> bytes:
    if target.startswith(b"/") or target == b"*":
        return target
    try:
        url = httptools.parse_url(target)
    except httptools.HttpParserInvalidURLError:
        return target
    path = url.path or b"/"
    return path + (b"?" + url.query if url.query else b"")


class UpstreamPool:
    """Keep-alive connections per replica address, and the count of
    outstanding requests per address for least-outstanding balancing."""

    def __init__(self, settings: ProxySettings) -> None:
        self.settings = settings
        self._idle: dict[str, list[UpstreamConnection]] = {}
        self._busy: dict[str, set[UpstreamConnection]] = {}  # carrying an exchange now
        self._watching: dict[str, asyncio.Task[None]] = {}
        self.outstanding: dict[str, int] = {}
        self.connections_opened = 0
        self.gone_probe_interval = 1.0

    def choose(self, addresses: list[str]) -> str:
        least = min(self.outstanding.get(a, 0) for a in addresses)
        return random.choice([a for a in addresses if self.outstanding.get(a, 0) == least])

    async def acquire(self, address: str) -> tuple[UpstreamConnection, bool]:
        idle = self._idle.get(address)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                conn.take()
                self._busy.setdefault(address, set()).add(conn)
                return conn, True
        host, _, port = address.rpartition(":")
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: UpstreamConnection(self, address), host.strip("[]"), int(port)),
                self.settings.connect_timeout,
            )
        except (OSError, TimeoutError, ValueError) as exc:
            raise _ConnectFailed(f"{address}: {exc or type(exc).__name__}") from exc
        self.connections_opened += 1
        conn.take()
        self._busy.setdefault(address, set()).add(conn)
        return conn, False

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        busy = self._busy.get(conn.address)
        if busy is not None:
            busy.discard(conn)
            if not busy:
                del self._busy[conn.address]
        conn.exchange = None
        idle = self._idle.setdefault(conn.address, [])
        if not reusable or conn.closed or len(idle) >= MAX_IDLE_PER_ADDRESS:
            conn.close()
            return
        conn.start_idle(self.settings.upstream_idle_timeout)
        idle.append(conn)

    def discard(self, conn: UpstreamConnection) -> None:
        idle = self._idle.get(conn.address)
        if idle and conn in idle:
            idle.remove(conn)

    def idle_count(self, address: str) -> int:
        return len(self._idle.get(address, ()))

    def forget(self, addresses: set[str]) -> None:
        """Closes idle connections to replicas that left the pool; requests
        in flight there are not touched and finish. While some are in
        flight, the address is probed: a replica whose container is gone
        (no FIN, no RST: its network vanished) can never answer, so its
        exchanges are failed at once instead of after the upstream timeout
        (an idempotent request that got no byte yet is retried elsewhere)."""
        for address in addresses:
            for conn in self._idle.pop(address, []):
                conn.close()
            if self._busy.get(address) and address not in self._watching:
                task = asyncio.get_running_loop().create_task(self._watch_leaving(address))
                self._watching[address] = task
                task.add_done_callback(functools.partial(self._stop_watching, address))

    def _stop_watching(self, address: str, _: asyncio.Task[None]) -> None:
        self._watching.pop(address, None)

    async def _watch_leaving(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        failures = 0
        while self._busy.get(address):
            await asyncio.sleep(self.gone_probe_interval)
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(host.strip("[]"), int(port)), self.gone_probe_interval
                )
                writer.close()
                failures = 0
            except (OSError, TimeoutError):
                failures += 1
            if failures >= 2:
                busy = list(self._busy.pop(address, ()))
                log.warning("replica_gone", extra={"address": address, "in_flight": len(busy)})
                for conn in busy:
                    if conn.exchange is not None:
                        conn.exchange.upstream_closed(ConnectionResetError(f"replica {address} is gone"))
                    if conn.transport is not None:
                        conn.transport.abort()
                return

    def close_all(self) -> None:
        for task in list(self._watching.values()):
            task.cancel()
        for idle in list(self._idle.values()):
            for conn in list(idle):
                conn.close()
        self._idle.clear()


# --------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------


class ProxyServer:
    def __init__(
        self,
        state: RoutingState,
        platform: Platform,
        settings: ProxySettings | None = None,
        *,
        load: LoadTracker | None = None,
        metrics: RouterMetrics | None = None,
        activator: Activator | None = None,
    ) -> None:
        self.state = state
        self.platform = platform
        self.settings = settings or ProxySettings()
        self.load = load or LoadTracker()
        self.metrics = metrics
        self.activator = activator
        self.pool = UpstreamPool(self.settings)
        self.connections: set[ClientConnection] = set()
        self.closing = False
        self.accepted = 0  # client connections accepted so far
        self.port = 0
        self._server: asyncio.Server | None = None
        self._all_gone: asyncio.Event | None = None

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: ClientConnection(self), host, port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def connection_gone(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)
        if self._all_gone is not None and not self.connections:
            self._all_gone.set()

    async def shutdown(self, grace: float) -> None:
        """Stops accepting, closes idle connections, lets in-flight requests
        finish within ``grace`` seconds, then cuts what is left."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        self._all_gone = asyncio.Event()
        for conn in list(self.connections):
            if conn.idle:
                conn.close()
        if self.connections:
            try:
                await asyncio.wait_for(self._all_gone.wait(), grace)
            except TimeoutError:
                log.warning("shutdown_cut_requests", extra={"connections": len(self.connections)})
                for conn in list(self.connections):
                    conn.abort()
        self.pool.close_all()

    # -- one request ---------------------------------------------------------
    async def handle(self, client: ClientConnection, request: Request) -> bool:
        """Serves one request; returns whether the client connection stays open."""
        route: Route | None = None
        status = 0
        try:
            headers = request.headers
            project = environment = pinned = host = None
            for name, value in headers:
                lname = name.lower()
                if lname == b"x-berth-project":
                    project = value.decode("latin-1").strip()
                elif lname == b"x-berth-environment":
                    environment = value.decode("latin-1").strip()
                elif lname == b"x-berth-deployment":
                    pinned = value.decode("latin-1").strip()
                elif lname == b"host":
                    host = value.decode("latin-1")
            if project is None and environment is None and host is not None:
                addressed = parse_host(host, self.settings.domain)
                if addressed is not None:
                    project, environment = addressed
            if project is None and environment is None:
                status, keep = await self._platform(client, request)
                return keep
            if not project or not environment:
                missing = "X-Berth-Environment" if project else "X-Berth-Project"
                raise ProxyError(400, "incomplete_address", f"{missing} header is missing; send both "
                                 "X-Berth-Project and X-Berth-Environment (names or ids)")
            if request.method == b"CONNECT":
                raise ProxyError(405, "method_not_allowed", "the router does not tunnel CONNECT")
            route = self.state.table.resolve(project, environment, pinned or "", self.state.endpoints)
            if request.content_length is not None and request.content_length > self.settings.max_body_bytes:
                raise ProxyError(413, "body_too_large",
                                 f"request body exceeds the router's limit of {self.settings.max_body_bytes} bytes")
            load = self.load.begin(route)
            try:
                status, keep = await self._proxy(client, request, route)
            finally:
                self.load.end(load)
            return keep
        except RouteError as exc:
            status = exc.status
            return client.write_error(exc.status, exc.code, exc.message, request=request,
                                      deployment_id=exc.deployment_id)
        except ProxyError as exc:
            status = exc.status
            return client.write_error(exc.status, exc.code, exc.message, request=request,
                                      deployment_id=route.deployment_id if route else "", retry_after=exc.retry_after)
        finally:
            elapsed = time.perf_counter() - request.started
            status = status or 499  # the client went away before an answer
            if self.metrics is not None:
                if route is not None:
                    self.metrics.observe(route.project_name, route.environment_name, route.deployment_id,
                                         status, elapsed)
                    if route.fallback:
                        self.metrics.fallbacks.labels(route.project_name, route.environment_name).inc()
                else:
                    self.metrics.observe("", "", "", status, elapsed)
            if access_log.isEnabledFor(logging.INFO):
                # Only these fields: never a header value (API keys, Authorization,
                # Cookie) and never the query string (tokens travel there too).
                path = request.target.split(b"?", 1)[0].decode("latin-1")
                access_log.info(
                    "request",
                    extra={
                        "method": request.method.decode("latin-1"),
                        "path": path,
                        "status": status,
                        "ms": round(elapsed * 1000, 2),
                        "peer": client.peer,
                        "project": route.project_name if route else "",
                        "environment": route.environment_name if route else "",
                        "deployment": route.deployment_id if route else "",
                        "fallback": bool(route and route.fallback),
                    },
                )

    async def _platform(self, client: ClientConnection, request: Request) -> tuple[int, bool]:
        if request.content_length is not None and request.content_length > self.settings.max_body_bytes:
            raise ProxyError(413, "body_too_large",
                             f"request body exceeds the router's limit of {self.settings.max_body_bytes} bytes")
        body = await request.body.read_all() if request.has_body else b""
        try:
            url = httptools.parse_url(request.target)
        except httptools.HttpParserInvalidURLError:
            raise ProxyError(400, "bad_request", "the request target is not a valid URL") from None
        headers: dict[str, str] = {}
        for name, value in request.headers:
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            headers[key] = headers[key] + ", " + text if key in headers else text
        status, out_headers, out_body = await self.platform.handle(
            request.method.decode("latin-1"),
            url.path.decode("latin-1"),
            (url.query or b"").decode("latin-1"),
            headers,
            body,
        )
        encoded = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in out_headers if n.lower() != "content-length"]
        return status, client.write_response(request, status, encoded, out_body)

    async def _proxy(self, client: ClientConnection, request: Request, route: Route) -> tuple[int, bool]:
        settings = self.settings
        key = route.binding_key
        if not self.state.endpoints.get(key):
            if self.activator is not None:
                self.activator.request(route)
            ready = await self.state.endpoints.wait_for(key, settings.activation_timeout)
            if not ready:
                raise ProxyError(
                    503,
                    "no_ready_replica",
                    f"no replica of deployment {route.deployment_id} is ready in environment "
                    f"{route.environment_name!r} after {settings.activation_timeout:g}s; it may be starting or "
                    f"scaled to zero: retry shortly, or see `berth deployment status {route.deployment_id}`",
                    retry_after=max(1, min(30, round(settings.activation_timeout / 2))),
                )
        tried: set[str] = set()
        stale_retries = 0
        gone_retries = 0
        while True:
            candidates = [a for a in self.state.endpoints.get(key) if a not in tried]
            if not candidates:
                raise ProxyError(
                    502,
                    "upstream_unreachable",
                    f"no replica of deployment {route.deployment_id} accepted a connection ({len(tried)} tried); "
                    f"see `berth deployment errors {route.deployment_id}`",
                )
            address = self.pool.choose(candidates)
            self.pool.outstanding[address] = self.pool.outstanding.get(address, 0) + 1
            try:
                try:
                    upstream, _ = await self.pool.acquire(address)
                except _ConnectFailed as exc:
                    log.warning("upstream_connect_failed", extra={"address": address, "error": str(exc),
                                                                  "deployment": route.deployment_id})
                    tried.add(address)
                    continue
                if address not in self.state.endpoints.get(key):
                    # The replica left the pool while we connected: its IP may
                    # already belong to another container (Docker reuses them),
                    # so this connection is never used.
                    self.pool.release(upstream, False)
                    tried.add(address)
                    continue
                try:
                    return await self._exchange(client, request, route, upstream)
                except _ReplicaGone:
                    gone_retries += 1
                    tried.add(address)
                    log.warning("upstream_gone_retrying", extra={"address": address, "deployment": route.deployment_id,
                                                                 "attempt": gone_retries})
                    if gone_retries > MAX_REPLICA_RETRIES:
                        raise ProxyError(502, "upstream_failed",
                                         "the replicas closed the connection before answering") from None
                    continue
                except _StaleConnection:
                    stale_retries += 1
                    if request.has_body or stale_retries > MAX_IDLE_PER_ADDRESS:
                        raise ProxyError(502, "upstream_failed",
                                         "the replica closed the connection before answering") from None
                    continue
            finally:
                self.pool.outstanding[address] -= 1
                if not self.pool.outstanding[address]:
                    del self.pool.outstanding[address]

    async def _exchange(
        self, client: ClientConnection, request: Request, route: Route, upstream: UpstreamConnection
    ) -> tuple[int, bool]:
        exchange = Exchange(client, request, upstream, route)
        upstream.exchange = exchange
        client.upstream_transport = upstream.transport
        if client._write_paused and upstream.transport is not None:
            upstream.transport.pause_reading()
        reusable = False
        try:
            exchange.send_request()
            loop = asyncio.get_running_loop()
            timeout = self.settings.upstream_timeout
            while True:
                if exchange.upgraded:
                    # A tunnel lives as long as both sides keep it open.
                    reusable = await asyncio.shield(exchange.done)
                    break
                remaining = exchange.last_activity + timeout - loop.time()
                if remaining <= 0:
                    raise ProxyError(504, "upstream_timeout",
                                     f"deployment {route.deployment_id} did not answer within {timeout:g}s")
                try:
                    reusable = await asyncio.wait_for(asyncio.shield(exchange.done), remaining)
                    break
                except TimeoutError:
                    continue
        except ProxyError as exc:
            if exchange.response_started:
                # Too late for an error response: cut the client's connection
                # so it sees a truncated response, not a complete one.
                log.warning("response_cut", extra={"code": exc.code, "deployment": route.deployment_id})
                client.abort()
                return exchange.status, False
            raise
        finally:
            request.body.detach()
            client.upstream_transport = None
            if upstream.transport is not None and not upstream.closed:
                upstream.transport.resume_reading()
            client.resume_reading("upstream")
            if not exchange.done.done():
                exchange.done.cancel()
            self.pool.release(upstream, reusable)
        return exchange.status, exchange.keep_client and client.keep_alive_after(request)
