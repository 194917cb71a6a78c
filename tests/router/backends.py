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


class QuietHTTPServer(ThreadingHTTPServer):
    """A replica's server whose clients (the router) may cut a request short
    on purpose (a refused body, a client gone): that is recorded by the
    tests, not printed as a traceback into the run's output."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


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

        self.server = QuietHTTPServer(("127.0.0.1", 0), Handler)
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


# --------------------------------------------------------------------------
# Raw HTTP/1.1 on both sides, for the strict-framing tests (test_http_strict,
# test_proxy_property, test_nginx_differential): responses parsed from the
# bytes a client received, a client on a plain socket, and replicas that
# record exactly what reached them.
# --------------------------------------------------------------------------


class RawResponse:
    """One response as a client received it."""

    def __init__(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (several: joined with ", ")."""
        values = [v.decode("latin-1") for k, v in self.headers if k.decode("latin-1").lower() == name.lower()]
        return ", ".join(values) if values else None

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<{self.status} {self.headers!r} {self.body[:200]!r}>"


class ResponseParseError(Exception):
    pass


def parse_responses(data: bytes, *, eof: bool = False, head_requests: int = 0) -> tuple[list[RawResponse], bytes]:
    """The complete responses at the start of ``data`` and what follows them
    (an incomplete response, or bytes that are no response at all). A
    response framed by neither Content-Length nor chunked ends at ``eof``.
    The first ``head_requests`` responses answer HEAD requests (no body).
    Raises ResponseParseError on bytes that cannot start a response."""
    responses: list[RawResponse] = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            if not data.startswith(b"HTTP/"[: len(data) - pos], pos):
                raise ResponseParseError(f"not a response: {data[pos:pos + 80]!r}")
            break
        lines = data[pos:end].split(b"\r\n")
        status_line = lines[0].split(b" ", 2)
        if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1.") or not status_line[1].isdigit():
            raise ResponseParseError(f"not a status line: {lines[0][:80]!r}")
        status = int(status_line[1])
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise ResponseParseError(f"not a header line: {line[:80]!r}")
            headers.append((name.strip(), value.strip()))
        lower = {k.lower(): v for k, v in headers}
        body_start = end + 4
        if 100 <= status < 200:
            pos = body_start  # informational: no body, not counted
            continue
        if len(responses) < head_requests or status in (204, 304):
            responses.append(RawResponse(status, status_line[2] if len(status_line) > 2 else b"", headers, b""))
            pos = body_start
            continue
        if b"chunked" in lower.get(b"transfer-encoding", b"").lower():
            body, cursor = b"", body_start
            complete = False
            while True:
                line_end = data.find(b"\r\n", cursor)
                if line_end < 0:
                    break
                try:
                    size = int(data[cursor:line_end].split(b";")[0], 16)
                except ValueError:
                    raise ResponseParseError(f"bad chunk size {data[cursor:line_end][:40]!r}") from None
                if size == 0:
                    trailer_end = data.find(b"\r\n\r\n", line_end)
                    if data[line_end:line_end + 4] == b"\r\n\r\n":
                        trailer_end = line_end
                    if trailer_end < 0:
                        break
                    cursor, complete = trailer_end + 4, True
                    break
                if len(data) < line_end + 2 + size + 2:
                    break
                body += data[line_end + 2:line_end + 2 + size]
                cursor = line_end + 2 + size + 2
            if not complete:
                break
            end_of_response = cursor
        elif b"content-length" in lower:
            length = int(lower[b"content-length"])
            if len(data) < body_start + length:
                break
            body, end_of_response = data[body_start:body_start + length], body_start + length
        else:
            if not eof:
                break
            body, end_of_response = data[body_start:], len(data)
        responses.append(RawResponse(status, status_line[2] if len(status_line) > 2 else b"", headers, body))
        pos = end_of_response
    return responses, data[pos:]


class RawClient:
    """A client on a plain socket: sends bytes as they are and reads what
    comes back (EOF and resets noted, never raised)."""

    def __init__(self, port: int, *, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.data = b""
        self.eof = False
        self.reset = False
        self.broken_pipe = False

    def send(self, data: bytes) -> bool:
        """False if the router had closed the connection already."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            self.broken_pipe = True
            return False

    def _recv(self, timeout: float) -> bool:
        """Reads once (up to ``timeout``); False when nothing more can come."""
        if self.eof:
            return False
        self.sock.settimeout(max(timeout, 0.001))
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            return True
        except ConnectionResetError:
            self.eof = self.reset = True
            return False
        if not chunk:
            self.eof = True
            return False
        self.data += chunk
        return True

    def responses(self, head_requests: int = 0) -> list[RawResponse]:
        return parse_responses(self.data, eof=self.eof, head_requests=head_requests)[0]

    def read_responses(self, count: int, timeout: float = 5.0, head_requests: int = 0) -> list[RawResponse]:
        """Reads until ``count`` complete responses, EOF or ``timeout``."""
        deadline = time.monotonic() + timeout
        while len(self.responses(head_requests)) < count and time.monotonic() < deadline:
            if not self._recv(deadline - time.monotonic()):
                break
        return self.responses(head_requests)

    def read_until_closed(self, timeout: float = 5.0) -> bool:
        """Reads until the router closes the connection; whether it did within ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._recv(deadline - time.monotonic()):
                return True
        return self.eof

    def quiet_for(self, seconds: float) -> bool:
        """True if nothing arrives for ``seconds`` (EOF counts as nothing)."""
        before = len(self.data)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self._recv(deadline - time.monotonic()):
            pass
        return len(self.data) == before

    def close(self) -> None:
        self.sock.close()


class EchoRequest:
    """A complete request as a replica parsed it (with h11)."""

    def __init__(self, connection: int, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]],
                 body: bytes) -> None:
        self.connection = connection
        self.method = method
        self.target = target
        self.headers = headers
        self.body = body

    def __repr__(self) -> str:
        return f"<{self.method.decode()} {self.target.decode('latin-1')} on #{self.connection} body={self.body[:60]!r}>"


