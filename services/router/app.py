"""Wiring: flags, the watches, the health probe, the proxy server, the REST
API and metrics, activation and load reports, and a graceful shutdown on
SIGTERM/SIGINT. As one of several workers (``workers.py``): taking
connections only once the routing table is loaded, covering a restarting
sibling's socket, and living on as an orphan when the supervisor dies."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

import uvloop

from berth import local
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
from services.router.workers import (
    BACKLOG,
    METRICS_PUBLISH_INTERVAL,
    ORPHAN_SIGNAL,
    ORPHAN_TIMEOUT,
    PortTaken,
    SharedState,
    Supervisor,
    die_with_parent,
    is_listening,
    offer_socket,
    remove_shared_if_last,
    worker_count,
)
from services.studio.handler import Studio

log = logging.getLogger("berth.router")

TURN_POLL = 0.01  # how often a worker waiting to take connections looks again
COVER_POLL = 0.02  # how often a serving worker looks for a sibling's socket nobody accepts on
DRAIN_WINDOW = 1.0  # an orphan told to go answers each connection's next request with Connection: close this long

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
    limits = ProxySettings()
    parser.add_argument("--max-request-line", type=int,
                        default=int(env("BERTH_MAX_REQUEST_LINE", str(limits.max_request_line))),
                        help="longest request line in bytes (414 beyond; env BERTH_MAX_REQUEST_LINE)")
    parser.add_argument("--max-header-bytes", type=int,
                        default=int(env("BERTH_MAX_HEADER_BYTES", str(limits.max_header_bytes))),
                        help="longest header line in bytes (431 beyond; env BERTH_MAX_HEADER_BYTES)")
    parser.add_argument("--max-head-bytes", type=int, default=int(env("BERTH_MAX_HEAD_BYTES", str(limits.max_head_bytes))),
                        help="largest request head in bytes (431 beyond; env BERTH_MAX_HEAD_BYTES)")
    parser.add_argument("--max-headers", type=int, default=int(env("BERTH_MAX_HEADERS", str(limits.max_headers))),
                        help="most request headers (431 beyond; env BERTH_MAX_HEADERS)")
    parser.add_argument("--head-timeout", type=float, default=float(env("BERTH_HEAD_TIMEOUT", str(limits.head_timeout))),
                        help="seconds for a whole request head to arrive (408 after; env BERTH_HEAD_TIMEOUT)")
    parser.add_argument("--keepalive-timeout", type=float,
                        default=float(env("BERTH_KEEPALIVE_TIMEOUT", str(limits.keepalive_timeout))),
                        help="seconds an idle client connection stays open (env BERTH_KEEPALIVE_TIMEOUT)")
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
    parser.add_argument("--supervise", action="store_true",
                        help="run the worker supervisor even for one worker (what berth up does), so a supervisor's "
                             "death never refuses connections")
    parser.add_argument("--orphan-timeout", type=float,
                        default=float(env("BERTH_ROUTER_ORPHAN_TIMEOUT", str(ORPHAN_TIMEOUT))),
                        help="seconds workers whose supervisor died keep serving while waiting for a new supervisor "
                             "to take over their sockets (env BERTH_ROUTER_ORPHAN_TIMEOUT)")
    parser.add_argument("--log-file", default=env("BERTH_LOG_FILE"),
                        help="write JSON log lines (the access log too) here, rotated by size (env BERTH_LOG_FILE; "
                             "BERTH_LOG_MAX_BYTES, BERTH_LOG_BACKUPS); default stderr")
    parser.add_argument("--health-interval", type=float, default=2.0, help=argparse.SUPPRESS)
    # set by the worker supervisor for each worker process
    parser.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--shared-dir", help=argparse.SUPPRESS)
    parser.add_argument("--supervisor-pid", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--sibling-fds", default="", help=argparse.SUPPRESS)  # "index:fd,..." of the other sockets
    args = parser.parse_args(argv)
    try:
        args.worker_total = worker_count(args.workers)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def router_name(host: str, port: int) -> str:
    """How a router instance names itself to the scheduler: the address it
    serves on (the host name when it listens on every interface)."""
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    return f"{host}:{port}"


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
        # The router instance, as it tells the scheduler with its revision
        # (see control.py): named once its port is bound, in ``start``.
        self.router_name = ""
        self.scheduler_link = SchedulerLink(args.scheduler, args.service_token, router=self.router_name,
                                            revision=lambda: (self.state.revision, self.state.loaded))
        self.activator = Activator(self.scheduler_link.activate, hold=args.activation_timeout)
        self.load_reporter = LoadReporter(self.load, self.scheduler_link.report_load, args.load_report_interval,
                                          heartbeat=True)
        self.metrics = RouterMetrics(self.state, self.load, held=lambda: self.state.endpoints.waiting,
                                     peers=self.shared.peer_metrics if self.shared else list)
        self.services = Services(args.registry, args.secrets, args.scheduler)
        self.api = RestApi(self.services, self.state, workers=self.shared,
                           routers=self.scheduler_link.list_routers, router_name=self.router_name)
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
                max_request_line=args.max_request_line,
                max_header_bytes=args.max_header_bytes,
                max_head_bytes=args.max_head_bytes,
                max_headers=args.max_headers,
                head_timeout=args.head_timeout,
                keepalive_timeout=args.keepalive_timeout,
            ),
            load=self.load,
            metrics=self.metrics,
            activator=self.activator,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self.stop_requested = asyncio.Event()
        self.accepting = False
        self.orphaned = False
        self._listen_sock: socket.socket | None = None
        self._siblings: dict[int, socket.socket] = {}
        self._covers: dict[int, asyncio.AbstractServer] = {}
        self._drain = False  # stop by draining (an orphan) rather than at once

    @property
    def port(self) -> int:
        return self.proxy.port

    def _revision_applied(self, revision: int) -> None:
        if self.shared is not None:
            self.shared.publish_revision(revision, loaded=self.state.loaded)
        self.load_reporter.revision_changed()

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
        """Starts the watches and takes connections: at once alone, or as a
        worker once its table is loaded (see ``_wait_for_turn``)."""
        loop = asyncio.get_running_loop()
        sock = None
        if self.args.listen_fd is not None:
            sock = self._listen_sock = socket.socket(fileno=self.args.listen_fd)
        for item in filter(None, self.args.sibling_fds.split(",")):
            index, fd = item.split(":")
            self._siblings[int(index)] = socket.socket(fileno=int(fd))
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
        if sock is not None and self.shared is not None:
            await self._wait_for_turn(sock)
        port = await self.proxy.start(self.args.host, self.args.port, sock)
        self.router_name = self.api.router_name = self.scheduler_link.router = router_name(self.args.host, port)
        self.load_reporter.revision_changed()
        self.accepting = True
        if self.shared is not None:
            self.shared.set_accepting(True)
            if self._siblings:
                self._tasks.append(loop.create_task(run_forever("cover_siblings", self._cover_siblings),
                                                    name="cover_siblings"))
        log.info("serving", extra={"port": port, "host": self.args.host, "domain": self.args.domain,
                                   "event_loop": type(loop).__module__.split(".")[0],
                                   "worker": self.args.worker_index, "table_loaded": self.state.loaded})
        return port

    async def _wait_for_turn(self, sock: socket.socket) -> None:
        """Until this worker may take connections: once its routing table is
        loaded, or right away while nobody else serves the port with a table
        (the platform's first start: 503 router_starting beats a refused
        connection). Listens on a socket not yet listening (the supervisor
        only binds them), so the kernel sends it nothing before."""
        assert self.shared is not None
        waited = False
        while not self.state.loaded and self.shared.someone_else_serves():
            waited = True
            await asyncio.sleep(TURN_POLL)
        if waited:
            log.info("table_loaded_taking_connections", extra={"worker": self.args.worker_index})
        if not is_listening(sock):
            sock.listen(BACKLOG)

    async def _cover_siblings(self) -> None:
        """Accepts on a sibling's socket while no worker does (it died; its
        replacement is loading its table), so connections queued there wait
        milliseconds rather than the replacement's start. Stops once the
        sibling accepts again; closing this copy of the socket resets
        nothing (the supervisor and the sibling hold it)."""
        assert self.shared is not None
        while True:
            await asyncio.sleep(COVER_POLL)
            able = self.accepting and self.state.loaded and not self.orphaned and not self.proxy.closing
            for index, sock in self._siblings.items():
                want = able and not self.shared.accepting(index) and is_listening(sock)
                if want and index not in self._covers:
                    copy = socket.socket(fileno=os.dup(sock.fileno()))
                    self._covers[index] = await self.proxy.serve_socket(copy)
                    log.info("covering_sibling", extra={"worker": self.args.worker_index, "sibling": index})
                elif not want and index in self._covers:
                    self._covers.pop(index).close()

    def _stop_covering(self) -> None:
        for server in self._covers.values():
            server.close()
        self._covers.clear()

    # -- orphaned: the supervisor died ------------------------------------------
    def on_orphaned(self) -> None:
        """ORPHAN_SIGNAL: keep serving until a new supervisor's workers do
        (they take over this socket), or the orphan timeout passes, or the
        ``berth up`` this router belongs to is gone."""
        if self.orphaned:
            return
        self.orphaned = True
        self._stop_covering()
        owner = os.environ.get(local.OWNER_ENV, "")
        if not self.accepting or self._listen_sock is None or (owner and not local.owner_alive(owner)):
            log.warning("orphaned_stopping", extra={"worker": self.args.worker_index, "accepting": self.accepting})
            self._drain = self.accepting
            self.stop_requested.set()
            return
        self._tasks.append(asyncio.get_running_loop().create_task(self._orphan_life(owner), name="orphan"))

    async def _orphan_life(self, owner: str) -> None:
        assert self._listen_sock is not None
        info = {"pid": os.getpid(), "worker": self.args.worker_index}
        offer = asyncio.ensure_future(offer_socket(self._listen_sock, self.args.host, self.port, info))
        deadline = asyncio.get_running_loop().time() + self.args.orphan_timeout
        why = "orphan_timeout"
        try:
            while asyncio.get_running_loop().time() < deadline:
                if offer.done():
                    why = "handed_over" if offer.exception() is None else "handover_failed"
                    break
                if owner and not local.owner_alive(owner):
                    why = "owner_gone"
                    break
                await asyncio.sleep(0.1)
        finally:
            offer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await offer
        log.warning("orphan_leaving", extra={"worker": self.args.worker_index, "why": why})
        self._drain = True
        self.stop_requested.set()

    async def drain(self) -> None:
        """Stops taking new requests gently: each connection's next response
        says Connection: close and the connection closes after it (a
        response already promised keep-alive keeps the connection open for
        one more request; ``ProxyServer.begin_closing``); waits
        (``DRAIN_WINDOW``) for clients to go, then stops as usual."""
        loop = asyncio.get_running_loop()
        self.proxy.begin_closing()
        deadline = loop.time() + DRAIN_WINDOW
        while self.proxy.connections and loop.time() < deadline:
            await asyncio.sleep(0.02)

    async def _publish_metrics(self) -> None:
        assert self.shared is not None
        while True:
            self.shared.publish_metrics(self.metrics.snapshot())
            await asyncio.sleep(METRICS_PUBLISH_INTERVAL)

    async def stop(self, grace: float | None = None) -> None:
        grace = self.args.shutdown_grace if grace is None else grace
        log.info("stopping", extra={"grace_s": grace, "connections": len(self.proxy.connections)})
        if self.shared is not None:
            self.shared.set_accepting(False)
        self._stop_covering()
        if self._drain:
            await self.drain()
        await self.proxy.shutdown(grace)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.activator.close()
        await self.scheduler_link.close()
        await self.services.close()
        if self.shared is not None:
            if self.orphaned:
                remove_shared_if_last(self.shared)
            self.shared.close()
        log.info("stopped")


async def serve(args: argparse.Namespace) -> None:
    app = RouterApp(args)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, app.stop_requested.set)
    if args.worker_index is not None:
        loop.add_signal_handler(ORPHAN_SIGNAL, app.on_orphaned)
    starting = loop.create_task(app.start())
    stopping = loop.create_task(app.stop_requested.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if starting.done():
        starting.result()  # a failure to start ends the process
        await stopping
    else:
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
    await app.stop()


def run_event_loop(main: Coroutine[Any, Any, None], event_loop: str = "uvloop") -> None:
    if event_loop == "uvloop":
        uvloop.run(main)
    else:
        asyncio.run(main)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logs.configure("router", args.log_level, args.log_file)
    if args.worker_index is None and (args.worker_total > 1 or args.supervise):
        try:
            supervisor = Supervisor(sys.argv[1:] if argv is None else list(argv), args.host, args.port,
                                    args.worker_total, args.shutdown_grace)
        except (PortTaken, OSError) as exc:
            log.error("cannot_listen", extra={"port": args.port, "error": str(exc)})
            logging.shutdown()
            sys.exit(3)
        sys.exit(supervisor.run())
    if args.supervisor_pid is not None and not die_with_parent(args.supervisor_pid, ORPHAN_SIGNAL):
        sys.exit(0)  # the supervisor died before this worker served anything: nothing to keep serving
    if args.no_access_log:
        access_logger.setLevel(logging.WARNING)
    run_dir = os.environ.get("BERTH_RUN_DIR") if args.worker_index is not None else None
    record = local.record_process(Path(run_dir), f"router-worker-{os.getpid()}", os.getpid(),
                                  "services.router") if run_dir else None
    try:
        run_event_loop(serve(args), args.event_loop)
    finally:
        if record is not None:
            record.unlink(missing_ok=True)
