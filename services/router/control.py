"""What the router tells the scheduler: activation requests for bindings
with no ready replica, the load it carries per binding (in-flight
concurrency and completed requests) for autoscaling, and with every load
report the registry revision its routing table reflects (sent at once when
it changes), which ``ListRouters`` gives back to the router that must know
whether every live router routes by a pointer move.

Both are best effort: routing never waits on these RPCs, and an older
scheduler answering UNIMPLEMENTED is logged once, not fatal.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc

from berth.internal.v1 import scheduler_internal_pb2, scheduler_internal_pb2_grpc
from services.common.remote import DEFAULT_DEADLINE, channel, credentials
from services.router.table import Route

log = logging.getLogger("berth.router.control")

BindingKey = tuple[str, str]  # (environment id, deployment id)


@dataclass
class BindingLoad:
    project_id: str
    project_name: str
    environment_name: str
    in_flight: int = 0
    completed: int = 0  # since the last report


class LoadTracker:
    """In-flight and completed requests per binding; updated on the event
    loop by the proxy (plain integer arithmetic, no locks)."""

    def __init__(self) -> None:
        self.bindings: dict[BindingKey, BindingLoad] = {}
        self.in_flight = 0
        # Per binding: its project id and its request windows (the last
        # minute, the last five minutes); set by RouterMetrics.
        self.request_windows: Callable[
            [], dict[BindingKey, tuple[str, tuple[scheduler_internal_pb2.RequestWindow, ...]]]
        ] | None = None

    def begin(self, route: Route) -> BindingLoad:
        load = self.bindings.get(route.binding_key)
        if load is None:
            load = self.bindings[route.binding_key] = BindingLoad(
                route.project_id, route.project_name, route.environment_name
            )
        load.in_flight += 1
        self.in_flight += 1
        return load

    def end(self, load: BindingLoad) -> None:
        load.in_flight -= 1
        load.completed += 1
        self.in_flight -= 1

    def drain_report(self) -> list[scheduler_internal_pb2.BindingLoad]:
        """The report to send now; completed counters restart at zero. A
        binding that went quiet is reported (as zero) once more, then dropped.
        Every binding with requests in the last five minutes carries its
        request windows."""
        report = []
        windows = self.request_windows() if self.request_windows is not None else {}
        for (environment_id, deployment_id), load in list(self.bindings.items()):
            report.append(
                scheduler_internal_pb2.BindingLoad(
                    project_id=load.project_id,
                    environment_id=environment_id,
                    deployment_id=deployment_id,
                    in_flight=load.in_flight,
                    requests=load.completed,
                )
            )
            if load.in_flight == 0 and load.completed == 0:
                del self.bindings[(environment_id, deployment_id)]
            load.completed = 0
        by_key = {(b.environment_id, b.deployment_id): b for b in report}
        for (environment_id, deployment_id), (project_id, (last_minute, last_five)) in windows.items():
            message = by_key.get((environment_id, deployment_id))
            if message is None:
                message = scheduler_internal_pb2.BindingLoad(
                    project_id=project_id, environment_id=environment_id, deployment_id=deployment_id
                )
                report.append(message)
            message.last_minute.CopyFrom(last_minute)
            message.last_five_minutes.CopyFrom(last_five)
        return report


class SchedulerLink:
    """The router's calls to the scheduler's internal service
    (berth.internal.v1.SchedulerInternal, service token)."""

    def __init__(self, address: str, service_token: str, *, router: str = "",
                 revision: Callable[[], tuple[int, bool]] | None = None) -> None:
        """``router``: the router instance this process belongs to (the
        "host:port" it serves); ``revision``: (revision, loaded) of its
        routing table, sent with every report."""
        self.address = address
        self._metadata = credentials(service_token)
        # Every router process reports its own load; the scheduler adds them up.
        self.reporter = f"{socket.gethostname()}:{os.getpid()}"
        self.router = router
        self._revision = revision
        self._channel: grpc.aio.Channel | None = None
        self._stub: scheduler_internal_pb2_grpc.SchedulerInternalStub | None = None

    @property
    def stub(self) -> scheduler_internal_pb2_grpc.SchedulerInternalStub:
        if self._stub is None:
            self._channel = channel(self.address, "scheduler")
            self._stub = scheduler_internal_pb2_grpc.SchedulerInternalStub(self._channel)
        return self._stub

    async def activate(self, route: Route) -> str:
        answer = await self.stub.Activate(
            scheduler_internal_pb2.ActivateRequest(
                project_id=route.project_id, environment_id=route.environment_id, deployment_id=route.deployment_id
            ),
            metadata=self._metadata,
            timeout=DEFAULT_DEADLINE,
        )
        return answer.status

    @property
    def reports_revision(self) -> bool:
        return bool(self.router) and self._revision is not None

    async def report_load(self, bindings: list[scheduler_internal_pb2.BindingLoad]) -> None:
        request = scheduler_internal_pb2.ReportLoadRequest(bindings=bindings, reporter=self.reporter)
        if self.reports_revision:
            assert self._revision is not None
            request.router = self.router
            request.revision, request.loaded = self._revision()
        await self.stub.ReportLoad(request, metadata=self._metadata, timeout=DEFAULT_DEADLINE)

    async def list_routers(self, timeout: float) -> scheduler_internal_pb2.ListRoutersResponse:
        return await self.stub.ListRouters(
            scheduler_internal_pb2.ListRoutersRequest(), metadata=self._metadata, timeout=timeout
        )

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()


class _OnceLogger:
    """Logs a failing RPC at WARNING the first time per status code, then at DEBUG."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def __call__(self, event: str, exc: grpc.aio.AioRpcError, **extra: object) -> None:
        code = exc.code().name
        level = logging.DEBUG if code in self._seen else logging.WARNING
        self._seen.add(code)
        log.log(level, event, extra={"code": code, "error": exc.details(), **extra})


