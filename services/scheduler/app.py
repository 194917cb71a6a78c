"""Wiring: flags, the Docker adapter, the desired-state watcher, the
reconciler, the event store, the lease and the gRPC server.

Several schedulers may run on one engine and one database: the one holding
the lease (``lease.py``) reconciles and reports SERVING for the scheduler's
services; the others keep their desired table warm, serve gRPC (RPCs that
need the leader answer UNAVAILABLE naming it) and take over when the lease
expires."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import Sequence

import docker
from grpc_health.v1 import health_pb2

from services.common import logs
from services.common.config import add_common_flags, env
from services.common.remote import RegistryAuthenticator
from services.common.server import serve_until_signalled, start_server

from . import swarm_runtime
from .canary import CanaryController
from .desired import DesiredTable, RegistryWatcher
from .docker_adapter import DockerAdapter
from .events import EventStore
from .lease import LeaderDuties, LeaderElector, default_instance_name, lease_store
from .logs import CrashTails, DeploymentLogs
from .reconciler import Reconciler, SchedulerConfig
from .remote_deps import GrpcImageRecorder, GrpcSecretsResolver
from .request_metrics import RequestMetricsStore
from .runtime import RUNTIMES, Runtime
from .servicer import SERVICE_NAMES, add_to_server

log = logging.getLogger("berth.scheduler")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m services.scheduler", description="Berth scheduler")
    add_common_flags(parser, default_port=50053)
    parser.add_argument(
        "--instance",
        default=env("BERTH_INSTANCE", "default"),
        help="label value separating this platform's containers from any other (env BERTH_INSTANCE)",
    )
    parser.add_argument("--network", default=env("BERTH_NETWORK", "bridge"), help="Docker network (env BERTH_NETWORK)")
    parser.add_argument(
        "--reconcile-interval", type=float, default=float(env("BERTH_RECONCILE_INTERVAL", "2")), help="seconds"
    )
    parser.add_argument(
        "--pull-timeout", type=float, default=float(env("BERTH_PULL_TIMEOUT", "60")), help="deadline of a pull, seconds"
    )
    parser.add_argument(
        "--data-dir", default=env("BERTH_DATA_DIR") or None, help="where the event store lives (env BERTH_DATA_DIR)"
    )
    parser.add_argument(
        "--target-concurrency",
        type=float,
        default=float(env("BERTH_TARGET_CONCURRENCY", "10")),
        help="in-flight requests per replica the autoscaler aims at (env BERTH_TARGET_CONCURRENCY)",
    )
    parser.add_argument(
        "--scale-down-window",
        type=float,
        default=float(env("BERTH_SCALE_DOWN_WINDOW", "30")),
        help="seconds the load must stay lower before replicas are removed (env BERTH_SCALE_DOWN_WINDOW)",
    )
    parser.add_argument(
        "--idle-stop",
        "--idle-window",
        dest="idle_window",
        type=float,
        default=float(env("BERTH_IDLE_STOP", env("BERTH_IDLE_WINDOW", "900"))),
        help="seconds without requests before a min-0 binding's replicas are stopped (scaled to zero); a "
             "binding's own --idle-stop wins (env BERTH_IDLE_STOP; --idle-window/BERTH_IDLE_WINDOW: former names)",
    )
    parser.add_argument(
        "--idle-pause",
        type=float,
        default=float(env("BERTH_IDLE_PAUSE", "60")),
        help="seconds without requests (none in flight on any router) before a min-0 binding's replicas are "
             "paused (docker pause: memory kept, no CPU, resumed in milliseconds by the next request); 0, or not "
             "below the stop window, disables pausing; a binding's own --idle-pause wins; local runtime only "
             "(Swarm stops after it instead) (env BERTH_IDLE_PAUSE)",
    )
    parser.add_argument(
        "--pause-memory-floor",
        type=float,
        default=float(env("BERTH_PAUSE_MEMORY_FLOOR", "256")),
        help="MiB of available host memory below which paused replicas are stopped at once; 0 never "
             "(env BERTH_PAUSE_MEMORY_FLOOR)",
    )
    parser.add_argument(
        "--stop-grace", type=float, default=float(env("BERTH_STOP_GRACE", "10")), help="seconds after SIGTERM"
    )
    parser.add_argument(
        "--engine-workers",
        type=int,
        default=int(env("BERTH_ENGINE_WORKERS", "8")),
        help="concurrent calls to the Docker engine",
    )
    parser.add_argument(
        "--keep-warm",
        type=float,
        default=float(env("BERTH_KEEP_WARM", "600")),
        help="seconds a previously serving binding keeps its minimum (warm rollback)",
    )
    parser.add_argument(
        "--drain-delay",
        type=float,
        default=float(env("BERTH_DRAIN_DELAY", "2")),
        help="seconds a replica stays out of the routers' pool before it is stopped",
    )
    parser.add_argument(
        "--restart-backoff",
        type=float,
        default=float(env("BERTH_RESTART_BACKOFF", "1")),
        help="first delay before restarting a crashed replica, doubled per quick crash (env BERTH_RESTART_BACKOFF)",
    )
    parser.add_argument(
        "--unhealthy-after",
        type=int,
        default=int(env("BERTH_UNHEALTHY_AFTER", "3")),
        help="consecutive failed health checks before a running replica is replaced",
    )
    parser.add_argument("--log-file", default=env("BERTH_LOG_FILE"),
                        help="write JSON log lines here, rotated by size (env BERTH_LOG_FILE; "
                             "BERTH_LOG_MAX_BYTES, BERTH_LOG_BACKUPS); default stderr")
    # -- leader election (lease.py) -----------------------------------------
    parser.add_argument(
        "--database-url",
        default=env("BERTH_SCHEDULER_DATABASE_URL") or _postgres_url(env("BERTH_DATABASE_URL")) or None,
        help="PostgreSQL URL of the event store and the lease, shared by a leader and its standbys (env "
             "BERTH_SCHEDULER_DATABASE_URL, else a postgresql:// BERTH_DATABASE_URL); default SQLite under --data-dir",
    )
    parser.add_argument(
        "--lease-duration",
        type=float,
        default=float(env("BERTH_LEASE_DURATION", "4")),
        help="seconds a leader's lease lasts without renewal (renewed every third of it); a standby takes over "
             "within this of a leader's death: the default keeps failover under 5 s (env BERTH_LEASE_DURATION)",
    )
    parser.add_argument(
        "--instance-name",
        default=env("BERTH_SCHEDULER_INSTANCE_NAME") or default_instance_name(),
        help="this scheduler's name in the lease and in status (env BERTH_SCHEDULER_INSTANCE_NAME; "
             "default hostname-pid)",
    )
    parser.add_argument(
        "--runtime",
        default=env("BERTH_RUNTIME", "local"),
        help="where replicas run: local (this Docker engine) or swarm (a Docker Swarm cluster; DOCKER_HOST names "
             "a manager) (env BERTH_RUNTIME)",
    )
    parser.add_argument(
        "--image-registry",
        default=env("BERTH_IMAGE_REGISTRY", ""),
        help="HOST:PORT of the registry images are pushed to and run from by digest, spoken to over HTTP like the "
             "nodes' insecure-registries (env BERTH_IMAGE_REGISTRY)",
    )
    parser.add_argument(
        "--canary-interval", type=float, default=float(env("BERTH_CANARY_INTERVAL", "10")),
        help="seconds between the canary controller's passes (analysis and step moves; leader only) "
             "(env BERTH_CANARY_INTERVAL)",
    )
    args = parser.parse_args(argv)
    if not 0.1 <= args.canary_interval <= 3600:
        parser.error(f"--canary-interval must be within 0.1-3600 seconds, not {args.canary_interval}")
    if args.runtime not in RUNTIMES:
        parser.error(f"--runtime must be one of {', '.join(RUNTIMES)}, not {args.runtime!r}")
    if args.lease_duration < 0.3:
        parser.error("--lease-duration must be at least 0.3 seconds")
    if not args.instance_name.strip():
        parser.error("--instance-name cannot be empty")
    for name in ("target_concurrency", "reconcile_interval", "pull_timeout"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    for name in ("scale_down_window", "idle_window", "idle_pause", "pause_memory_floor", "stop_grace", "drain_delay", "keep_warm", "restart_backoff"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} cannot be negative")
    if args.engine_workers < 1:
        parser.error("--engine-workers must be at least 1")
    if args.unhealthy_after < 1:
        parser.error("--unhealthy-after must be at least 1")
    return args


def _postgres_url(url: str) -> str:
    """The platform's database URL, if PostgreSQL: a SQLite file of the
    registry is not shared with the scheduler."""
    return url if url.startswith(("postgresql", "postgres://")) else ""


async def serve(args: argparse.Namespace) -> None:
    if args.runtime == "swarm":  # before any engine client: a clear error, not a traceback
        try:
            swarm_runtime.check_manager()
        except swarm_runtime.SwarmSetupError as exc:
            raise SystemExit(f"error: {exc.message}") from None
    config = SchedulerConfig(
        instance=args.instance,
        reconcile_interval=args.reconcile_interval,
        pull_timeout=args.pull_timeout,
        stop_grace=args.stop_grace,
        drain_delay=args.drain_delay,
        keep_warm=args.keep_warm,
        restart_backoff=args.restart_backoff,
        unhealthy_after=args.unhealthy_after,
        target_concurrency=args.target_concurrency,
        scale_down_window=args.scale_down_window,
        idle_window=args.idle_window,
        idle_pause=args.idle_pause,
        pause_memory_floor=int(args.pause_memory_floor * 1024 * 1024),
    )
    events = EventStore(args.data_dir, url=args.database_url)
    elector = LeaderElector(lease_store(events.engine, args.instance), identity=args.instance_name,
                            duration=args.lease_duration)
    adapter = DockerAdapter(docker.from_env(timeout=60, max_pool_size=args.engine_workers + 2),
                            network=args.network, workers=args.engine_workers, fence=elector)
    table = DesiredTable()
    secrets = GrpcSecretsResolver(args.secrets, args.service_token)
    recorder = GrpcImageRecorder(args.registry, args.service_token)
    reconciler: Runtime
    if args.runtime == "swarm":
        try:
            reconciler = swarm_runtime.build(table, secrets, events, config, image_registry=args.image_registry,
                                             fence=elector)
        except swarm_runtime.SwarmSetupError as exc:
            log.error("swarm_unavailable", extra={"error": exc.message})
            raise SystemExit(f"error: {exc.message}") from None
    else:
        reconciler = Reconciler(adapter, table, secrets, events, config, record_image=recorder, fence=elector)
    deployment_logs = None  # the swarm runtime does not read logs (UNIMPLEMENTED)
    if args.runtime != "swarm":
        tails = CrashTails(adapter, table, args.data_dir)
        adapter.before_remove = tails.keep  # the last lines of every replica removed, kept
        deployment_logs = DeploymentLogs(adapter, args.instance, tails)
    watcher = RegistryWatcher(table, args.registry, args.service_token)
    request_metrics = RequestMetricsStore()
    canaries = CanaryController(table, request_metrics, events, args.registry, args.service_token,
                                interval=args.canary_interval)
    authenticator = RegistryAuthenticator(args.registry, args.service_token, admin_key=env("BERTH_ADMIN_KEY"))

    running = await start_server(
        host=args.host,
        port=args.port,
        service_names=SERVICE_NAMES,
        register=lambda server: add_to_server(server, table, reconciler, events, leadership=elector,
                                              logs=deployment_logs, request_metrics=request_metrics),
        authenticate=authenticator,
        # Not SERVING until the bindings are loaded from the registry: until
        # then it cannot tell a deployment's status (nor `berth up` be ready).
        serving=False,
    )
    elector.address = f"{args.host}:{running.port}"
    loaded = asyncio.Event()
    table.on_change(lambda: loaded.set() if table.snapshot_complete else None)
    serving: list[bool] = []  # what the health service reports for the scheduler's services

    async def set_serving(leading: bool) -> None:
        # "" is the process (up, bindings loaded); the services' names say
        # whether this one leads, so health-checked clients pick the leader.
        if serving == [leading]:
            return
        serving[:] = [leading]
        state = health_pb2.HealthCheckResponse.SERVING if leading else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in SERVICE_NAMES:
            await running.health.set(name, state)
        log.info("health", extra={"leading": leading, "epoch": elector.epoch})

    async def leader_work() -> None:
        # The canary controller judges from the request windows the leader holds.
        canary_task = asyncio.create_task(canaries.run(), name="canary-controller")
        try:
            await reconciler.run()
        finally:
            canary_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await canary_task

    duties = LeaderDuties(elector, work=leader_work, stand_down=reconciler.close, set_serving=set_serving)
    elector.on_change = duties.changed

    async def serve_once_loaded() -> None:
        await loaded.wait()
        await running.health.set("", health_pb2.HealthCheckResponse.SERVING)
        duties.ready = True
        duties.changed()
        log.info("bindings_loaded", extra={"bindings": len(table.bindings())})

    tasks = [
        asyncio.create_task(watcher.run(), name="registry-watch"),
        asyncio.create_task(elector.run(), name="lease"),
        asyncio.create_task(duties.run(), name="leader-duties"),
        asyncio.create_task(serve_once_loaded(), name="serve-once-loaded"),
    ]
    log.info("scheduler_started", extra={"instance": config.instance, "network": args.network, "port": running.port,
                                         "instance_name": args.instance_name})

    async def on_stop() -> None:
        # Stop the loops; replicas keep running and are adopted on restart.
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await reconciler.close()
        await elector.release()  # a successor leads at once

    try:
        await serve_until_signalled(running, name="scheduler", on_stop=on_stop)
    finally:
        for closer in (secrets.close, recorder.close, authenticator.close, canaries.close):
            await closer()
        adapter.close()
        events.close()


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logs.configure("scheduler", args.log_level, args.log_file)
    asyncio.run(serve(args))
