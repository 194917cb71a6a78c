"""Router throughput and latency against the same keep-alive replica:
(a) direct; (b) nginx as a reverse proxy (keep-alive upstream) with one
worker, with one worker writing a JSON access-log line per request (buffered,
as the router does), and with --workers workers; (c) the Berth router's proxy
as the product runs it (uvloop, metrics, access log through the service's log
handler) in one process and in --workers processes sharing the port (what
``--workers auto``, the default, starts on a machine with that many CPUs),
each with and without the access log. Ratios are printed like for like.

Each target runs in its own process for the whole run; load comes from wrk
(``apt-get install wrk``; a Python keep-alive load generator is used when
wrk is absent). The machine's throughput drifts by tens of percent from one
minute to the next (shared cores), so the targets are measured in turns for
several rounds and each figure is the median over the rounds; ratios are
medians of the per-round ratios, so a drift hits both sides of a ratio alike.
Also printed: the CPU time each proxy process spends per request (user and
system), which drifts much less than throughput.

Prints figures and ratios; asserts nothing.

    python bench/router_throughput.py [--rounds 3] [--duration 5] [--connections 64] [--threads 2]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HEADERS = {"X-Berth-Project": "bench", "X-Berth-Environment": "production"}
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n"
            b"Connection: keep-alive\r\n\r\nhello, berth\n")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------- processes


def serve_backend(port: int) -> None:
    """A minimal keep-alive HTTP/1.1 server (httptools), the 'replica'."""
    import httptools

    class Conn(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport  # type: ignore[assignment]
            self.parser = httptools.HttpRequestParser(self)

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_message_complete(self) -> None:
            self.transport.write(RESPONSE)  # type: ignore[attr-defined]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Conn, "127.0.0.1", port, reuse_address=True, backlog=1024)
        await server.serve_forever()

    asyncio.run(main())


def serve_router(port: int, backend: str, access_log: bool, listen_fd: int | None = None) -> None:
    """The router's proxy as ``python -m services.router`` runs it (same event
    loop, metrics, access log through the service's log handler, written to
    /dev/null here), with a fixed routing table instead of the watches."""
    import logging

    from services.common import logs
    from services.router.accesslog import logger as access_logger
    from services.router.app import run_event_loop
    from services.router.control import LoadTracker
    from services.router.metrics import RouterMetrics
    from services.router.platform import Platform
    from services.router.proxy import ProxyServer, ProxySettings
    from services.router.table import BindingEntry, EnvironmentEntry, RoutingState

    logs.configure("router", "INFO")
    logging.getLogger().handlers[0].stream = open(os.devnull, "w")  # type: ignore[attr-defined]  # noqa: SIM115
    if not access_log:
        access_logger.setLevel(logging.WARNING)  # what --no-access-log does

    async def main() -> None:
        state = RoutingState()
        state.table.upsert_environment(EnvironmentEntry("env-1", "prj-1", "bench", "production", "dep-1"))
        state.table.upsert_binding(BindingEntry("prj-1", "env-1", "dep-1", "active", True, 1, 1), "bench")
        state.endpoints.replace([("env-1", "dep-1", [backend])])
        load = LoadTracker()
        platform = Platform()
        metrics = RouterMetrics(state, load)
        platform.route("GET", "/metrics", metrics.handle)
        proxy = ProxyServer(state, platform, ProxySettings(), load=load, metrics=metrics)
        await proxy.start("127.0.0.1", port, socket.socket(fileno=listen_fd) if listen_fd is not None else None)
        await asyncio.Event().wait()

    run_event_loop(main())


NGINX_CONF = """
worker_processes {workers};
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  log_format json escape=json '{{"time": "$time_iso8601", "method": "$request_method", "path": "$uri", '
                              '"status": $status, "ms": $request_time, "peer": "$remote_addr"}}';
  access_log {access_log};
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  upstream replica {{ server {backend}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://replica;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
    }}
  }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout}s")


def spawn(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, __file__, *args], cwd=ROOT, start_new_session=True)


# ----------------------------------------------------------------- load


@dataclass
class Run:
    rps: float
    p50_ms: float
    p99_ms: float
    user_us: float = 0.0  # proxy CPU per request
    sys_us: float = 0.0


@dataclass
class Target:
    name: str
    port: int
    headers: dict[str, str]
    pids: list[int] = field(default_factory=list)  # processes whose CPU time is counted
    runs: list[Run] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in self.runs)