class EchoBackend:
    """A keep-alive replica that parses strictly (h11) and answers every
    complete request 200 with the request target as its body (and in
    ``X-Echo-Target``): a response names the request it answers. Records
    every complete request (``requests``), every request head even when
    its body never completed (``heads``), the bytes of each connection
    (``raw``) and unparseable input (``errors``: the proxy forwarded bytes
    that are no HTTP). A target containing ``delay=N`` is answered after N ms
    (at most 500)."""

    def __init__(self) -> None:
        import h11  # a dev dependency; imported here so the other helpers do without

        self._h11 = h11
        self.requests: list[EchoRequest] = []
        self.heads: list[bytes] = []
        self.raw: dict[int, bytes] = {}
        self.errors: list[str] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def targets(self) -> list[bytes]:
        with self._lock:
            return [r.target for r in self.requests]

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                index = self.connections
                self.connections += 1
                self.raw[index] = b""
                self._socks.append(conn)
                thread = threading.Thread(target=self._serve, args=(conn, index), daemon=True)
                self._threads.append(thread)
                thread.start()

    def _serve(self, conn: socket.socket, index: int) -> None:
        h11 = self._h11
        parser = h11.Connection(h11.SERVER, max_incomplete_event_size=256 * 1024)
        request: Any = None
        body: list[bytes] = []
        last = b"?"
        try:
            while True:
                try:
                    event = parser.next_event()
                except h11.RemoteProtocolError as exc:
                    if last:  # not the connection's end: the proxy sent bytes that are no HTTP
                        with self._lock:
                            self.errors.append(f"connection #{index}: {exc} after {self.raw[index][-300:]!r}")
                        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nX-Backend-Error: 1\r\nContent-Length: 0\r\n"
                                     b"Connection: close\r\n\r\n")
                    return
                if event is h11.NEED_DATA:
                    try:
                        last = conn.recv(65536)
                    except OSError:
                        last = b""
                    with self._lock:
                        self.raw[index] += last
                    parser.receive_data(last)
                    continue
                if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                    return
                if isinstance(event, h11.Request):
                    request, body = event, []
                    with self._lock:
                        self.heads.append(bytes(event.target))
                elif isinstance(event, h11.Data):
                    body.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    target = bytes(request.target)
                    with self._lock:
                        self.requests.append(EchoRequest(index, bytes(request.method), target,
                                                         [(bytes(k), bytes(v)) for k, v in request.headers],
                                                         b"".join(body)))
                    if b"delay=" in target:
                        digits = target.split(b"delay=", 1)[1][:3]
                        time.sleep(min(int(digits) if digits.isdigit() else 0, 500) / 1000)
                    out = parser.send(h11.Response(status_code=200, headers=[
                        ("Content-Type", "text/plain"), ("Content-Length", str(len(target))),
                        ("X-Echo-Target", target)]))
                    if request.method != b"HEAD":
                        out += parser.send(h11.Data(data=target))
                    out += parser.send(h11.EndOfMessage())
                    conn.sendall(out)
                    if parser.our_state is h11.MUST_CLOSE:
                        return
                    parser.start_next_cycle()
        except OSError:
            return
        finally:
            conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            socks, threads = list(self._socks), list(self._threads)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept
        except OSError:
            pass
        self.sock.close()
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in threads:
            t.join(2)
        self._accepter.join(2)


class ScriptedBackend:
    """A keep-alive replica on raw bytes: reads each request head (and a
    Content-Length body unless ``read_body`` is False) and writes whatever
    ``answer(head, body)`` returns, as one write. Records the heads it read
    and how many connections it accepted."""

    def __init__(self, answer: Callable[[bytes, bytes], bytes], *, read_body: bool = True) -> None:
        self.answer = answer
        self.read_body = read_body
        self.heads: list[bytes] = []
        self.connections = 0
        self._socks: list[socket.socket] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self._lock = threading.Lock()
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._socks.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            try:
                while True:
                    while b"\r\n\r\n" not in buffer:
                        chunk = conn.recv(65536)
                        if not chunk:
                            return
                        buffer += chunk
                    head, buffer = buffer.split(b"\r\n\r\n", 1)
                    with self._lock:
                        self.heads.append(head)
                    body = b""
                    if self.read_body:
                        length = 0
                        for line in head.split(b"\r\n")[1:]:
                            name, _, value = line.partition(b":")
                            if name.strip().lower() == b"content-length":
                                length = int(value)
                        while len(buffer) < length:
                            chunk = conn.recv(65536)
                            if not chunk:
                                return
                            buffer += chunk
                        body, buffer = buffer[:length], buffer[length:]
                    conn.sendall(self.answer(head, body))
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
