"""Differential test against nginx: the malformed requests of
``corpus/malformed_requests.txt`` go byte for byte to nginx (a subprocess
with a temporary configuration, proxying to a keep-alive replica) and to the
router (proxying to the same replica). Wherever nginx refuses a request (a
4xx/5xx of its own, or a close without an answer), the router must refuse
it too (a 4xx/5xx or a close), and the replica must never receive it.
Control entries must be served by both (the harness works).

The router may refuse more than nginx (it parses more strictly): that is
shown in the table, not an error. Needs the nginx binary (``nginx-light`` in
scripts/setup.sh); skipped, never passed, without it.
"""
from __future__ import annotations

import codecs
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.router.platform import Platform
from services.router.proxy import ProxySettings
from tests.router.backends import EchoBackend, RawClient, ResponseParseError, RouterHarness, parse_responses

CORPUS = Path(__file__).parent / "corpus" / "malformed_requests.txt"
HOST = r"Host: example.test\r\n"
ROUTE = r"X-Berth-Project: shop\r\nX-Berth-Environment: production\r\n"
ANSWER_WITHIN = 4.0  # nginx's client_header_timeout/client_body_timeout are 2 s, the router's head_timeout 1 s

NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  client_header_timeout 2s;
  client_body_timeout 2s;
  send_timeout 5s;
  keepalive_timeout 5s;
  upstream replica {{ server {backend}; keepalive 8; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://replica;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
    }}
  }}
}}
"""


@dataclass
class Entry:
    name: str
    data: bytes
    control: bool

    @property
    def marker(self) -> bytes:
        return b"/corpus/" + self.name.encode()


def load_corpus(path: Path = CORPUS) -> list[Entry]:
    entries: list[Entry] = []
    current: tuple[str, bool] | None = None
    lines: list[str] = []

    def finish() -> None:
        if current is None:
            return
        name, control = current
        text = "".join(lines)
        text = text.replace("{T}", f"/corpus/{name}").replace("{HOST}", HOST).replace("{ROUTE}", ROUTE)
        text = re.sub(r"\{H\*(\d+)\}", lambda m: "".join(f"X-H-{i}: v\\r\\n" for i in range(int(m.group(1)))), text)
        text = re.sub(r"\{(.)\*(\d+)\}", lambda m: m.group(1) * int(m.group(2)), text)
        data = codecs.escape_decode(text.encode("latin-1"))[0]
        if b"{CL}" in data:
            data = data.replace(b"{CL}", b"%d" % len(data.split(b"\r\n\r\n", 1)[1].replace(b"{CL}", b"")))
        entries.append(Entry(name, data, control))

    for raw in path.read_text(encoding="latin-1").splitlines():
        if raw.startswith("#"):
            continue
        if raw.startswith("=== "):
            finish()
            words = raw[4:].split()
            current, lines = (words[0], words[1:] == ["ok"]), []
        elif current is not None:
            lines.append(raw)
    finish()
    return entries


@dataclass
class Result:
    outcome: str  # "served <status>", "replica <status>", "refused <status>", "closed", "hang", "garbage"
    forwarded: bool  # the replica received the request (complete), or the smuggled one inside it
    smuggled: bool = False  # the replica received the request smuggled inside it

    @property
    def refused(self) -> bool:
        return (self.outcome.startswith("refused") or self.outcome == "closed") and not self.forwarded

    def __str__(self) -> str:
        return self.outcome + (" +fwd" if self.forwarded else "")


def send(port: int, entry: Entry, backend: EchoBackend) -> Result:
    before = len(backend.requests)
    client = RawClient(port, timeout=ANSWER_WITHIN)
    try:
        client.send(entry.data)
        responses = client.read_responses(1, timeout=ANSWER_WITHIN)
        if responses and not client.eof:
            client.quiet_for(0.3)  # anything more (a smuggled request's answer) shows in ``forwarded``
    finally:
        client.close()
    time.sleep(0.05)  # what the proxy forwarded reaches the replica's log
    seen = {r.target.split(b"?", 1)[0] for r in backend.requests[before:]}
    smuggled = entry.marker + b"-smuggled" in seen
    forwarded = entry.marker in seen or smuggled
    try:
        first = parse_responses(client.data, eof=client.eof)[0][:1]
    except ResponseParseError:
        return Result("garbage", forwarded, smuggled)
    if first:
        response = first[0]
        if response.header("X-Echo-Target") is not None:
            return Result(f"served {response.status}", forwarded, smuggled)
        if response.header("X-Backend-Error") is not None:
            return Result(f"replica {response.status}", True, smuggled)
        return Result(f"{'refused' if response.status >= 400 else 'answered'} {response.status}", forwarded, smuggled)
    return Result("closed" if client.eof else "hang", forwarded, smuggled)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def nginx_port(echo: EchoBackend) -> Iterator[int]:
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if binary is None:
        pytest.skip("nginx is not installed (scripts/setup.sh installs nginx-light): the differential test needs it")
    with tempfile.TemporaryDirectory(prefix="berth-nginx-") as tmp:
        port = free_port()
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=tmp, backend=echo.address, port=port))
        proc = subprocess.Popen([binary, "-p", tmp, "-c", str(conf), "-e", f"{tmp}/error.log"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        err = proc.stderr.read().decode() if proc.stderr else ""
                        raise AssertionError(f"nginx did not start: {err}") from None
                    time.sleep(0.05)
            yield port
        finally:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            if proc.stderr is not None:
                proc.stderr.close()


@pytest.fixture
def echo() -> Iterator[EchoBackend]:
    b = EchoBackend()
    yield b
    b.close()


@pytest.fixture
def router(echo: EchoBackend) -> Iterator[RouterHarness]:
    r = RouterHarness(ProxySettings(activation_timeout=1.0, upstream_timeout=3.0, head_timeout=1.0), Platform())
    r.environment("env-prod", "shop", "production", "dep-a")
    r.binding("env-prod", "dep-a", "shop")
    r.endpoints({("env-prod", "dep-a"): [echo.address]})
    yield r
    r.close()


def test_corpus_is_well_formed() -> None:
    entries = load_corpus()
    assert len(entries) >= 40
    assert len({e.name for e in entries}) == len(entries), "entry names are unique"
    for entry in entries:
        assert entry.marker in entry.data or entry.data.startswith(b"CONNECT"), entry.name


def test_where_nginx_refuses_the_router_refuses(nginx_port: int, router: RouterHarness, echo: EchoBackend) -> None:
    entries = load_corpus()
    rows: list[tuple[str, Result, Result, str]] = []
    problems: list[str] = []
    for entry in entries:
        by_nginx = send(nginx_port, entry, echo)
        by_router = send(router.port, entry, echo)
        if entry.control:
            verdict = "ok" if by_nginx.outcome == by_router.outcome == "served 200" else "CONTROL FAILED"
        elif not (by_nginx.refused or by_nginx.outcome == "hang" and not by_nginx.forwarded):
            verdict = "nginx accepts"
        elif by_router.refused:
            verdict = "both refuse"
        else:
            verdict = "ROUTER ACCEPTS"
        if verdict in ("CONTROL FAILED", "ROUTER ACCEPTS"):
            problems.append(f"{entry.name}: nginx {by_nginx}, router {by_router}; sent {entry.data[:300]!r}")
        if by_router.smuggled:
            problems.append(f"{entry.name}: through the router, a request smuggled inside it reached the replica")
        rows.append((entry.name, by_nginx, by_router, verdict))
    width = max(len(name) for name, *_ in rows)
    print(f"\n{'request':{width}}  {'nginx':20}  {'router':20}  verdict")
    for name, by_nginx, by_router, verdict in rows:
        print(f"{name:{width}}  {by_nginx!s:20}  {by_router!s:20}  {verdict}")
    print(f"{len(rows)} requests; {sum(v == 'both refuse' for *_, v in rows)} refused by both, "
          f"{sum(v == 'nginx accepts' for *_, v in rows)} accepted by nginx")
    assert not problems, "\n".join(problems)
