"""A property of the proxy, for arbitrary traffic: requests well-formed and
malformed (random framing headers: Content-Length, Transfer-Encoding, both,
duplicates, junk values; chunked bodies valid and invalid, with extensions
and trailers; bodies that contain whole requests), pipelined several to a
write or split anywhere, on a few client connections at once, some closed
early, through the router to one keep-alive replica:

* every response a client receives answers a request that client sent, in
  the order it sent them (the replica answers with the request's target, a
  per-request id, so a response carrying another request's id is caught);
* the replica sees exactly the requests the router accepted, each once,
  with the body the client sent, and nothing parsed out of a body;
* where the stream stops being HTTP, or a request must be refused, the
  router answers a 4xx/5xx error at that point (never later) and closes.

h11, a strict HTTP/1.1 parser, is the oracle: it parses each client's bytes
as a server would, which tells where every request ends and where the
stream becomes invalid. The router may refuse more than h11 (a few things
RFC 9112 allows a server either way: obs-fold, bare LF, duplicated equal
Content-Length, lower-case methods...: "grey" below), and must refuse what
h11 accepts but its own rules forbid (Content-Length with Transfer-Encoding,
duplicate Host or X-Berth-*, versions other than 1.0/1.1, TRACE).
"""
from __future__ import annotations

import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import h11
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.router.platform import Platform
from services.router.proxy import ProxySettings
from tests.router.backends import (
    EchoBackend,
    RawClient,
    RawResponse,
    ResponseParseError,
    RouterHarness,
    parse_responses,
    wait_until,
)

