"""The HTTP ingress: an asyncio Protocol server parsing requests with
httptools (llhttp), and a pool of keep-alive connections per upstream replica.

Framing is strict (RFC 9112 §6, §7, §9.3): the connection itself finds where
each request head ends (bounded in size and in time) and where its body ends
(Content-Length counted, chunked framing tracked), and feeds the parser one
message at a time, so a byte of one request can never be parsed as part of
another. Anything ambiguous (both framing headers, a transfer coding other
than chunked, duplicate Host or X-Berth-* headers, an unsupported version)
is answered with an error and the connection closed; nothing of it is
forwarded. The replica always receives one canonical framing header; an
upstream connection that sends more than one response per request, or whose
exchange did not end cleanly, is never reused.

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
import re
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus

import httptools

from services.router.accesslog import AccessLog
from services.router.control import Activator, BindingLoad, LoadTracker
from services.router.metrics import RouterMetrics
from services.router.platform import Platform
from services.router.table import Route, RouteError, RoutingState, parse_host

log = logging.getLogger("berth.router.proxy")

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
# Set by the router itself on the way in (framing headers are re-written:
# exactly one canonical Content-Length or Transfer-Encoding goes upstream).
OVERRIDDEN_REQUEST = frozenset(
    {b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-for", b"expect", b"content-length"}
)
# Never dropped because Connection names them: framing is the router's to
# decide, and the replica must see the Host the client sent.
NEVER_HOP_BY_HOP = frozenset({b"content-length", b"transfer-encoding", b"host"})

_REQUEST_HEADERS_OF_INTEREST = frozenset(
    {
        b"host", b"x-berth-project", b"x-berth-environment", b"x-berth-deployment", b"content-length",
        b"transfer-encoding", b"connection", b"x-forwarded-for", b"expect",
    }
)
_DROP_REQUEST = HOP_BY_HOP | OVERRIDDEN_REQUEST
_DROP_RESPONSE = HOP_BY_HOP | {b"x-berth-deployment"}
_FRAMING_OR_DROPPED_RESPONSE = _DROP_RESPONSE | {b"content-length"}  # content-length is re-added when it frames
ADDRESS_CACHE_SIZE = 4096  # addressing header values remembered (bounded whatever clients send)
_UNKNOWN = object()
TIMER_SLACK = 0.001  # a timer may fire this early (loop clock resolution); not worth re-arming for
LISTEN_BACKLOG = 1024  # (asyncio would listen() again on a handed-over socket with its default of 100)
CLOSING_LINGER = 1.0  # seconds an idle connection stays open once the server is closing

BODY_BUFFER_HIGH = 256 * 1024  # pause reading the client beyond this many unforwarded bytes
MAX_PENDING_REQUESTS = 4  # requests parsed ahead (pipelining) before the client's socket is paused
STREAM_WRITE_WAITS = 600  # 50 ms waits (30 s) a streamed response waits for a slow reader's buffer
MAX_IDLE_PER_ADDRESS = 64
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
MAX_REPLICA_RETRIES = 3
NO_BODY_STATUSES = frozenset({204, 304})
ALLOWED_METHODS = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
LOGGED_TARGET_MAX = 1024  # bytes of a request target written to the access log
_HEX_DIGITS = b"0123456789abcdefABCDEF"


def _running_loop_or_none() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None  # set by ProxyServer.start


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
    # Request heads (defaults as nginx's large_client_header_buffers 4 8k and
    # Envoy's 100 headers): request line -> 414, one header line, the whole
    # head or the header count -> 431.
    max_request_line: int = 8 * 1024
    max_header_bytes: int = 8 * 1024
    max_head_bytes: int = 32 * 1024
    max_headers: int = 100
    # The whole head must arrive within this (nginx client_header_timeout);
    # also how long a new connection may stay silent.
    head_timeout: float = 10.0


# --------------------------------------------------------------------------
# Request side
# --------------------------------------------------------------------------


class RequestBody:
    """The request body as the client sends it. Until a consumer attaches,
    chunks are buffered (reading pauses beyond a bound); once attached they are
    handed straight to it. A body that can never complete (too large, or
    malformed chunked framing) carries its ``error``, which the consumer
    answers with."""

    def __init__(self, conn: ClientConnection, *, expect_continue: bool) -> None:
        self._conn = conn
        self._buffer: deque[bytes] = deque()
        self._buffered = 0
        self.received = 0
        self.complete = False
        self.error: ProxyError | None = None
        self.limit = conn.server.settings.max_body_bytes
        self._sink: Callable[[bytes], None] | None = None
        self._on_end: Callable[[], None] | None = None
        self._on_error: Callable[[ProxyError], None] | None = None
        self._expect_continue = expect_continue
        self._done: asyncio.Future[None] | None = None  # created by read_all, the only waiter

    @property
    def empty(self) -> bool:
        return self.complete and self.received == 0

    def feed(self, data: bytes) -> None:
        if self.error is not None:
            return
        self.received += len(data)
        if self.received > self.limit:
            self.fail(ProxyError(413, "body_too_large", f"request body exceeds the router's limit of {self.limit} bytes"))
            return
        if self._sink is not None:
            self._sink(data)
            return
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered > BODY_BUFFER_HIGH:
            self._conn.pause_reading("body")

    def fail(self, error: ProxyError) -> None:
        """The body can never complete: the consumer answers ``error``."""
        if self.error is not None or self.complete:
            return
        self.error = error
        self._buffer.clear()
        self._buffered = 0
        self._conn.pause_reading("body_failed")
        if self._on_error is not None:
            self._on_error(error)
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    def finish(self) -> None:
        self.complete = True
        if self._sink is not None and self._on_end is not None and self.error is None:
            self._on_end()
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    def _send_continue(self) -> None:
        if self._expect_continue and not self.complete:
            self._expect_continue = False
            self._conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def attach(
        self, sink: Callable[[bytes], None], on_end: Callable[[], None], on_error: Callable[[ProxyError], None]
    ) -> None:
        self._sink, self._on_end, self._on_error = sink, on_end, on_error
        while self._buffer:
            sink(self._buffer.popleft())
        self._buffered = 0
        self._conn.resume_reading("body")
        if self.error is not None:
            on_error(self.error)
        elif self.complete:
            on_end()
        else:
            self._send_continue()

    def detach(self) -> None:
        self._sink = self._on_end = self._on_error = None

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
        if not (self.complete or self.error is not None):
            self._done = asyncio.get_running_loop().create_future()
            await self._done
        self.detach()
        if self.error is not None:
            raise self.error
        return b"".join(chunks)


class NoBody(RequestBody):
    """The body of a request that has none (no Content-Length, or zero, and
    not chunked): complete from the start, shared by all such requests."""

    def __init__(self) -> None:  # deliberately not RequestBody's: no connection, nothing to buffer
        self._buffer = deque()
        self._buffered = 0
        self.received = 0
        self.complete = True
        self.error = None
        self.limit = 0
        self._sink = self._on_end = self._on_error = None
        self._expect_continue = False
        self._done = None

    def feed(self, data: bytes) -> None:
        raise AssertionError("a request without a body received body bytes")

    def fail(self, error: ProxyError) -> None:
        pass

    def finish(self) -> None:
        pass

    def detach(self) -> None:
        pass


class ChunkedFraming:
    """Finds where a chunked request body ends (RFC 9112 §7.1) without
    decoding it, so the parser is fed exactly that body and never a byte of
    the request after it. Strict like the parser: hex sizes only (no
    whitespace), CRLF line ends, bounded size lines and trailer section.
    (The parser checks the same bytes again; if the two ever disagree the
    connection fails closed.)"""

    __slots__ = ("_state", "_left", "_line", "_trailer_bytes", "_max_line", "_max_trailer")
    _SIZE, _DATA, _DATA_END, _TRAILER = range(4)

    def __init__(self, max_line: int, max_trailer: int) -> None:
        self._state = self._SIZE
        self._left = 0
        self._line = b""
        self._trailer_bytes = 0
        self._max_line = max_line
        self._max_trailer = max_trailer

    def consume(self, data: bytes) -> int:
        """The offset in ``data`` just past the end of the body, or -1 when
        the body continues beyond it. Raises ProxyError (400) on bad framing."""
        i, n = 0, len(data)
        while i < n:
            state = self._state
            if state == self._DATA:
                take = min(self._left, n - i)
                i += take
                self._left -= take
                if not self._left:
                    self._state = self._DATA_END
                continue
            if state == self._DATA_END:
                piece = data[i:i + 2 - len(self._line)]
                i += len(piece)
                self._line += piece
                if len(self._line) == 2:
                    if self._line != b"\r\n":
                        raise _bad_framing("chunk data is not followed by CRLF")
                    self._line = b""
                    self._state = self._SIZE
                continue
            end = data.find(b"\n", i)
            if end < 0:
                self._line += data[i:]
                if len(self._line) > self._max_line:
                    raise _bad_framing("a chunk size or trailer line is too long")
                return -1
            line = self._line + data[i:end + 1] if self._line else data[i:end + 1]
            self._line = b""
            i = end + 1
            if len(line) > self._max_line:
                raise _bad_framing("a chunk size or trailer line is too long")
            if line[-2:-1] != b"\r":
                raise _bad_framing("a chunked framing line does not end with CRLF")
            if state == self._SIZE:
                size = line[:-2].split(b";", 1)[0]
                if not size or len(size) > 16 or size.translate(None, _HEX_DIGITS):
                    raise _bad_framing(f"invalid chunk size {size[:32]!r}")
                self._left = int(size, 16)
                self._state = self._DATA if self._left else self._TRAILER
            else:
                if line == b"\r\n":
                    return i  # the empty line after the last chunk (and any trailers)
                self._trailer_bytes += len(line)
                if self._trailer_bytes > self._max_trailer:
                    raise _bad_framing("the chunked trailer section is too large")
        return -1


def _bad_framing(why: str) -> ProxyError:
    return ProxyError(400, "bad_request", f"malformed chunked request body: {why}")


NO_BODY = NoBody()


class Request:
    """One parsed request head. The headers the router itself acts on are
    picked out once, when the head is parsed (the last one of a name wins;
    X-Forwarded-For values and Connection tokens accumulate)."""

    __slots__ = (
        "method", "target", "headers", "version", "keep_alive", "body", "content_length", "chunked", "upgrade",
        "started", "fallback", "project", "environment", "pinned", "host", "forwarded_for", "connection_tokens",
        "forward", "route",
    )

    def __init__(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        version: str,
        keep_alive: bool,
        body: RequestBody,
        content_length: int | None,
        chunked: bool,
        upgrade: bool = False,
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.version = version
        self.keep_alive = keep_alive
        self.body = body
        self.content_length = content_length
        self.chunked = chunked
        self.upgrade = upgrade
        self.started = time.perf_counter()
        self.fallback = False  # served by the previous deployment (the current one failed)
        # raw values of X-Berth-Project / -Environment / -Deployment and Host
        self.project: bytes | None = None
        self.environment: bytes | None = None
        self.pinned: bytes | None = None
        self.host: bytes | None = None
        self.forwarded_for = b""  # X-Forwarded-For values joined with ", "
        self.connection_tokens: set[bytes] | None = None  # lower-cased tokens of Connection headers
        self.forward: list[bytes] | None = None  # "name: value\r\n" pieces of the headers forwarded as they are
        # The route the fast path resolved: the general path keeps it, so a
        # canary's split is drawn once per request, never re-drawn.
        self.route: Route | None = None

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
        self.peer_bytes = b""
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._incoming: Request | None = None
        self._pending: deque[Request] = deque()
        self._worker: asyncio.Task[None] | None = None
        # The exchange of a request being served by the fast path: started
        # from the parser callback, finished from the replica's (no task).
        self._fast: Exchange | None = None
        self._resuming: Exchange | None = None  # failed fast exchange until the task taking it over runs
        self._pause_reasons: set[str] = set()
        self._write_paused = False
        self.upstream_transport: asyncio.Transport | None = None  # paused while the client is slow
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_since: float | None = None  # loop time the connection went idle; None while serving
        # How long it may stay idle: head_timeout until its first request, then keepalive_timeout.
        self._idle_limit = server.settings.head_timeout
        # Framing (see _frame): the start of a head not complete yet (or input
        # held back while enough requests are pending), the Content-Length
        # bytes still to come, or the chunked body being tracked.
        self._head = b""
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_left = 0
        self._chunks: ChunkedFraming | None = None
        self._head_error: ProxyError | None = None  # set by on_headers_complete: refuse this request
        # No more input is parsed (an error, an upgrade, or Connection: close):
        # what is pending is served, then ``_final_error`` (if any), then close.
        self._broken = False
        self._final_error: ProxyError | None = None
        self.closed = False
        self.written = 0  # bytes written to the client so far
        self.upgrade_buffer = b""  # bytes after an upgrade request's head (the new protocol's first bytes)
        self.tunnel: UpstreamConnection | None = None  # after a 101: raw bytes go straight there
        self._corked: list[bytes] | None = None  # writes gathered into one send (see cork)

    # -- transport ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports implement asyncio.Transport without subclassing it)
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""
        self.peer_bytes = self.peer.encode()
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
        if self._fast is not None:
            self._fast.cancel()
        if self._resuming is not None:
            # handed to the general path by a task that never got to run
            exchange, self._resuming = self._resuming, None
            self.server.abandon(exchange)
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
            self._frame(data)
        except ProxyError as exc:
            self._refuse(exc)
        except httptools.HttpParserError as exc:
            self._refuse(ProxyError(400, "bad_request", f"malformed HTTP request: {exc}"))

    def _frame(self, data: bytes) -> None:
        """Feeds the parser one message at a time: a whole head once its end
        is here (within the limits), then exactly the body's bytes. Raises
        ProxyError or httptools.HttpParserError for input to refuse."""
        parser = self._parser
        while data:
            if self._body_left:
                left = self._body_left
                if len(data) <= left:
                    self._body_left = left - len(data)
                    parser.feed_data(data)
                    return
                self._body_left = 0
                parser.feed_data(data[:left])
                data = data[left:]
                continue
            if self._chunks is not None:
                end = self._chunks.consume(data)
                if end < 0:
                    parser.feed_data(data)
                    return
                self._chunks = None
                parser.feed_data(data[:end])
                if self._incoming is not None:
                    raise _bad_framing("the chunked body did not end where its framing says")
                data = data[end:]
                continue
            # A request head.
            if self._head:
                data, self._head = self._head + data, b""
            if data[0] == 13 or data[0] == 10:  # CR, LF
                data = data.lstrip(b"\r\n")  # empty lines before a request line are ignored (RFC 9112 §2.2), as nginx does
            if not data:
                return
            if len(self._pending) >= MAX_PENDING_REQUESTS:
                self._head = data  # parsed once the pipeline drains (reading is paused meanwhile)
                return
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self._check_partial_head(data)
                self._head = data
                if self.idle:
                    self._start_head_timer()
                return
            end += 4
            head = data[:end] if end < len(data) else data
            data = data[end:]
            if end > self.server.small_head:  # (a smaller head is within every limit)
                self._check_head(head)
            if self._head_timer is not None:
                self._cancel_head_timer()
            try:
                parser.feed_data(head)
            except httptools.HttpParserUpgrade:
                if self._head_error is not None:
                    raise self._head_error from None
                # The request itself was parsed; what follows is another
                # protocol. Held until the replica answers: a 101 turns this
                # connection into a tunnel (see Exchange.start_tunnel);
                # anything else is served and the connection closes.
                self._broken = True
                self.upgrade_buffer = data
                self.pause_reading("upgrade")
                return
            if self._head_error is not None:
                raise self._head_error
            request = self._incoming
            if request is not None:  # a body follows
                if request.chunked:
                    settings = self.server.settings
                    self._chunks = ChunkedFraming(settings.max_header_bytes, settings.max_head_bytes)
                else:
                    self._body_left = request.content_length or 0
            elif self._pending and not self._pending[-1].keep_alive:
                # Connection: close (or HTTP/1.0): nothing after it is a request.
                self._broken = True
                self.pause_reading("closing")
                return

    def _check_partial_head(self, data: bytes) -> None:
        settings = self.server.settings
        if b"\n" in data and data.count(b"\n") != data.count(b"\r\n"):
            raise ProxyError(400, "bad_request", "request head lines must end with CRLF")
        if len(data) > settings.max_request_line and data.find(b"\r\n", 0, settings.max_request_line + 2) < 0:
            raise ProxyError(414, "uri_too_long", f"the request line exceeds {settings.max_request_line} bytes")
        if len(data) > settings.max_head_bytes:
            raise ProxyError(431, "request_header_fields_too_large",
                             f"the request head exceeds {settings.max_head_bytes} bytes")

    def _check_head(self, head: bytes) -> None:
        settings = self.server.settings
        size = len(head)
        line_end = head.find(b"\r\n")
        if line_end > settings.max_request_line:
            raise ProxyError(414, "uri_too_long", f"the request line exceeds {settings.max_request_line} bytes")
        if size > settings.max_head_bytes:
            raise ProxyError(431, "request_header_fields_too_large",
                             f"the request head exceeds {settings.max_head_bytes} bytes")
        if size - line_end > settings.max_header_bytes:  # only then can one line be too long
            lines = head[line_end + 2:-4].split(b"\r\n")
            if max(map(len, lines)) > settings.max_header_bytes:
                raise ProxyError(431, "request_header_fields_too_large",
                                 f"a request header exceeds {settings.max_header_bytes} bytes")
        if size > 4 * settings.max_headers and head.count(b"\r\n") - 2 > settings.max_headers:
            raise ProxyError(431, "request_header_fields_too_large",
                             f"the request has more than {settings.max_headers} headers")

    def _refuse(self, error: ProxyError) -> None:
        """Input that can never be a valid request: parse nothing more; the
        requests before it are answered, then ``error``, then the connection
        closes. Inside a body, the request being received fails with it."""
        self._broken = True
        self._head = b""
        self._cancel_head_timer()
        self.pause_reading("broken")
        incoming, self._incoming = self._incoming, None
        if incoming is not None:
            incoming.body.fail(error)  # whoever serves it answers (or cuts a response already started)
            return
        if self._pending or self._worker is not None or self._fast is not None:
            self._final_error = error
            return
        self.write_error(error.status, error.code, error.message, close=True)
        self.close()

    def _end(self) -> None:
        """After the last request this connection serves."""
        error, self._final_error = self._final_error, None
        if error is not None and not self.closed:
            self.write_error(error.status, error.code, error.message, close=True)
        self.close()

    def _start_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.server.loop.call_later(self.server.settings.head_timeout, self._head_expired)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        if self.closed or not self._head or not self.idle or self._broken:
            return
        log.info("request_head_timeout", extra={"peer": self.peer, "received": len(self._head)})
        self._head = b""
        self._broken = True
        self.write_error(408, "request_timeout", f"the request head did not arrive within "
                         f"{self.server.settings.head_timeout:g}s", close=True)
        self.close()

    def _parse_held(self) -> None:
        """Input held back while the pipeline was full (scheduled, never run
        from inside another connection's callbacks)."""
        if self.closed or self._broken or not self._head or len(self._pending) >= MAX_PENDING_REQUESTS:
            return
        data, self._head = self._head, b""
        self.data_received(data)

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
            if self._corked:
                self.uncork()  # the response being relayed leaves before the FIN
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()

    @property
    def idle(self) -> bool:
        return self._incoming is None and not self._pending and self._worker is None and self._fast is None

    # The keep-alive timer is not re-armed per request: one timer handle
    # stays armed while the connection lives and, when it fires, closes the
    # connection if it has been idle for the whole timeout or re-arms itself
    # for the moment it would have been.
    def _arm_idle_timer(self) -> None:
        loop = self.server.loop
        self._idle_since = loop.time()
        if self._idle_timer is None:
            self._idle_timer = loop.call_at(self._idle_since + self._idle_limit, self._idle_expired)
        if self._head:
            loop.call_soon(self._parse_held)
        if self.server.closing:
            self.linger()

    def linger(self) -> None:
        """The server is closing: an idle connection stays open a moment for
        a request its client may already be sending (answered, with
        Connection: close), then closes."""
        self.server.loop.call_later(CLOSING_LINGER, self._close_if_idle)

    def _close_if_idle(self) -> None:
        if self.idle and not self.closed:
            self.close()

    def _cancel_idle_timer(self) -> None:
        self._idle_since = None
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _idle_expired(self) -> None:
        self._idle_timer = None
        if self.closed or self._idle_since is None:
            return  # serving: the timer is armed again when the connection goes idle
        deadline = self._idle_since + self._idle_limit
        if self.server.loop.time() + TIMER_SLACK < deadline or self._head_timer is not None:
            # (a head being received has its own deadline: _head_expired)
            self._idle_timer = self.server.loop.call_at(max(deadline, self.server.loop.time() + 1.0),
                                                        self._idle_expired)
        elif self.idle:
            self.close()

    # -- parser callbacks --------------------------------------------------
    def on_message_begin(self) -> None:
        self._idle_since = None
        self._url = b""
        self._headers = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._incoming is None:  # (trailers of a chunked body come here too: not forwarded)
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        content_length: int | None = None
        chunked = False
        expect_continue = False
        project = environment = pinned = host = connection_tokens = transfer_encoding = None
        forwarded_for = b""
        headers = self._headers
        forward: list[bytes] = []  # "name: value\r\n" pieces of the headers passed on to the replica
        duplicate = None
        for name, value in headers:
            lname = name.lower()
            if lname not in _DROP_REQUEST:
                forward += (name, b": ", value, b"\r\n")
            if lname not in _REQUEST_HEADERS_OF_INTEREST:
                if lname.startswith(b"x-berth-") and sum(1 for n, _ in headers if n.lower() == lname) > 1:
                    duplicate = name
                continue
            if lname == b"host":
                if host is not None:
                    duplicate = name
                host = value
            elif lname == b"x-berth-project":
                if project is not None:
                    duplicate = name
                project = value
            elif lname == b"x-berth-environment":
                if environment is not None:
                    duplicate = name
                environment = value
            elif lname == b"x-berth-deployment":
                if pinned is not None:
                    duplicate = name
                pinned = value
            elif lname == b"content-length":
                if content_length is not None or not value.isdigit() or len(value) > 18:
                    self._head_error = ProxyError(400, "bad_request", "Content-Length must be one decimal number")
                    return
                content_length = int(value)
            elif lname == b"transfer-encoding":
                if transfer_encoding is not None:
                    duplicate = name
                transfer_encoding = value
            elif lname == b"connection":
                tokens = [t.strip().lower() for t in value.split(b",") if t.strip()]
                connection_tokens = connection_tokens.union(tokens) if connection_tokens else set(tokens)
            elif lname == b"x-forwarded-for":
                forwarded_for = forwarded_for + b", " + value if forwarded_for else value
            elif lname == b"expect":
                expect_continue = value.strip().lower() == b"100-continue"
        parser = self._parser
        version = parser.get_http_version()
        method = parser.get_method()
        error = None
        if version != "1.1" and version != "1.0":
            error = ProxyError(505, "http_version_not_supported", f"HTTP/{version} is not supported; use HTTP/1.1")
        elif duplicate is not None:
            error = ProxyError(400, "duplicate_header", f"the request has more than one {duplicate.decode('latin-1')} "
                               "header; send it once")
        elif host is None and version == "1.1":
            error = ProxyError(400, "missing_host", "an HTTP/1.1 request needs a Host header")
        elif method == b"TRACE" or method == b"CONNECT":
            error = ProxyError(405, "method_not_allowed", f"the router does not accept {method.decode()}")
        elif host is not None and not _valid_host(host):
            error = ProxyError(400, "invalid_host", "the Host header is not a valid host[:port]")
        elif self._url[:1] != b"/" and not (self._url == b"*" and method == b"OPTIONS"):
            # absolute-form (RFC 9112 §3.2.2): its authority is the request's host
            authority = _absolute_authority(self._url)
            if authority is None:
                error = ProxyError(400, "invalid_target", "the request target must be a path (/...) or an absolute "
                                   "http(s) URL with a host")
            elif authority != host:
                host = authority
                forward = [piece for name, value in headers if name.lower() not in _DROP_REQUEST
                           and name.lower() != b"host" for piece in (name, b": ", value, b"\r\n")]
                forward += (b"Host: ", host, b"\r\n")
                headers = [(n, v) for n, v in headers if n.lower() != b"host"] + [(b"Host", host)]
        if error is None and transfer_encoding is not None:
            codings = [c.strip().lower() for c in transfer_encoding.split(b",")]
            if version == "1.0" or content_length is not None or codings[-1] != b"chunked":
                # RFC 9112 §6.1, §6.3: the body's length cannot be determined reliably
                error = ProxyError(400, "ambiguous_framing", "the request's Transfer-Encoding cannot frame its body "
                                   "(HTTP/1.0, with Content-Length, or not ending in chunked)")
            elif len(codings) > 1:
                error = ProxyError(501, "transfer_coding_not_implemented", "only Transfer-Encoding: chunked is "
                                   "supported")
            chunked = True
        if error is not None:
            self._head_error = error
            return
        self._idle_limit = self.server.settings.keepalive_timeout
        request = Request(
            method,
            self._url,
            headers,
            version,
            parser.should_keep_alive(),
            RequestBody(self, expect_continue=expect_continue) if chunked or content_length else NO_BODY,
            content_length,
            chunked,
            parser.should_upgrade(),
        )
        # set by the parse above (the constructor keeps to the request line)
        request.project, request.environment, request.pinned, request.host = project, environment, pinned, host
        request.forwarded_for, request.connection_tokens = forwarded_for, connection_tokens
        request.forward = forward
        self._incoming = request
        pending = self._pending
        pending.append(request)
        if len(pending) >= MAX_PENDING_REQUESTS:
            self.pause_reading("pipeline")
        if self._worker is None and self._fast is None:
            if len(pending) == 1 and self.server.start_fast(self, request):
                return
            self._worker = self.server.loop.create_task(self._serve())

    def on_body(self, data: bytes) -> None:
        if self._incoming is not None:
            self._incoming.body.feed(data)

    def on_message_complete(self) -> None:
        if self._incoming is not None:
            self._incoming.body.finish()
            self._incoming = None

    # -- serving -----------------------------------------------------------
    def fast_failed(self, exchange: Exchange) -> None:
        """The fast path's exchange failed: the general path takes the
        request over from there (retry on another replica, error response)."""
        self._fast = None
        self._resuming = exchange
        self._worker = self.server.loop.create_task(self._serve(exchange))

    def fast_served(self, keep_alive: bool) -> None:
        """The fast path's request was answered (what ``_serve`` does after
        each request)."""
        self._fast = None
        pending = self._pending
        pending.popleft()
        if self._pause_reasons and len(pending) < MAX_PENDING_REQUESTS:
            self.resume_reading("pipeline")
        if not keep_alive or (self._broken and not pending):
            self._end()
        elif pending:
            self._worker = self.server.loop.create_task(self._serve())
        elif not self.closed:
            self._arm_idle_timer()

    async def _serve(self, resume: Exchange | None = None) -> None:
        self._resuming = None  # this task owns the exchange now
        try:
            while self._pending:
                request = self._pending[0]
                written_before = self.written if resume is None else resume.written_before
                try:
                    keep_alive = await self.server.handle(self, request, resume)
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
                finally:
                    resume = None
                self._pending.popleft()
                if len(self._pending) < MAX_PENDING_REQUESTS:
                    self.resume_reading("pipeline")
                if not keep_alive or (self._broken and not self._pending):
                    self._end()
                    return
        except asyncio.CancelledError:
            return
        finally:
            self._worker = None
        if not self.closed:
            self._arm_idle_timer()

    def keep_alive_after(self, request: Request) -> bool:
        """Whether the response to ``request`` may offer another request on
        this connection."""
        return not self.server.closing and self.may_continue(request)

    def may_continue(self, request: Request) -> bool:
        """Whether the connection stays open after ``request``'s response:
        what its head offered holds even if the server began closing since
        (the client may already be sending the next request; that one is
        answered with Connection: close)."""
        return (
            request.keep_alive
            and not request.upgrade
            and request.body.complete
            and request.body.error is None
            # nothing more is parsed: the last pending request closes, unless an error answer follows it
            and not (self._broken and self._final_error is None and (not self._pending or request is self._pending[-1]))
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
        if status == 405:  # (the router's own refusal of a method: TRACE, CONNECT)
            headers.append((b"Allow", ALLOWED_METHODS))
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
        # One timer per connection, not per request: when it fires it checks
        # the exchange in progress (upstream timeout) or how long the
        # connection has been idle, and re-arms itself for the next deadline.
        self._watchdog: asyncio.TimerHandle | None = None
        self._watchdog_at = 0.0  # when it fires
        self._idle_since: float | None = None
        self._idle_timeout = 0.0
        self._write_paused = False
        self.tunnel = False  # after a 101: bytes go straight to the client
        # Whether a final response to the request sent is still due. A
        # response beginning when none is due (a replica answering twice, or
        # parsing a body as a request) poisons the connection: it is closed,
        # and nothing of that response reaches any client.
        self.awaiting = False
        self.poisoned = False
        # the response head being parsed (read by the exchange once complete)
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self._time = self.pool.loop.time if self.pool.loop is not None else time.monotonic

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

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
        exchange.received_any = True
        exchange.last_activity = self._time()
        client = exchange.client
        if self.tunnel:
            client.write(data)
            return
        corked = client.cork()
        try:
            self._parser.feed_data(data)
            if self.poisoned:
                self._poisoned()
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            exchange.start_tunnel(data[offset:])
        except httptools.HttpParserError as exc:
            if self.poisoned:
                self._poisoned()
            else:
                exchange.fail(ProxyError(502, "bad_upstream_response", f"the replica sent an invalid response ({exc})"))
                self.close()
        finally:
            if corked:
                client.uncork()

    def _poisoned(self) -> None:
        log.warning("upstream_extra_response", extra={"address": self.address})
        exchange = self.exchange
        if exchange is not None and not exchange.finished:
            exchange.fail(ProxyError(502, "bad_upstream_response", "the replica sent more than one response"))
        self.close()

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
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True
        self.pool.discard(self)

    def start_idle(self, timeout: float) -> None:
        self._idle_since = now = self._time()
        self._idle_timeout = timeout
        if self._watchdog is None or self._watchdog_at > now + timeout:
            self._arm(now + timeout)

    def take(self) -> None:
        self._idle_since = None
        self.uses += 1
        self.awaiting = True

    def watch(self, exchange: Exchange) -> None:
        """Starts the upstream timeout of the exchange just attached."""
        deadline = exchange.last_activity + exchange.timeout
        if self._watchdog is None or self._watchdog_at > deadline:
            self._arm(deadline)

    def _arm(self, deadline: float) -> None:
        if self._watchdog is not None:
            if self._watchdog_at <= deadline:
                return  # fires first; re-arms for this deadline then
            self._watchdog.cancel()
        self._watchdog = self.pool.loop.call_at(deadline, self._check)
        self._watchdog_at = deadline

    def _check(self) -> None:
        self._watchdog = None
        if self.closed:
            return
        now = self.pool.loop.time()
        exchange = self.exchange
        if exchange is not None:
            if exchange.finished or exchange.upgraded:
                return  # finished (re-armed when idle) or a tunnel (no timeout)
            deadline = exchange.last_activity + exchange.timeout
            if now + TIMER_SLACK >= deadline:
                exchange.fail(ProxyError(504, "upstream_timeout", f"deployment {exchange.route.deployment_id} "
                                         f"did not answer within {exchange.timeout:g}s"))
            else:
                self._arm(deadline)
        elif self._idle_since is not None:
            deadline = self._idle_since + self._idle_timeout
            if now + TIMER_SLACK >= deadline:
                self.close()
            else:
                self._arm(deadline)

    def should_keep_alive(self) -> bool:
        return self._parser.should_keep_alive()

    # parser callbacks, forwarded to the exchange
    def on_message_begin(self) -> None:
        if not self.awaiting:
            self.poisoned = True
        self.reason = b""
        self.headers = []

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.exchange is not None and not self.poisoned:
            self.exchange.on_headers_complete(self._parser.get_status_code(), self._parser.get_http_version())

    def on_body(self, data: bytes) -> None:
        if self.exchange is not None and not self.poisoned:
            self.exchange.on_body(data)

    def on_message_complete(self) -> None:
        exchange = self.exchange
        if exchange is not None and not self.poisoned:
            exchange.on_message_complete()
        else:
            self.awaiting = False  # (nothing of this connection is used again: see poisoned)


class Exchange:
    """One request relayed to one replica and its response relayed back."""

    __slots__ = (
        "client", "request", "upstream", "route", "status", "response_started", "received_any",
        "request_sent", "eof_framed", "chunked_to_client", "keep_client", "upgraded", "head_only", "loop", "timeout",
        "last_activity", "finished", "reusable", "error", "_waiter", "fast", "address", "load", "written_before",
    )

    def __init__(
        self, client: ClientConnection, request: Request, upstream: UpstreamConnection, route: Route, timeout: float
    ) -> None:
        self.client = client
        self.request = request
        self.upstream = upstream
        self.route = route
        self.status = 0
        self.response_started = False  # head written to the client
        self.received_any = False
        self.request_sent = False  # body fully written upstream
        self.eof_framed = False
        self.chunked_to_client = False
        self.keep_client = False
        self.upgraded = False  # the replica answered 101: a tunnel, not a response
        self.head_only = request.method == b"HEAD"
        loop = upstream.pool.loop
        self.loop = loop
        self.timeout = timeout
        self.last_activity = loop.time()
        # The outcome: set once by _finish (reusable: whether the upstream
        # connection may carry another request) or fail (error). A future is
        # made only when a task waits (``wait``); the fast path needs none.
        self.finished = False
        self.reusable = False
        self.error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        # Fast path (see ProxyServer.start_fast): who is told when this ends,
        # and what the general path needs to take it over.
        self.fast = False
        self.address = ""
        self.load: BindingLoad | None = None
        self.written_before = client.written

    def fail(self, error: BaseException) -> None:
        if not self.finished:
            self.finished = True
            self.error = error
            self._wake()
            if self.fast:
                self.fast = False
                self.client.fast_failed(self)

    def cancel(self) -> None:
        """The client went away while the fast path served this exchange."""
        if self.fast:
            self.fast = False
            self.finished = True
            self.client.server.abandon(self)

    async def wait(self) -> bool:
        """Waits for the outcome: whether the upstream connection is reusable,
        or the error (a ProxyError, or a retry signal) raised."""
        if not self.finished:
            self._waiter = self.loop.create_future()
            await self._waiter
        if self.error is not None:
            raise self.error
        return self.reusable

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- request -----------------------------------------------------------
    def send_request(self) -> None:
        request = self.request
        target = request.target
        out = [request.method, b" ", target if target[:1] == b"/" else _origin_form(target), b" HTTP/1.1\r\n"]
        tokens = request.connection_tokens
        named = tokens - _DROP_REQUEST - NEVER_HOP_BY_HOP if tokens else None
        if request.forward is not None and not request.upgrade and not named:
            out += request.forward
        else:
            # An upgrade keeps its Upgrade header; Connection may name more
            # headers to drop (never the framing ones: they are re-written below).
            drop = _DROP_REQUEST | named if named else _DROP_REQUEST
            if request.upgrade:
                drop = drop - {b"upgrade"}
                out.append(b"Connection: Upgrade\r\n")
            for name, value in request.headers:
                if name.lower() not in drop:
                    out += (name, b": ", value, b"\r\n")
        forwarded_for = request.forwarded_for
        peer = self.client.peer_bytes
        out += (b"X-Forwarded-For: ", forwarded_for + b", " + peer if forwarded_for else peer,
                b"\r\nX-Forwarded-Proto: http\r\n")
        host = request.host
        if host:
            out += (b"X-Forwarded-Host: ", host, b"\r\n")
        elif host is None:  # an HTTP/1.0 request without one: HTTP/1.1 upstream needs a Host (RFC 9112 §3.2)
            out += (b"Host: ", self.upstream.address.encode(), b"\r\n")
        if request.chunked:
            out.append(b"Transfer-Encoding: chunked\r\n")
        elif request.content_length is not None:
            out.append(b"Content-Length: %d\r\n" % request.content_length)
        out.append(b"\r\n")
        self.upstream.write(b"".join(out))
        if request.has_body:
            request.body.attach(self._send_body, self._end_body, self.fail)
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

    # -- response ----------------------------------------------------------
    def on_headers_complete(self, status: int, version: str) -> None:
        if self.finished:
            return  # (the upstream connection is poisoned: it is closed, never reused)
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
        named_by_connection: frozenset[bytes] | None = None
        headers = self.upstream.headers
        out = [_status_line(status, self.upstream.reason)]
        for name, value in headers:
            lname = name.lower()
            if lname in _FRAMING_OR_DROPPED_RESPONSE:
                if lname == b"content-length":
                    content_length = value
                elif lname == b"transfer-encoding":
                    chunked = b"chunked" in value.lower()
                elif lname == b"connection":
                    tokens = _named_by_connection(value)
                    if tokens:
                        named_by_connection = tokens | named_by_connection if named_by_connection else tokens
                continue
            out += (name, b": ", value, b"\r\n")
        if named_by_connection:
            # Connection names end-to-end headers of this hop (rare): drop those too.
            out = out[:1]
            for name, value in headers:
                lname = name.lower()
                if lname not in _FRAMING_OR_DROPPED_RESPONSE and lname not in named_by_connection:
                    out += (name, b": ", value, b"\r\n")
        no_body = self.head_only or status in NO_BODY_STATUSES
        self.eof_framed = not no_body and not chunked and content_length is None
        client_11 = self.request.version != "1.0"
        self.chunked_to_client = not no_body and (chunked or content_length is None) and client_11
        framed_for_client = no_body or content_length is not None or self.chunked_to_client
        self.keep_client = framed_for_client and client.keep_alive_after(self.request)
        if content_length is not None and not chunked:
            out += (b"Content-Length: ", content_length, b"\r\n")
        out.append(self.route.response_headers)
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
        out = [b"HTTP/1.1 101 %s\r\n" % (self.upstream.reason or b"Switching Protocols")]
        for name, value in self.upstream.headers:
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
        if not self.response_started or self.finished:
            return
        if self.chunked_to_client:
            self.client.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self.client.write(data)

    def on_message_complete(self) -> None:
        if self.status == 0:
            return  # the end of an informational response: the final one is still due
        self.upstream.awaiting = False
        if self.upgraded or self.finished:
            return  # a 101, or already finished
        if self.chunked_to_client:
            self.client.write(b"0\r\n\r\n")
        self._finish(reusable=self.upstream.should_keep_alive() and not self.eof_framed)

    def upstream_closed(self, exc: Exception | None) -> None:
        if self.finished:
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
        if not self.finished:
            self.finished = True
            self.reusable = reusable and self.request_sent
            if self._waiter is not None:
                self._wake()
            if self.fast:
                self.fast = False
                self.client.server.fast_done(self)


@functools.lru_cache(maxsize=1024)
def _named_by_connection(value: bytes) -> frozenset[bytes]:
    """Headers a response's Connection header names beyond the hop-by-hop
    ones (usually none: "keep-alive" or "close")."""
    return frozenset(t.strip().lower() for t in value.split(b",") if t.strip()) - _DROP_RESPONSE


@functools.lru_cache(maxsize=1024)
def _status_line(status: int, reason: bytes) -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (status, reason or _reason(status))


# uri-host [":" port] (RFC 3986 §3.2.2): an IP literal, or a reg-name without
# empty labels (nginx refuses "a..b" too).
_HOST = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|(?!.*\.\.)[A-Za-z0-9\-._~!$&'()*+,;=%]*)(:[0-9]{0,5})?")


@functools.lru_cache(maxsize=1024)
def _valid_host(value: bytes) -> bool:
    return _HOST.fullmatch(value) is not None


def _absolute_authority(target: bytes) -> bytes | None:
    """The host[:port] of an absolute-form http(s) target, or None if it is
    not one (no host, another scheme, userinfo, unparseable)."""
    try:
        url = httptools.parse_url(target)
    except httptools.HttpParserInvalidURLError:
        return None
    if (url.schema or b"").lower() not in (b"http", b"https") or not url.host or url.userinfo:
        return None
    authority = url.host + (b":%d" % url.port if url.port is not None else b"")
    return authority if _valid_host(authority) else None


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
        self.loop: asyncio.AbstractEventLoop = _running_loop_or_none()  # type: ignore[assignment]

    def choose(self, addresses: Sequence[str]) -> str:
        if len(addresses) == 1:
            return addresses[0]
        least = min(self.outstanding.get(a, 0) for a in addresses)
        return random.choice([a for a in addresses if self.outstanding.get(a, 0) == least])

    def take_idle(self, address: str) -> UpstreamConnection | None:
        """A pooled keep-alive connection to ``address``, marked busy; None if there is none."""
        idle = self._idle.get(address)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                conn.take()
                busy = self._busy.get(address)
                if busy is None:
                    busy = self._busy[address] = set()
                busy.add(conn)
                return conn
        return None

    async def acquire(self, address: str) -> tuple[UpstreamConnection, bool]:
        pooled = self.take_idle(address)
        if pooled is not None:
            return pooled, True
        host, _, port = address.rpartition(":")
        loop = asyncio.get_running_loop()
        try:
            # (asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
            # cancellation that races the connect's completion, gh-86296)
            async with asyncio.timeout(self.settings.connect_timeout):
                _, conn = await loop.create_connection(lambda: UpstreamConnection(self, address), host.strip("[]"),
                                                       int(port))
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
        idle = self._idle.get(conn.address)
        if idle is None:
            idle = self._idle[conn.address] = []
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
                async with asyncio.timeout(self.gone_probe_interval):
                    _, writer = await asyncio.open_connection(host.strip("[]"), int(port))
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
        access_log: AccessLog | None = None,
    ) -> None:
        self.state = state
        self.access_log = access_log or AccessLog()
        self.platform = platform
        self.settings = settings or ProxySettings()
        self.load = load or LoadTracker()
        self.metrics = metrics
        self.activator = activator
        self.pool = UpstreamPool(self.settings)
        self.connections: set[ClientConnection] = set()
        self.closing = False
        # A request head this small cannot exceed any head limit (each header line takes at least 4 bytes).
        self.small_head = min(self.settings.max_request_line, self.settings.max_header_bytes,
                              self.settings.max_head_bytes, 4 * self.settings.max_headers)
        self.accepted = 0  # client connections accepted so far
        self.port = 0
        self._server: asyncio.Server | None = None
        self._all_gone: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop = _running_loop_or_none()  # type: ignore[assignment]
        # addressing headers as received -> what _parse_address made of them
        self._addressed: dict[tuple[bytes | None, ...], tuple[str, str, str] | None] = {}

    async def start(self, host: str, port: int, sock: socket.socket | None = None) -> int:
        """Listens on host:port, or on ``sock`` (a listening socket handed
        over by the worker supervisor)."""
        loop = asyncio.get_running_loop()
        self.loop = self.pool.loop = loop
        if sock is not None:
            self._server = await self.serve_socket(sock)
        else:
            self._server = await loop.create_server(lambda: ClientConnection(self), host, port, reuse_address=True,
                                                    backlog=LISTEN_BACKLOG)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def serve_socket(self, sock: socket.socket) -> asyncio.Server:
        """Accepts connections on one more listening socket (a router worker
        covering a sibling's socket), keeping its backlog."""
        return await asyncio.get_running_loop().create_server(lambda: ClientConnection(self), sock=sock,
                                                              backlog=LISTEN_BACKLOG)

    def connection_gone(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)
        if self._all_gone is not None and not self.connections:
            self._all_gone.set()

    def begin_closing(self) -> None:
        """From now on every response says Connection: close; idle
        connections close after a moment (``ClientConnection.linger``)."""
        if self.closing:
            return
        self.closing = True
        for conn in list(self.connections):
            if conn.idle:
                conn.linger()

    async def shutdown(self, grace: float) -> None:
        """Stops accepting, closes idle connections (after a moment for a
        request already on its way), lets in-flight requests finish within
        ``grace`` seconds, then cuts what is left."""
        if self._server is not None:
            self._server.close()
        self._all_gone = asyncio.Event()
        self.begin_closing()
        if self.connections:
            try:
                async with asyncio.timeout(grace):
                    await self._all_gone.wait()
            except TimeoutError:
                log.warning("shutdown_cut_requests", extra={"connections": len(self.connections)})
                for conn in list(self.connections):
                    conn.abort()
        self.pool.close_all()
        self.access_log.flush()

    # -- one request ---------------------------------------------------------
    def _address(self, request: Request) -> tuple[str, str, str] | None:
        """(project, environment, pinned deployment) the request is addressed
        to, or None for the platform's own endpoints. Raises ProxyError."""
        key = (request.project, request.environment, request.pinned, request.host)
        addressed = self._addressed.get(key, _UNKNOWN)
        if addressed is _UNKNOWN:
            addressed = self._parse_address(*key)
            if len(self._addressed) >= ADDRESS_CACHE_SIZE:
                self._addressed.clear()
            self._addressed[key] = addressed
        return addressed  # type: ignore[return-value]

    def _parse_address(
        self, project_raw: bytes | None, environment_raw: bytes | None, pinned_raw: bytes | None, host: bytes | None
    ) -> tuple[str, str, str] | None:
        project = project_raw.decode("latin-1").strip() if project_raw is not None else None
        environment = environment_raw.decode("latin-1").strip() if environment_raw is not None else None
        if project is None and environment is None and host is not None:
            addressed = parse_host(host.decode("latin-1"), self.settings.domain)
            if addressed is not None:
                project, environment = addressed
        if project is None and environment is None:
            return None
        if not project or not environment:
            missing = "X-Berth-Environment" if project else "X-Berth-Project"
            raise ProxyError(400, "incomplete_address", f"{missing} header is missing; send both "
                             "X-Berth-Project and X-Berth-Environment (names or ids)")
        pinned = pinned_raw.decode("latin-1").strip() if pinned_raw is not None else ""
        return project, environment, pinned

    def start_fast(self, client: ClientConnection, request: Request) -> bool:
        """The fast path, from the client's parser callback: when the request
        can go at once to an idle pooled connection of a ready replica, it is
        sent there now and finished from the replica's callbacks
        (``fast_done``), with no task and no await. Anything else (platform
        endpoints, errors, activation, new connections, upgrades) returns False
        and is served by ``handle``; an exchange that fails is handed over to
        it too (``ClientConnection.fast_failed``), so retries and error
        responses have one implementation. True: the request was taken."""
        if request.upgrade or self.closing or not self.state.loaded or request.body.error is not None:
            return False
        try:
            addressed = self._address(request)
            if addressed is None:
                return False
            route = request.route = self.state.table.resolve(*addressed, self.state.endpoints)
        except (ProxyError, RouteError):
            return False  # handle() answers it
        if request.content_length is not None and request.content_length > self.settings.max_body_bytes:
            return False
        addresses = self.state.endpoints.get(route.binding_key)
        if not addresses:
            return False
        pool = self.pool
        address = pool.choose(addresses)
        upstream = pool.take_idle(address)
        if upstream is None:
            return False
        outstanding = pool.outstanding
        outstanding[address] = outstanding.get(address, 0) + 1
        exchange = self._attach(client, request, route, upstream)
        exchange.fast = True
        exchange.address = address
        exchange.load = self.load.begin(route)
        client._fast = exchange
        try:
            exchange.send_request()
        except Exception as exc:  # noqa: BLE001 - handed to the general path, which logs it and answers 500
            exchange.fail(exc)
        return True

    def fast_done(self, exchange: Exchange) -> None:
        """A fast-path exchange completed: what ``_exchange``, ``_proxy``,
        ``handle`` and ``ClientConnection._serve`` do after a response."""
        client, request = exchange.client, exchange.request
        self._detach(exchange, exchange.reusable)
        self._release_address(exchange.address)
        keep = exchange.keep_client and client.may_continue(request)
        assert exchange.load is not None
        self.load.end(exchange.load)
        self._record(client, request, exchange.route, exchange.status)
        client.fast_served(keep)

    def abandon(self, exchange: Exchange) -> None:
        """The client of a fast-path exchange went away before the end."""
        self._detach(exchange, False)
        self._release_address(exchange.address)
        if exchange.load is not None:
            self.load.end(exchange.load)
        self._record(exchange.client, exchange.request, exchange.route, 0)

    async def handle(self, client: ClientConnection, request: Request, resume: Exchange | None = None) -> bool:
        """Serves one request; returns whether the client connection stays
        open. ``resume``: the request's failed fast-path exchange, taken over
        from where it stopped."""
        route: Route | None = None
        status = 0
        try:
            if resume is not None:
                route = resume.route
                assert resume.load is not None
                load = resume.load
            else:
                addressed = self._address(request)
                if addressed is None:
                    status, keep = await self._platform(client, request)
                    return keep
                if not self.state.loaded:
                    raise ProxyError(503, "router_starting", "the router has not loaded its routing table from "
                                     "the registry yet; retry in a moment", retry_after=1)
                route = request.route or self.state.table.resolve(*addressed, self.state.endpoints)
                if request.content_length is not None and request.content_length > self.settings.max_body_bytes:
                    raise ProxyError(413, "body_too_large",
                                     f"request body exceeds the router's limit of {self.settings.max_body_bytes} bytes")
                load = self.load.begin(route)
            try:
                status, keep = await self._proxy(client, request, route, resume)
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
            self._record(client, request, route, status)

    def _record(self, client: ClientConnection, request: Request, route: Route | None, status: int) -> None:
        """Metrics and the access log line of a finished request."""
        elapsed = time.perf_counter() - request.started
        status = status or 499  # the client went away before an answer
        if self.metrics is not None:
            if route is not None:
                self.metrics.observe(route.project_name, route.environment_name, route.deployment_id,
                                     status, elapsed)
                if route.fallback:
                    self.metrics.fallback(route.project_name, route.environment_name)
            else:
                self.metrics.observe("", "", "", status, elapsed)
        access_log = self.access_log
        if access_log.enabled:
            target = request.target if len(request.target) <= LOGGED_TARGET_MAX else request.target[:LOGGED_TARGET_MAX]
            access_log.record(request.method, target, status, elapsed, client.peer, route, time.time())

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
        response = await self.platform.respond(
            request.method.decode("latin-1"),
            url.path.decode("latin-1"),
            (url.query or b"").decode("latin-1"),
            headers,
            body,
        )
        status = response.status
        encoded = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in response.headers
                   if n.lower() != "content-length"]
        if response.stream is not None:
            return status, await self._stream(client, request, status, encoded, response.stream)
        return status, client.write_response(request, status, encoded, response.body)

    async def _stream(self, client: ClientConnection, request: Request, status: int,
                      headers: list[tuple[bytes, bytes]], chunks: AsyncIterator[bytes]) -> bool:
        """A response of unknown length (server-sent events): the head without
        Content-Length, then each chunk as the handler yields it, the end
        delimited by closing the connection (never kept alive). Stops when
        the client goes away; the handler bounds the stream's duration and
        sends heartbeats, so a vanished client is noticed."""
        head = [b"HTTP/1.1 %d %s\r\n" % (status, _reason(status))]
        head += [name + b": " + value + b"\r\n" for name, value in headers]
        head.append(b"Connection: close\r\n\r\n")
        client.write(b"".join(head))
        try:
            async for chunk in chunks:
                if client.closed:
                    break
                client.write(chunk)
                for _ in range(STREAM_WRITE_WAITS):  # a slow reader: wait (bounded) for the buffer to drain
                    if not client._write_paused or client.closed:
                        break
                    await asyncio.sleep(0.05)
                else:
                    break  # stuck for STREAM_WRITE_WAITS x 50 ms: give up on this client
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()
            client.close()
        return False


    async def _proxy(
        self, client: ClientConnection, request: Request, route: Route, resume: Exchange | None = None
    ) -> tuple[int, bool]:
        settings = self.settings
        key = route.binding_key
        if resume is None and request.body.error is not None:
            raise request.body.error  # (malformed before it was sent anywhere)
        if resume is None and not self.state.endpoints.get(key):
            if self.activator is not None:
                self.activator.request(route)
            ready = await self.state.endpoints.wait_for(key, settings.activation_timeout)
            if ready and self.activator is not None:
                self.activator.served(route)
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
            if resume is not None:
                # The fast path's attempt (counted in ``outstanding`` already).
                exchange: Exchange | None = resume
                address, upstream, resume = resume.address, resume.upstream, None
            else:
                exchange = None
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
                if exchange is None:
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
                    return await self._exchange(client, request, route, upstream, exchange)
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
                self._release_address(address)

    def _release_address(self, address: str) -> None:
        outstanding = self.pool.outstanding
        outstanding[address] -= 1
        if not outstanding[address]:
            del outstanding[address]

    def _attach(
        self, client: ClientConnection, request: Request, route: Route, upstream: UpstreamConnection
    ) -> Exchange:
        exchange = Exchange(client, request, upstream, route, self.settings.upstream_timeout)
        upstream.exchange = exchange
        client.upstream_transport = upstream.transport
        if client._write_paused and upstream.transport is not None:
            upstream.transport.pause_reading()
        upstream.watch(exchange)
        return exchange

    def _detach(self, exchange: Exchange, reusable: bool) -> None:
        client, upstream = exchange.client, exchange.upstream
        exchange.request.body.detach()
        client.upstream_transport = None
        if client._write_paused and upstream.transport is not None and not upstream.closed:
            upstream.transport.resume_reading()  # paused while the client was slow
        if client._pause_reasons:
            client.resume_reading("upstream")
        exchange.finished = True  # late callbacks from the replica are ignored
        self.pool.release(upstream, reusable)

    async def _exchange(
        self,
        client: ClientConnection,
        request: Request,
        route: Route,
        upstream: UpstreamConnection,
        exchange: Exchange | None = None,
    ) -> tuple[int, bool]:
        """Relays the request to ``upstream`` (or finishes ``exchange``, a
        fast-path attempt already under way there). The upstream timeout is
        the connection's watchdog (``UpstreamConnection.watch``), which fails
        the exchange with a 504."""
        reusable = False
        if exchange is None:
            exchange = self._attach(client, request, route, upstream)
            started = False
        else:
            started = True
        try:
            if not started:
                exchange.send_request()
            reusable = await exchange.wait()
        except ProxyError as exc:
            if exchange.response_started:
                # Too late for an error response: cut the client's connection
                # so it sees a truncated response, not a complete one.
                log.warning("response_cut", extra={"code": exc.code, "deployment": route.deployment_id})
                client.abort()
                return exchange.status, False
            raise
        finally:
            self._detach(exchange, reusable)
        return exchange.status, exchange.keep_client and client.may_continue(request)