class Activator:
    """Asks the scheduler to start a replica of a binding that has none
    ready: at most once per binding per ``hold`` seconds, however many
    requests are waiting for it. Never raises into the request path."""

    def __init__(self, activate: Callable[[Route], Awaitable[str]], hold: float) -> None:
        self._activate = activate
        self.hold = hold
        self._last: dict[BindingKey, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._log = _OnceLogger()
        self.calls = 0  # Activate RPCs made (observability and tests)

    def request(self, route: Route) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        last = self._last.get(route.binding_key)
        if last is not None and now - last < self.hold:
            return
        self._last[route.binding_key] = now
        if len(self._last) > 10_000:  # forget bindings not asked about for a while
            self._last = {k: t for k, t in self._last.items() if now - t < self.hold}
        task = loop.create_task(self._call(route))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def served(self, route: Route) -> None:
        """The binding has ready replicas again: its hold ends, so the next
        time it has none (scaled to zero, paused) the first request asks
        the scheduler at once (a paused replica is thawed in milliseconds)."""
        self._last.pop(route.binding_key, None)

    async def _call(self, route: Route) -> None:
        self.calls += 1
        try:
            status = await self._activate(route)
            log.info("activation_requested", extra={"deployment": route.deployment_id,
                                                     "environment": route.environment_name, "status": status})
        except grpc.aio.AioRpcError as exc:
            self._log("activation_failed", exc, deployment=route.deployment_id, environment=route.environment_name)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class LoadReporter:
    """Sends ``LoadTracker`` reports every ``interval`` seconds, and at once
    when ``revision_changed`` is called. With ``heartbeat`` (the link reports
    the routing revision) a report goes out every interval even with no
    binding in it: it is how the scheduler knows this router is alive."""

    def __init__(
        self,
        tracker: LoadTracker,
        send: Callable[[list[scheduler_internal_pb2.BindingLoad]], Awaitable[None]],
        interval: float = 1.0,
        *,
        heartbeat: bool = False,
    ) -> None:
        self.tracker = tracker
        self._send = send
        self.interval = interval
        self.heartbeat = heartbeat
        self._log = _OnceLogger()
        self.reports = 0  # reports sent successfully
        self._wake: asyncio.Event | None = None

    def revision_changed(self) -> None:
        """The routing table moved to a new revision: report now."""
        if self._wake is not None:
            self._wake.set()

    async def tick(self) -> None:
        report = self.tracker.drain_report()
        if not report and not self.heartbeat:
            return
        try:
            await self._send(report)
            self.reports += 1
        except grpc.aio.AioRpcError as exc:
            self._log("load_report_failed", exc, bindings=len(report))

    async def run(self) -> None:
        self._wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        next_tick = loop.time() + self.interval
        while True:
            try:
                async with asyncio.timeout(max(0.0, next_tick - loop.time())):
                    await self._wake.wait()
            except TimeoutError:
                pass
            if self._wake.is_set():
                self._wake.clear()
            else:
                next_tick = loop.time() + self.interval
            await self.tick()