HOST = b"Host: example.test\r\n"
ROUTE = b"X-Berth-Project: shop\r\nX-Berth-Environment: production\r\n"
READ_DEADLINE = 4.0  # per connection, for what the router owes it
KNOWN_METHODS = {b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"}


# --------------------------------------------------------------------------
# The oracle
# --------------------------------------------------------------------------


@dataclass
class Expected:
    """One complete request in a client's stream, as h11 parsed it."""

    method: bytes
    target: bytes
    version: bytes
    body: bytes
    label: str  # "ok": must be served; "grey": may be served or refused; "refuse": must be refused
    why: str = ""


@dataclass
class Oracle:
    requests: list[Expected]
    tail: str  # "clean", "error" (h11 rejected what follows), "incomplete", "closed" (Connection: close came)
    error: str = ""

    @property
    def refusal_at(self) -> int | None:
        """Index of the first request the router must refuse (len(requests)
        for an invalid tail), or None."""
        for i, r in enumerate(self.requests):
            if r.label == "refuse":
                return i
        return len(self.requests) if self.tail == "error" else None

    @property
    def servable(self) -> int:
        """How many requests the router may answer (those before the refusal point)."""
        at = self.refusal_at
        return len(self.requests) if at is None else at


def _header_lines(head: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    for line in re.split(rb"\r?\n", head)[1:]:
        if line and line[:1] not in (b" ", b"\t"):
            name, _, value = line.partition(b":")
            out.append((name.strip().lower(), value.strip()))
    return out


def _label(event: h11.Request, head: bytes) -> tuple[str, str]:
    """What the router must do with a request h11 accepted (``head``: its raw bytes)."""
    lines = _header_lines(head)
    names = [n for n, _ in lines]
    if names.count(b"host") > 1:
        return "refuse", "two Host headers"
    for name in set(names):
        if name.startswith(b"x-berth-") and names.count(name) > 1:
            return "refuse", f"two {name.decode()} headers"
    if event.http_version not in (b"1.0", b"1.1"):
        return "refuse", f"HTTP/{event.http_version.decode()}"
    if event.method in (b"TRACE", b"CONNECT"):
        return "refuse", event.method.decode()
    if b"content-length" in names and b"transfer-encoding" in names:
        return "refuse", "Content-Length and Transfer-Encoding"
    if event.http_version == b"1.0" and b"transfer-encoding" in names:
        return "refuse", "Transfer-Encoding in HTTP/1.0 (faulty framing, RFC 9112 §6.1)"
    if re.search(rb"(?<!\r)\n", head):
        return "grey", "bare LF"
    if re.search(rb"\n[ \t]", head):
        return "grey", "obs-fold"
    if names.count(b"content-length") > 1 or any(b"," in v for n, v in lines if n == b"content-length"):
        return "grey", "Content-Length repeated with one value"
    if any(v != b"chunked" for n, v in lines if n == b"transfer-encoding"):
        return "grey", "Transfer-Encoding: chunked in another case"
    if event.method not in KNOWN_METHODS:
        return "grey", f"method {event.method!r}"
    return "ok", ""


def _one_request(data: bytes) -> tuple[str, h11.Request | None, bytes, int, bool, str]:
    """Parses the request at the start of ``data`` with a fresh h11 server
    connection: (outcome "complete" / "incomplete" / "error", the request,
    its body, its length in bytes, whether the connection must close after
    it, h11's error)."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
    conn.receive_data(data)  # (never b"": that is the end of the stream to h11)
    request: h11.Request | None = None
    body: list[bytes] = []
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            return "error", request, b"", 0, False, str(exc)
        if event is h11.NEED_DATA:
            return "incomplete", request, b"", 0, False, ""
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            consumed = len(data) - len(conn.trailing_data[0])
            conn.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
            conn.send(h11.EndOfMessage())
            return "complete", request, b"".join(body), consumed, conn.our_state is h11.MUST_CLOSE, ""


def oracle(stream: bytes) -> Oracle:
    """Parses ``stream`` as a server would (h11, one request at a time): the
    complete requests, and what comes after the last one. Empty lines before
    a request line, which RFC 9112 §2.2 lets a server skip and h11 refuses,
    are skipped and make that request grey."""
    requests: list[Expected] = []
    pos = 0
    while pos < len(stream):
        blank = re.match(rb"(?:\r?\n)+", stream[pos:])
        skipped = blank.end() if blank else 0
        if skipped and pos + skipped == len(stream):
            return Oracle(requests, "clean")  # (trailing empty lines: the router may wait or close)
        outcome, request, body, length, must_close, error = _one_request(stream[pos + skipped:])
        if outcome == "error":
            return Oracle(requests, "error", error)
        if outcome == "incomplete":
            return Oracle(requests, "incomplete")
        assert request is not None
        segment = stream[pos + skipped:pos + skipped + length]
        blank_line = re.search(rb"\n\r?\n", segment)  # where h11 found the end of the head
        label, why = _label(request, segment[:blank_line.end()] if blank_line else segment)
        if skipped and label == "ok":
            label, why = "grey", "empty lines before the request line"
        requests.append(Expected(bytes(request.method), bytes(request.target), bytes(request.http_version), body,
                                 label, why))
        pos += skipped + length
        if must_close:
            return Oracle(requests, "closed")
    return Oracle(requests, "clean")


# --------------------------------------------------------------------------
# Traffic
# --------------------------------------------------------------------------

GOOD_FRAMINGS = ["none", "cl", "chunked", "cl_zero", "chunked_ext", "chunked_trailer", "conn_cl", "conn_te"]
BAD_FRAMINGS = [
    "cl_short", "cl_long", "cl_te", "te_cl", "cl_dup_same", "cl_dup_diff", "cl_list_same", "cl_junk", "te_junk",
    "te_twice", "te_case", "bad_chunk", "chunk_overrun",
]
FLAWS = ["framing", "framing", "framing", "version", "host", "routing", "junk", "method", "bare_lf"]
CL_JUNK = [b"abc", b"-5", b"+5", b"5 5", b"0x5", b"5;", b"", b"1" * 30]
TE_JUNK = [b"xchunked", b"chunked, identity", b"gzip, chunked", b"identity", b"chunked;q=1", b"chunk"]
BAD_SIZES = [b"zz", b"-1", b"0x5", b"", b"1" * 25, b"5\x00"]
JUNK_LINES = [b"X-Bad : v", b"X Bad: v", b"X-Bad: a\x00b", b" folded", b"NoColon", b"X-Ok: fine", b"\x01X: v",
              b"X-Utf8: \xc3\xa9"]


def _one_in(draw: Any, n: int) -> bool:
    """True about once in ``n`` draws (the simplest draw, which Hypothesis
    favours, is False)."""
    return draw(st.integers(0, n - 1)) == n - 1


@st.composite
def requests_for(draw: Any, nonce: str, connection: int, index: int) -> bytes:
    """One request: well-formed, or (about 4 in 10) with one flaw."""
    flaw = draw(st.sampled_from(FLAWS)) if draw(st.integers(0, 9)) >= 6 else None
    target = f"/{nonce}/c{connection}/r{index}".encode()
    if _one_in(draw, 5):
        target += b"?delay=%d" % draw(st.sampled_from([5, 20]))
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH"]))
    if flaw == "method":
        method = draw(st.sampled_from([b"TRACE", b"get", b"FOO"]))
    version = b"HTTP/1.0" if _one_in(draw, 8) else b"HTTP/1.1"
    if flaw == "version":
        version = draw(st.sampled_from([b"HTTP/2.0", b"HTTP/1.2", b"HTTP/0.9"]))
    framing = draw(st.sampled_from(BAD_FRAMINGS if flaw == "framing" else GOOD_FRAMINGS))
    if version == b"HTTP/1.0" and flaw != "framing":
        framing = "none"  # (h11 closes after any 1.0 request; the router may keep it alive when asked)
    headers = [HOST] if flaw != "host" else draw(st.sampled_from([[], [HOST, HOST], [HOST, b"Host: other.test\r\n"]]))
    headers.append(ROUTE)
    if flaw == "routing":
        headers.append(draw(st.sampled_from([b"X-Berth-Project: shop\r\n", b"X-Berth-Project: other\r\n",
                                             b"X-Berth-Environment: production\r\n", b"x-berth-project: shop\r\n"])))
    if version == b"HTTP/1.1":
        connection_header = draw(st.sampled_from([None, b"keep-alive", b"keep-alive, Content-Length",
                                                  b"keep-alive, Transfer-Encoding", b"Content-Length"]))
        if _one_in(draw, 12):
            connection_header = b"close"
        if connection_header is not None:
            headers.append(b"Connection: " + connection_header + b"\r\n")
    if flaw == "junk":
        headers.append(draw(st.sampled_from(JUNK_LINES)) + b"\r\n")
    payload = draw(st.one_of(
        st.binary(min_size=0, max_size=40),
        st.just(b"GET /" + nonce.encode() + b"/smuggled-c%d-r%d HTTP/1.1\r\n" % (connection, index) + HOST + ROUTE
                + b"\r\n"),
    ))
    body = b""
    if framing == "cl":
        headers.append(b"Content-Length: %d\r\n" % len(payload))
        body = payload
    elif framing == "cl_zero":
        headers.append(b"Content-Length: 0\r\n")
    elif framing == "conn_cl":
        headers.append(b"Content-Length: %d\r\n" % len(payload))
        if version == b"HTTP/1.1" and not any(h.startswith(b"Connection:") for h in headers):
            headers.append(b"Connection: keep-alive, Content-Length\r\n")
        body = payload
    elif framing == "cl_short":
        cut = draw(st.integers(0, len(payload)))
        headers.append(b"Content-Length: %d\r\n" % cut)
        body = payload  # the rest is read as what follows
    elif framing == "cl_long":
        headers.append(b"Content-Length: %d\r\n" % (len(payload) + draw(st.integers(1, 40))))
        body = payload  # the next request's bytes are this one's body
    elif framing in ("chunked", "chunked_ext", "chunked_trailer", "conn_te", "te_case", "bad_chunk", "chunk_overrun",
                     "cl_te", "te_cl", "te_twice"):
        size = draw(st.integers(1, 8))
        pieces = [payload[i:i + size] for i in range(0, len(payload), size)]
        ext = b";ext=1" if framing == "chunked_ext" else b""
        chunks = [b"%x%b\r\n%b\r\n" % (len(p), ext, p) for p in pieces]
        if framing == "bad_chunk":
            chunks.insert(draw(st.integers(0, len(chunks))), draw(st.sampled_from(BAD_SIZES)) + b"\r\nxyz\r\n")
        if framing == "chunk_overrun" and chunks:
            chunks[0] = b"%x\r\n%bEXTRA\r\n" % (len(pieces[0]), pieces[0])
        trailer = b"X-Trailer: t\r\n" if framing == "chunked_trailer" else b""
        body = b"".join(chunks) + b"0" + ext + b"\r\n" + trailer + b"\r\n"
        coding = b"Chunked" if framing == "te_case" else b"chunked"
        if framing == "cl_te":
            headers.append(b"Content-Length: %d\r\n" % len(body))
        headers.append(b"Transfer-Encoding: " + coding + b"\r\n")
        if framing == "te_twice":
            headers.append(b"Transfer-Encoding: chunked\r\n")
        if framing == "te_cl":
            headers.append(b"Content-Length: %d\r\n" % draw(st.sampled_from([0, 3, len(body)])))
        if framing == "conn_te" and version == b"HTTP/1.1" and not any(h.startswith(b"Connection:") for h in headers):
            headers.append(b"Connection: keep-alive, Transfer-Encoding\r\n")
    elif framing == "cl_dup_same":
        headers.append(b"Content-Length: %d\r\nContent-Length: %d\r\n" % (len(payload), len(payload)))
        body = payload
    elif framing == "cl_list_same":
        headers.append(b"Content-Length: %d, %d\r\n" % (len(payload), len(payload)))
        body = payload
    elif framing == "cl_dup_diff":
        headers.append(b"Content-Length: %d\r\nContent-Length: %d\r\n" % (len(payload), len(payload) + 1))
        body = payload
    elif framing == "cl_junk":
        headers.append(b"Content-Length: " + draw(st.sampled_from(CL_JUNK)) + b"\r\n")
        body = payload
    elif framing == "te_junk":
        headers.append(b"Transfer-Encoding: " + draw(st.sampled_from(TE_JUNK)) + b"\r\n")
        body = b"5\r\nhello\r\n0\r\n\r\n"
    data = method + b" " + target + b" " + version + b"\r\n" + b"".join(headers) + b"\r\n" + body
    if flaw == "bare_lf":
        data = data.replace(b"\r\n", b"\n")  # bare LF line ends throughout
    return data


@dataclass
class Plan:
    stream: bytes
    writes: list[bytes]
    pause: float  # between writes
    early_close: bool  # sends (a prefix of) its stream and closes without reading
    abort: bool  # ... with a RST rather than a FIN


@st.composite
def connection_plans(draw: Any, nonce: str, connection: int) -> Plan:
    count = draw(st.integers(1, 5))
    stream = b"".join(draw(requests_for(nonce, connection, i)) for i in range(count))
    early_close = _one_in(draw, 6)
    if early_close:
        stream = stream[:draw(st.integers(0, len(stream)))]
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(stream) - 1)), max_size=4))))
    bounds = [0, *[c for c in cuts if c < len(stream)], len(stream)]
    writes = [stream[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
    return Plan(stream, writes, draw(st.sampled_from([0.0, 0.0, 0.005, 0.02])), early_close, draw(st.booleans()))


@st.composite
def traffic(draw: Any) -> tuple[str, list[Plan]]:
    nonce = uuid.uuid4().hex[:8]
    return nonce, [draw(connection_plans(nonce, c)) for c in range(draw(st.integers(1, 3)))]


# --------------------------------------------------------------------------
# Running one example
# --------------------------------------------------------------------------


@dataclass
class Outcome:
    plan: Plan
    expected: Oracle
    data: bytes = b""
    eof: bool = False
    responses: list[RawResponse] = field(default_factory=list)
    leftover: bytes = b""
    error: str = ""


def drive(port: int, plan: Plan, outcome: Outcome) -> None:
    try:
        client = RawClient(port, timeout=READ_DEADLINE)
    except OSError as exc:
        outcome.error = f"connect: {exc}"
        return
    try:
        for i, piece in enumerate(plan.writes):
            if i and plan.pause:
                time.sleep(plan.pause)
            if not client.send(piece):
                break
        if plan.early_close:
            if plan.abort:
                client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            return
        expected = outcome.expected
        must_close = expected.refusal_at is not None or expected.tail == "closed"
        deadline = time.monotonic() + READ_DEADLINE
        while time.monotonic() < deadline:
            try:
                responses = parse_responses(client.data, eof=client.eof)[0]
            except ResponseParseError:
                break
            if client.eof or (not must_close and len(responses) >= expected.servable):
                break
            client._recv(min(0.2, deadline - time.monotonic()))
        outcome.data, outcome.eof = client.data, client.eof
    finally:
        client.close()


def describe(outcome: Outcome) -> str:
    e = outcome.expected
    reqs = "; ".join(f"{r.method.decode('latin-1')} {r.target.decode('latin-1')} [{r.label}{': ' + r.why if r.why else ''}]"
                     for r in e.requests)
    return (f"\n  stream {outcome.plan.stream!r}\n  writes {len(outcome.plan.writes)}, early close "
            f"{outcome.plan.early_close}\n  h11: {reqs} | tail {e.tail} {e.error}\n  received {outcome.data[:600]!r}"
            f" eof={outcome.eof}")


def check(outcomes: list[Outcome], backend: EchoBackend) -> None:
    assert not backend.errors, f"the router forwarded bytes that are no HTTP: {backend.errors}"
    upstream = list(backend.requests)
    seen_targets = [r.target for r in upstream]
    assert len(seen_targets) == len(set(seen_targets)), f"a request reached the replica twice: {seen_targets}"
    owner: dict[bytes, tuple[int, int]] = {}
    for c, outcome in enumerate(outcomes):
        for j, r in enumerate(outcome.expected.requests):
            owner.setdefault(r.target, (c, j))
    stray = [u for u in upstream if u.target not in owner]
    assert not stray, "the replica got requests no client sent (parsed out of a body?): " + repr(stray) + "".join(
        describe(o) for o in outcomes)
    for c, outcome in enumerate(outcomes):
        e, plan, where = outcome.expected, outcome.plan, describe(outcome)
        limit = e.servable
        # what reached the replica from this connection: requests it could serve, in order, bodies intact
        mine = [u for u in upstream if owner.get(u.target, (None,))[0] == c]
        positions = []
        for u in mine:
            j = owner[u.target][1]
            r = e.requests[j]
            assert j < limit, f"connection {c}: the replica got {u!r}, which the router had to refuse{where}"
            assert (u.method, u.body) == (r.method, r.body), f"connection {c}: {u!r} is not what was sent{where}"
            positions.append(j)
        assert positions == sorted(positions), f"connection {c}: requests reached the replica out of order{where}"
        if plan.early_close:
            continue
        assert not outcome.error, outcome.error + where
        try:
            responses, leftover = parse_responses(outcome.data, eof=outcome.eof)
        except ResponseParseError as exc:
            raise AssertionError(f"connection {c}: the client got bytes that are no response: {exc}{where}") from None
        assert not leftover or not outcome.eof, f"connection {c}: a partial response before the close{where}"
        refused = False
        for j, response in enumerate(responses):
            assert not refused, f"connection {c}: a response after the router's refusal{where}"
            echoed = response.header("X-Echo-Target")
            if echoed is not None:
                assert j < len(e.requests) and echoed.encode() == e.requests[j].target, \
                    f"connection {c}: response {j} answers {echoed!r}, not request {j}{where}"
                assert response.status == 200 and j < limit, f"connection {c}: request {j} had to be refused{where}"
            else:
                assert 400 <= response.status < 600, f"connection {c}: response {j} {response!r}{where}"
                assert j >= len(e.requests) or e.requests[j].label != "ok", \
                    f"connection {c}: the well-formed request {j} was refused {response!r}{where}"
                assert j <= limit, f"connection {c}: refused only after a request it had to refuse{where}"
                assert (response.header("Connection") or "").lower() == "close", where
                refused = True
        served = [int(r.header("X-Echo-Target") is not None) for r in responses]
        answered = sum(served)
        targets = {r.target for r in mine}
        echoed_targets = {r.header("X-Echo-Target").encode() for r in responses if r.header("X-Echo-Target")}
        assert echoed_targets == targets, \
            f"connection {c}: the replica saw {sorted(targets)}, the client got answers for {sorted(echoed_targets)}{where}"
        if e.refusal_at is not None:
            assert refused and outcome.eof, \
                f"connection {c}: the router had to refuse request {e.refusal_at} and close{where}"
        elif not refused:
            assert answered == len(e.requests), \
                f"connection {c}: {answered} of {len(e.requests)} requests answered{where}"
            if e.tail == "closed":
                assert outcome.eof, f"connection {c}: still open after Connection: close{where}"
            elif e.tail == "clean":
                assert not outcome.eof, f"connection {c}: a keep-alive connection was closed{where}"


def run(plans: list[Plan]) -> None:
    backend = EchoBackend()
    router = RouterHarness(ProxySettings(activation_timeout=2.0, upstream_timeout=5.0, head_timeout=1.0,
                                         keepalive_timeout=10.0), Platform())
    try:
        router.environment("env-prod", "shop", "production", "dep-a")
        router.binding("env-prod", "dep-a", "shop")
        router.endpoints({("env-prod", "dep-a"): [backend.address]})
        outcomes = [Outcome(plan, oracle(plan.stream)) for plan in plans]
        threads = [threading.Thread(target=drive, args=(router.port, o.plan, o)) for o in outcomes]
        for t in threads:
            t.start()
        for t in threads:
            t.join(READ_DEADLINE + 5)
        # let whatever the router still has in flight reach the replica before judging
        wait_until(lambda: router.on_loop(lambda: router.proxy.load.in_flight) == 0, timeout=READ_DEADLINE,
                   what="requests in flight to finish")
        check(outcomes, backend)
    finally:
        router.close()
        backend.close()


@settings(max_examples=100, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(traffic())
def test_every_response_answers_its_own_request_and_the_replica_sees_only_accepted_ones(
        generated: tuple[str, list[Plan]]) -> None:
    _, plans = generated
    run(plans)


def test_the_oracle() -> None:
    """The oracle itself, on the cases the property relies on."""
    get = b"GET /a HTTP/1.1\r\n" + HOST + b"\r\n"
    assert [(r.target, r.label) for r in oracle(get + get).requests] == [(b"/a", "ok"), (b"/a", "ok")]
    assert oracle(get).tail == "clean" and oracle(get[:-3]).tail == "incomplete"
    smuggle = b"POST /p HTTP/1.1\r\n" + HOST + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    assert oracle(smuggle).requests[0].label == "refuse" and oracle(smuggle).refusal_at == 0
    assert oracle(b"GET /a HTTP/1.1\r\n" + HOST + HOST + b"\r\n").tail == "error"  # h11 refuses two Host itself
    assert oracle(b"POST /p HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n").refusal_at == 0
    short = b"POST /p HTTP/1.1\r\n" + HOST + b"Content-Length: 0\r\n\r\n" + get
    assert [r.target for r in oracle(short).requests] == [b"/p", b"/a"]
    close = b"GET /c HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n"
    assert oracle(close + get).tail == "closed" and len(oracle(close + get).requests) == 1
    assert oracle(b"GET /a HTTP/1.1\n" + HOST.replace(b"\r\n", b"\n") + b"\n").requests[0].label == "grey"
    assert oracle(b"TRACE /a HTTP/1.1\r\n" + HOST + b"\r\n").requests[0].label == "refuse"
    assert oracle(b"GET /a HTTP/2.0\r\n" + HOST + b"\r\n").requests[0].label == "refuse"
    skipped = oracle(get + b"\r\n\n" + get)
    assert [r.label for r in skipped.requests] == ["ok", "grey"] and skipped.tail == "clean"
    body = b"POST /b HTTP/1.1\r\n" + HOST + b"Content-Length: 5\r\n\r\nX: 1\n"
    assert oracle(body).requests[0].label == "ok"  # (a body's lines are no headers)