def run_wrk(url: str, args: argparse.Namespace, headers: dict[str, str], duration: float) -> Run:
    cmd = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{duration:g}s", "--latency"]
    for k, v in headers.items():
        cmd += ["-H", f"{k}: {v}"]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        print(f"  warning: {errors.group(1)} non-2xx responses")

    def pct(p: str) -> float:
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out)
        value, unit = float(m.group(1)), m.group(2)  # type: ignore[union-attr]
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    return Run(rps, pct("50"), pct("99"))


def run_python_load(port: int, args: argparse.Namespace, headers: dict[str, str], duration: float) -> Run:
    """Fallback: keep-alive connections from asyncio, one request at a time each."""
    head = "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    request = head.encode()
    latencies: list[float] = []

    async def one_connection(deadline: float) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            writer.write(request)
            head_bytes = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length:\s*(\d+)", head_bytes).group(1))  # type: ignore[union-attr]
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - t0)
        writer.close()

    async def main() -> float:
        start = time.perf_counter()
        deadline = start + duration
        await asyncio.gather(*(one_connection(deadline) for _ in range(args.connections)))
        return time.perf_counter() - start

    elapsed = asyncio.run(main())
    latencies.sort()
    q = statistics.quantiles(latencies, n=100)
    return Run(len(latencies) / elapsed, q[49] * 1000, q[98] * 1000)


def cpu_ticks(pids: list[int]) -> tuple[int, int]:
    """(user, system) clock ticks the processes have used so far."""
    user = system = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11])
        system += int(fields[12])
    return user, system


def load(target: Target, args: argparse.Namespace, duration: float) -> Run:
    if shutil.which("wrk"):
        return run_wrk(f"http://127.0.0.1:{target.port}/", args, target.headers, duration)
    return run_python_load(target.port, args, target.headers, duration)


