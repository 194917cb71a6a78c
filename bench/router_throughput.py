"""Router throughput and latency against the same keep-alive replica:
(a) direct, (b) nginx as a reverse proxy (one worker, keep-alive upstream;
also with --workers worker processes, for a like-for-like reference), (c)
the Berth router's proxy as the product runs it (uvloop, metrics and access
log on) in one process, (d) the same without the access log, and (e) in
--workers processes sharing the port, which is what ``--workers auto`` (the
default) starts on a machine with that many CPUs.

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
        if shutil.which("nginx"):
            for workers in sorted({1, args.workers}):
                nginx_port = free_port()
                prefix = Path(tmp.name) / f"nginx-{workers}"
                prefix.mkdir()
                conf = prefix / "nginx.conf"
                conf.write_text(NGINX_CONF.format(dir=prefix, backend=backend, port=nginx_port, workers=workers))
                nginx = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(prefix)], start_new_session=True,
                                         stderr=subprocess.DEVNULL)
                procs.append(nginx)
                nginxes.append(nginx)
                wait_port(nginx_port)
                time.sleep(0.2)
                pids = subprocess.run(["pgrep", "-P", str(nginx.pid)], capture_output=True, text=True).stdout.split()
                name = "nginx (1 worker)" if workers == 1 else f"nginx ({workers} workers)"
                targets.append(Target(name, nginx_port, {}, [int(p) for p in pids]))
        else:
            print("nginx not installed (apt-get install nginx-light): skipping (b)")
        for access, label in (("1", "router, 1 worker"), ("0", "router, 1 worker, no access log")):
            router_port = free_port()
            router = spawn("--serve-router", str(router_port), backend, access)
            procs.append(router)
            targets.append(Target(label, router_port, HEADERS, [router.pid]))
        if args.workers > 1:
            # as `--workers N` runs it: N processes, each on its own SO_REUSEPORT socket of one port
            from services.router.workers import listening_sockets

            sockets = listening_sockets("127.0.0.1", 0, args.workers)
            router_port = sockets[0].getsockname()[1]
            router_pids: list[int] = []
            for sock in sockets:
                router = subprocess.Popen(
                    [sys.executable, __file__, "--serve-router", str(router_port), backend, "1",
                     "--listen-fd", str(sock.fileno())],
                    cwd=ROOT, start_new_session=True, pass_fds=(sock.fileno(),))
                procs.append(router)
                router_pids.append(router.pid)
                sock.close()
            targets.append(Target(f"router, {args.workers} workers", router_port, HEADERS, router_pids))

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
            print(f"  {target.name:<32} {target.median('rps'):>9.0f} req/s   p50 {target.median('p50_ms'):6.2f} ms   "
                  f"p99 {target.median('p99_ms'):6.2f} ms{cpu}")
        print()
        by_name = {t.name: t for t in targets}
        direct, base = by_name["direct"], by_name.get("nginx (1 worker)")
        for target in targets:
            if not target.name.startswith("router"):
                continue
            def ratio(attr: str, other: Target, target: Target = target) -> float:
                return statistics.median(
                    getattr(mine, attr) / getattr(theirs, attr) for mine, theirs in zip(target.runs, other.runs, strict=True))
            line = f"{target.name}: {ratio('rps', direct):.2f}x direct throughput"
            if base:
                line += (f", {ratio('rps', base):.2f}x nginx throughput (target >= 0.8), "
                         f"p50 {ratio('p50_ms', base):.2f}x nginx, p99 {ratio('p99_ms', base):.2f}x nginx "
                         f"(target <= 1.5)")
            print(line)
        nginx_n = by_name.get(f"nginx ({args.workers} workers)")
        router_n = by_name.get(f"router, {args.workers} workers")
        if nginx_n and router_n:
            throughput = statistics.median(
                mine.rps / theirs.rps for mine, theirs in zip(router_n.runs, nginx_n.runs, strict=True))
            print(f"for reference, like for like: {router_n.name}: {throughput:.2f}x {nginx_n.name} throughput")
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
