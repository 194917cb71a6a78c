"""Wiring: flags, the watches, the health probe, the proxy server, the REST
API and metrics, activation and load reports, and a graceful shutdown on
SIGTERM/SIGINT."""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

import uvloop

from services.common import logs
from services.common.config import add_common_flags, env
from services.router.accesslog import logger as access_logger
from services.router.api import PREFIX, RestApi, Services
from services.router.control import Activator, LoadReporter, LoadTracker, SchedulerLink
from services.router.metrics import RouterMetrics
from services.router.platform import Platform, Readiness, build_platform
from services.router.proxy import ProxyServer, ProxySettings
from services.router.table import RoutingState
from services.router.watchers import EndpointWatcher, HealthProbe, RegistryWatcher, run_forever
from services.router.workers import METRICS_PUBLISH_INTERVAL, SharedState, Supervisor, die_with_parent, worker_count
from services.studio.handler import Studio

log = logging.getLogger("berth.router")

DEPENDENCIES = {
    "registry": "berth.v1.Registry",
    "secrets": "berth.v1.Secrets",
    "scheduler": "berth.v1.Scheduler",
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m services.router", description="Berth's HTTP router")
    add_common_flags(parser, default_port=8080)
    parser.add_argument("--domain", default=env("BERTH_DOMAIN", "localhost"),
                        help="hosts {environment}.{project}.DOMAIN are routed (env BERTH_DOMAIN)")
    parser.add_argument("--activation-timeout", type=float, default=float(env("BERTH_ACTIVATION_TIMEOUT", "30")),
                        help="seconds a request waits for a ready replica before 503 (env BERTH_ACTIVATION_TIMEOUT)")
    parser.add_argument("--upstream-timeout", type=float, default=float(env("BERTH_UPSTREAM_TIMEOUT", "60")),
                        help="seconds of upstream silence before 504")
    parser.add_argument("--max-body-bytes", type=int, default=int(env("BERTH_MAX_BODY_BYTES", str(10 * 1024 * 1024))),
                        help="largest request body accepted (413 beyond)")
    parser.add_argument("--shutdown-grace", type=float, default=float(env("BERTH_SHUTDOWN_GRACE", "10")),
                        help="seconds in-flight requests get to finish on SIGTERM")
    parser.add_argument("--load-report-interval", type=float,
                        default=float(env("BERTH_LOAD_REPORT_INTERVAL", "1")),
                        help="seconds between load reports to the scheduler")
    parser.add_argument("--event-loop", choices=("uvloop", "asyncio"), default=env("BERTH_ROUTER_EVENT_LOOP", "uvloop"),
                        help="uvloop (libuv: less CPU per proxied request) or the standard asyncio "
                             "loop (env BERTH_ROUTER_EVENT_LOOP)")
    parser.add_argument("--no-access-log", action="store_true",
                        default=env("BERTH_ACCESS_LOG", "on").lower() in ("off", "0", "false", "no"),
                        help="do not log a line per request (env BERTH_ACCESS_LOG=off)")
    parser.add_argument("--workers", default=env("BERTH_ROUTER_WORKERS", "auto"),
                        help="router processes sharing the port (SO_REUSEPORT), each proxying on its own core: a "
                             "number, or 'auto' for one per CPU up to 8 (env BERTH_ROUTER_WORKERS)")
    parser.add_argument("--health-interval", type=float, default=2.0, help=argparse.SUPPRESS)
    # set by the worker supervisor for each worker process
    parser.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--shared-dir", help=argparse.SUPPRESS)
    parser.add_argument("--supervisor-pid", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.worker_total = worker_count(args.workers)
    except ValueError as exc:
        parser.error(str(exc))
    return args


class RouterApp:
    """The router process, startable in-process (tests) or from ``main``."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.state = RoutingState()
        self.state.loaded = False  # until the registry watch delivers its snapshot
        # One of several worker processes sharing the port (see workers.py)?
        self.shared: SharedState | None = None
        if args.worker_index is not None:
            self.shared = SharedState(Path(args.shared_dir), args.worker_index, args.worker_count)
            self.state.on_revision = self._revision_applied
        self.registry_watch = RegistryWatcher(args.registry, args.service_token, self.state)
        self.endpoint_watch = EndpointWatcher(
            args.scheduler, args.service_token, self.state, on_removed=lambda gone: self.proxy.pool.forget(gone)
        )
        addresses = {"registry": args.registry, "secrets": args.secrets, "scheduler": args.scheduler}
        self.probe = HealthProbe(
            {name: (addresses[name], service) for name, service in DEPENDENCIES.items()},
            interval=args.health_interval,
        )
        self.load = LoadTracker()
        self.scheduler_link = SchedulerLink(args.scheduler, args.service_token)
        self.activator = Activator(self.scheduler_link.activate, hold=args.activation_timeout)
        self.load_reporter = LoadReporter(self.load, self.scheduler_link.report_load, args.load_report_interval)
        self.metrics = RouterMetrics(self.state, self.load, held=lambda: self.state.endpoints.waiting,
                                     peers=self.shared.peer_metrics if self.shared else list)
        self.services = Services(args.registry, args.secrets, args.scheduler)
        self.api = RestApi(self.services, self.state, workers=self.shared)
        self.platform: Platform = build_platform(Readiness(self.not_ready))
        self.platform.mount(PREFIX, self.api.handle)
        self.platform.route("GET", "/metrics", self.metrics.handle)
        self.platform.mount("/studio", Studio())
        self.proxy = ProxyServer(
            self.state,
            self.platform,
            ProxySettings(
                domain=args.domain,
                activation_timeout=args.activation_timeout,
                upstream_timeout=args.upstream_timeout,
                max_body_bytes=args.max_body_bytes,
            ),
            load=self.load,
            metrics=self.metrics,
            activator=self.activator,
        )
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def port(self) -> int:
        return self.proxy.port

    def _revision_applied(self, revision: int) -> None:
        assert self.shared is not None
        self.shared.publish_revision(revision, loaded=self.state.loaded)

    def not_ready(self) -> list[str]:
        waiting = []
        for watch in (self.registry_watch, self.endpoint_watch):
            if not watch.synced.is_set():
                why = f" (last error: {watch.last_error})" if watch.last_error else ""
                waiting.append(f"{watch.name} watch at {watch.address} has not delivered its first snapshot{why}")
        for name in DEPENDENCIES:
            if not self.probe.serving(name):
                waiting.append(f"{name} is {self.probe.status[name]}")
        if self.shared is not None:
            waiting += [f"router worker {i} has not loaded its routing table" for i in self.shared.not_loaded()]
        return waiting

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        sock = None
        if self.args.listen_fd is not None:
            sock = socket.socket(fileno=self.args.listen_fd)
        port = await self.proxy.start(self.args.host, self.args.port, sock)
        tasks = [
            ("registry_watch", self.registry_watch.run),
            ("endpoint_watch", self.endpoint_watch.run),
            ("health_probe", self.probe.run),
            ("load_reports", self.load_reporter.run),
        ]
        if self.shared is not None:
            self.shared.publish_revision(0, loaded=False)  # a restarted worker: nothing routed by it yet
            tasks.append(("metrics_publisher", self._publish_metrics))
        for name, fn in tasks:
            self._tasks.append(loop.create_task(run_forever(name, fn), name=name))
        log.info("serving", extra={"port": port, "host": self.args.host, "domain": self.args.domain,
                                   "event_loop": type(loop).__module__.split(".")[0],
                                   "worker": self.args.worker_index})
        return port

    async def _publish_metrics(self) -> None:
        assert self.shared is not None
        while True:
            self.shared.publish_metrics(self.metrics.snapshot())
            await asyncio.sleep(METRICS_PUBLISH_INTERVAL)

    async def stop(self, grace: float | None = None) -> None:
        grace = self.args.shutdown_grace if grace is None else grace
        log.info("stopping", extra={"grace_s": grace, "connections": len(self.proxy.connections)})
        await self.proxy.shutdown(grace)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.activator.close()
        await self.scheduler_link.close()
        await self.services.close()
        if self.shared is not None:
            self.shared.close()
        log.info("stopped")


async def serve(args: argparse.Namespace) -> None:
    app = RouterApp(args)
    await app.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await app.stop()


def run_event_loop(main: Coroutine[Any, Any, None], event_loop: str = "uvloop") -> None:
    if event_loop == "uvloop":
        uvloop.run(main)
    else:
        asyncio.run(main)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logs.configure("router", args.log_level)
    if args.worker_index is None and args.worker_total > 1:
        supervisor = Supervisor(sys.argv[1:] if argv is None else list(argv), args.host, args.port,
                                args.worker_total, args.shutdown_grace)
        sys.exit(supervisor.run())
    if args.supervisor_pid is not None:
        die_with_parent(args.supervisor_pid)
    if args.no_access_log:
        access_logger.setLevel(logging.WARNING)
    run_event_loop(serve(args), args.event_loop)