def measure(target: Target, args: argparse.Namespace) -> None:
    before = cpu_ticks(target.pids)
    run = load(target, args, args.duration)
    after = cpu_ticks(target.pids)
    if target.pids:
        requests = run.rps * args.duration
        run.user_us = (after[0] - before[0]) / CLOCK_TICKS / requests * 1e6
        run.sys_us = (after[1] - before[1]) / CLOCK_TICKS / requests * 1e6
    target.runs.append(run)
    cpu = f"   proxy CPU {run.user_us + run.sys_us:5.1f} us/request (user {run.user_us:4.1f}, sys {run.sys_us:4.1f})" \
        if target.pids else ""
    print(f"  {target.name:<32} {run.rps:>9.0f} req/s   p50 {run.p50_ms:6.2f} ms   p99 {run.p99_ms:6.2f} ms{cpu}",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--serve-backend", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=2,
                        help="router worker processes of the multi-process target (and nginx workers of its reference)")
    parser.add_argument("--serve-router", nargs=3, metavar=("PORT", "BACKEND", "ACCESS_LOG"), help=argparse.SUPPRESS)
    parser.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_backend:
        serve_backend(args.serve_backend)
        return
    if args.serve_router:
        port, backend, access = args.serve_router
        serve_router(int(port), backend, access == "1", args.listen_fd)
        return

    tool = "wrk" if shutil.which("wrk") else "python load generator (install wrk for better figures)"
    print(f"load: {tool}, {args.connections} connections, {args.threads} threads, {args.duration:g}s per target, "
          f"{args.rounds} rounds; {os.cpu_count()} CPUs shared by load, proxy and replica; "
          f"load average {os.getloadavg()[0]:.2f}")
    procs: list[subprocess.Popen[bytes]] = []
    tmp = tempfile.TemporaryDirectory(prefix="berth-bench-")
    try:
        backend_port = free_port()
        procs.append(spawn("--serve-backend", str(backend_port)))
        backend = f"127.0.0.1:{backend_port}"
        targets = [Target("direct", backend_port, {})]
        nginxes: list[subprocess.Popen[bytes]] = []
        n = args.workers

        def start_nginx(name: str, workers: int, access_log: bool) -> None:
            port = free_port()
            prefix = Path(tmp.name) / f"nginx-{len(nginxes)}"
            prefix.mkdir()
            conf = prefix / "nginx.conf"
            # a JSON line per request, written in batches like the router's (buffer, flush)
            log = f"{prefix}/access.log json buffer=64k flush=1s" if access_log else "off"
            conf.write_text(NGINX_CONF.format(dir=prefix, backend=backend, port=port, workers=workers, access_log=log))
            nginx = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(prefix)], start_new_session=True,
                                     stderr=subprocess.DEVNULL)
            procs.append(nginx)
            nginxes.append(nginx)
            wait_port(port)
            time.sleep(0.2)
            pids = subprocess.run(["pgrep", "-P", str(nginx.pid)], capture_output=True, text=True).stdout.split()
            targets.append(Target(name, port, {}, [int(p) for p in pids]))

        def start_router(name: str, workers: int, access_log: bool) -> None:
            # as `--workers N` runs it: N processes, each on its own SO_REUSEPORT socket of one port
            from services.router.workers import listening_sockets

            sockets = listening_sockets("127.0.0.1", 0, workers)
            port = sockets[0].getsockname()[1]
            pids: list[int] = []
            for sock in sockets:
                router = subprocess.Popen(
                    [sys.executable, __file__, "--serve-router", str(port), backend, "1" if access_log else "0",
                     "--listen-fd", str(sock.fileno())],
                    cwd=ROOT, start_new_session=True, pass_fds=(sock.fileno(),))
                procs.append(router)
                pids.append(router.pid)
                sock.close()
            targets.append(Target(name, port, HEADERS, pids))

        have_nginx = shutil.which("nginx") is not None
        if have_nginx:
            start_nginx("nginx, 1 worker", 1, False)
            start_nginx("nginx, 1 worker, access log", 1, True)
            if n > 1:
                start_nginx(f"nginx, {n} workers", n, False)
        else:
            print("nginx not installed (apt-get install nginx-light): skipping (b)")
        start_router("router, 1 worker", 1, True)
        start_router("router, 1 worker, no access log", 1, False)
        if n > 1:
            start_router(f"router, {n} workers", n, True)
            start_router(f"router, {n} workers, no access log", n, False)

        for target in targets:  # warm-up: connections, pools, caches
            wait_port(target.port)
            load(target, args, 1)
        for round_number in range(1, args.rounds + 1):
            print(f"round {round_number}")
            for target in targets:
                measure(target, args)

        print("\nmedians over the rounds")
        for target in targets:
            cpu = f"   proxy CPU {target.median('user_us') + target.median('sys_us'):5.1f} us/request" \
                if target.pids else ""
            print(f"  {target.name:<36} {target.median('rps'):>9.0f} req/s   p50 {target.median('p50_ms'):6.2f} ms   "
                  f"p99 {target.median('p99_ms'):6.2f} ms{cpu}")
        by_name = {t.name: t for t in targets}

        def ratio(attr: str, mine: Target, theirs: Target) -> float:
            return statistics.median(
                getattr(a, attr) / getattr(b, attr) for a, b in zip(mine.runs, theirs.runs, strict=True))

        def compare(router_name: str, nginx_name: str, note: str = "") -> None:
            mine, theirs = by_name.get(router_name), by_name.get(nginx_name)
            if mine is None or theirs is None:
                return
            print(f"  {router_name} vs {nginx_name}{note}: {ratio('rps', mine, theirs):.2f}x throughput, "
                  f"p50 {ratio('p50_ms', mine, theirs):.2f}x, p99 {ratio('p99_ms', mine, theirs):.2f}x")

        direct = by_name["direct"]
        print("\nrouter / direct throughput: " + ", ".join(
            f"{t.name} {ratio('rps', t, direct):.2f}x" for t in targets if t.name.startswith("router")))
        if have_nginx:
            workers = f"{n} workers" if n > 1 else "1 worker"
            print("router / nginx (target: throughput >= 0.8x nginx with one worker, p99 <= 1.5x)")
            compare(f"router, {workers}, no access log", "nginx, 1 worker", " (neither logs)")
            compare(f"router, {workers}", "nginx, 1 worker, access log", " (both log each request)")
            compare(f"router, {workers}", "nginx, 1 worker", " (only the router logs)")
            compare("router, 1 worker, no access log", "nginx, 1 worker", " (one process each, neither logs)")
            if n > 1:
                compare(f"router, {n} workers, no access log", f"nginx, {n} workers", " (same worker count)")
    finally:
        for nginx in nginxes:
            if nginx.poll() is None:
                nginx.send_signal(signal.SIGQUIT)
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        tmp.cleanup()


if __name__ == "__main__":
    main()
