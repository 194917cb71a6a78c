"""Router throughput and latency against the same keep-alive replica:
(a) direct, (b) nginx as a reverse proxy (one worker, keep-alive upstream),
(c) the Berth router (metrics on; access log off, then on).

Each target runs in its own process; load comes from wrk (``apt-get install
wrk``; a Python keep-alive load generator is used when wrk is absent).
Prints figures and ratios; asserts nothing.

    python bench/router_throughput.py [--duration 5] [--connections 64] [--threads 2]
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HEADERS = {"X-Berth-Project": "bench", "X-Berth-Environment": "production"}
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n"
            b"Connection: keep-alive\r\n\r\nhello, berth\n")


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


def serve_router(port: int, backend: str, access_log: bool) -> None:
    import logging

    from services.common import logs
    from services.router.control import LoadTracker
    from services.router.metrics import RouterMetrics
    from services.router.platform import Platform
    from services.router.proxy import ProxyServer, ProxySettings
    from services.router.table import BindingEntry, EnvironmentEntry, RoutingState

    logs.configure("router", "INFO" if access_log else "WARNING")
    if access_log:
        logging.getLogger().handlers[0].stream = open(os.devnull, "w")  # type: ignore[attr-defined]  # noqa: SIM115

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
        await proxy.start("127.0.0.1", port)
        await asyncio.Event().wait()

    asyncio.run(main())


NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
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


def run_wrk(url: str, args: argparse.Namespace, headers: dict[str, str]) -> tuple[float, float, float]:
    cmd = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration}s", "--latency"]
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

    return rps, pct("50"), pct("99")


def run_python_load(port: int, args: argparse.Namespace, headers: dict[str, str]) -> tuple[float, float, float]:
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
        deadline = start + args.duration
        await asyncio.gather(*(one_connection(deadline) for _ in range(args.connections)))
        return time.perf_counter() - start

    elapsed = asyncio.run(main())
    latencies.sort()
    q = statistics.quantiles(latencies, n=100)
    return len(latencies) / elapsed, q[49] * 1000, q[98] * 1000


def measure(name: str, port: int, args: argparse.Namespace, headers: dict[str, str]) -> tuple[float, float, float]:
    wait_port(port)
    url = f"http://127.0.0.1:{port}/"
    load = (lambda: run_wrk(url, args, headers)) if shutil.which("wrk") else (
        lambda: run_python_load(port, args, headers))
    # warm-up (connections, pools, caches), then the measured run
    warm = argparse.Namespace(**{**vars(args), "duration": 1})
    (run_wrk(url, warm, headers) if shutil.which("wrk") else run_python_load(port, warm, headers))
    rps, p50, p99 = load()
    print(f"{name:<22} {rps:>10.0f} req/s   p50 {p50:7.2f} ms   p99 {p99:7.2f} ms", flush=True)
    return rps, p50, p99


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--serve-backend", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-router", nargs=3, metavar=("PORT", "BACKEND", "ACCESS_LOG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_backend:
        serve_backend(args.serve_backend)
        return
    if args.serve_router:
        port, backend, access = args.serve_router
        serve_router(int(port), backend, access == "1")
        return

    tool = "wrk" if shutil.which("wrk") else "python load generator (install wrk for better figures)"
    print(f"load: {tool}, {args.connections} connections, {args.threads} threads, {args.duration}s per target; "
          f"{os.cpu_count()} CPUs shared by load, proxy and replica")
    procs: list[subprocess.Popen[bytes]] = []
    tmp = tempfile.TemporaryDirectory(prefix="berth-bench-")
    try:
        backend_port = free_port()
        procs.append(spawn("--serve-backend", str(backend_port)))
        backend = f"127.0.0.1:{backend_port}"
        results: dict[str, tuple[float, float, float]] = {}
        results["direct"] = measure("direct", backend_port, args, {})

        if shutil.which("nginx"):
            nginx_port = free_port()
            conf = Path(tmp.name) / "nginx.conf"
            conf.write_text(NGINX_CONF.format(dir=tmp.name, backend=backend, port=nginx_port))
            nginx = subprocess.Popen(["nginx", "-c", str(conf), "-p", tmp.name], start_new_session=True,
                                     stderr=subprocess.DEVNULL)
            procs.append(nginx)
            results["nginx"] = measure("nginx (1 worker)", nginx_port, args, {})
            nginx.send_signal(signal.SIGQUIT)
            nginx.wait(10)
        else:
            print("nginx not installed (apt-get install nginx-light): skipping (b)")

        for access, label in (("0", "router"), ("1", "router + access log")):
            router_port = free_port()
            router = spawn("--serve-router", str(router_port), backend, access)
            procs.append(router)
            results[label] = measure(label, router_port, args, HEADERS)
            router.terminate()
            router.wait(10)

        print()
        base = results.get("nginx")
        for label in ("router", "router + access log"):
            rps, p50, p99 = results[label]
            line = f"{label}: {rps / results['direct'][0]:.2f}x direct throughput"
            if base:
                line += (f", {rps / base[0]:.2f}x nginx throughput, p50 {p50 / base[1]:.2f}x nginx, "
                         f"p99 {p99 / base[2]:.2f}x nginx")
            print(line)
    finally:
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
