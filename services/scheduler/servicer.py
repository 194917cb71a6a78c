"""Thin gRPC handlers for ``berth.v1.Scheduler`` and
``berth.internal.v1.SchedulerInternal``: proto in, domain calls, proto out.
Errors are raised as ``berth.errors`` exceptions; the shared interceptor maps
them to status codes and lets only the service token call the internal
service.

A standby scheduler (``lease.py``) answers what needs the leader — status
(readiness is the leader's), the routers' endpoints, load reports and
activations — with UNAVAILABLE naming the leader (retryable: the leader, or
this one once it takes over, answers); deployment errors come from the
shared event store and are served by any instance."""
from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import grpc
from google.protobuf import timestamp_pb2

from berth import enums, errors
from berth.internal.v1 import scheduler_internal_pb2, scheduler_internal_pb2_grpc
from berth.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from services.common import paging
from services.common.auth import Principal, caller
from services.common.ids import deployment_not_found_message, validate_deployment_id, validate_reference

from .desired import DesiredTable, is_terminated
from .events import EventStore
from .lease import LeaderElector, LeaseLost
from .logs import MAX_TAIL, DeploymentLogs, LogQuery
from .request_metrics import WINDOW_SECONDS, BindingFigures, InvalidWindow, RequestMetricsStore, Window
from .routers import RouterRevisions
from .runtime import Runtime

SERVICE_NAME = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name
INTERNAL_SERVICE_NAME = scheduler_internal_pb2.DESCRIPTOR.services_by_name["SchedulerInternal"].full_name
SERVICE_NAMES = (SERVICE_NAME, INTERNAL_SERVICE_NAME)


def _timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def require_loaded(table: DesiredTable) -> None:
    """Before the first snapshot from the registry, "not bound to any
    environment" would be a guess: say so, and that it passes."""
    if not table.snapshot_complete:
        raise errors.Unavailable("the scheduler has not loaded the bindings from the registry yet (it is "
                                 "starting or cannot reach the registry); retry in a moment")


def require_leader(leadership: LeaderElector | None) -> None:
    """UNAVAILABLE (reason NOT_LEADER, the leader in the metadata) unless
    this scheduler holds the lease; None: the only scheduler."""
    if leadership is None:
        return
    try:
        leadership.ensure_leading()
    except LeaseLost as exc:
        leader = exc.leader if exc.leader is not None and not exc.leader.expired else None
        metadata = {"instance": leadership.identity}
        if leader is not None and leader.holder != leadership.identity:
            metadata.update(leader=leader.holder, leader_address=leader.address, leader_epoch=str(leader.epoch))
        raise errors.Unavailable(
            f"this scheduler ({leadership.identity}) is a standby, not the leader: {leadership.describe_leader()}",
            hint="retry: health-checked clients send to the leader, and a standby takes over within the lease "
                 "duration when the leader dies",
            reason="NOT_LEADER", metadata=metadata,
        ) from None


def _window_stats(window: Window, seconds: float) -> scheduler_pb2.RequestWindowStats:
    return scheduler_pb2.RequestWindowStats(
        window_seconds=seconds,
        requests=window.requests,
        requests_per_second=window.requests / seconds,
        responses_2xx=window.by_class[0], responses_3xx=window.by_class[1],
        responses_4xx=window.by_class[2], responses_5xx=window.by_class[3],
        error_rate=window.error_rate,
        p50_seconds=window.quantile(0.5),
        p99_seconds=window.quantile(0.99),
    )


def _request_metrics(figures: BindingFigures) -> scheduler_pb2.RequestMetrics:
    message = scheduler_pb2.RequestMetrics(
        last_minute=_window_stats(figures.last_minute, WINDOW_SECONDS[0]),
        last_five_minutes=_window_stats(figures.last_five_minutes, WINDOW_SECONDS[1]),
    )
    for point in figures.history:
        added = message.history.add(requests=point.requests, requests_per_second=point.requests_per_second,
                                    error_rate=point.error_rate, p99_seconds=point.p99_seconds)
        added.time.FromSeconds(int(point.minute_end))
    return message


def _names_project(given: str, binding: common_pb2.Binding) -> bool:
    return given in (binding.project_id, binding.project_name)


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    # The replica log reader (logs.py), set by add_to_server; None: the
    # runtime cannot read logs (swarm), StreamDeploymentLogs is UNIMPLEMENTED.
    _logs: DeploymentLogs | None = None

    def __init__(
        self, table: DesiredTable, reconciler: Runtime, events: EventStore,
        leadership: LeaderElector | None = None, request_metrics: RequestMetricsStore | None = None,
    ) -> None:
        self._table = table
        self._reconciler = reconciler
        self._events = events
        self._leadership = leadership
        self._request_metrics = request_metrics if request_metrics is not None else RequestMetricsStore()

    # -- helpers ------------------------------------------------------------
    @staticmethod
    def _check_project(principal: Principal, requested_project: str) -> None:
        """A project key naming another project is refused before anything is
        looked up, as the registry refuses it (WRONG_PROJECT)."""
        if requested_project:
            validate_reference(requested_project, field="project")
        if principal.admin or principal.service or not requested_project:
            return
        if requested_project not in (principal.project_id, principal.project_name):
            raise errors.PermissionDenied(
                f"your API key belongs to project {principal.project_name!r}, not {requested_project!r}",
                hint="use that project's API key",
                reason="WRONG_PROJECT", metadata={"key_project": principal.project_name},
            )

    @staticmethod
    def _not_found(principal: Principal, requested_project: str, deployment_id: str) -> errors.NotFound:
        """One answer for a deployment that does not exist, is not bound
        anywhere or is another project's: other tenants' ids are not confirmed."""
        project = principal.project_name if not (principal.admin or principal.service) else requested_project
        return errors.NotFound(
            deployment_not_found_message(deployment_id, project or requested_project),
            hint="not bound to any environment, or not in this project; list deployments with `berth deployments`",
            resource_type="deployment", resource_name=deployment_id,
        )

    def _authorize(
        self, principal: Principal, requested_project: str, deployment_id: str, project_id: str, project_name: str
    ) -> None:
        names = {project_id, project_name} - {""}
        if requested_project and requested_project not in names:
            raise self._not_found(principal, requested_project, deployment_id)
        if principal.admin or principal.service:
            return
        if not principal.project_id or principal.project_id != project_id:
            raise self._not_found(principal, requested_project, deployment_id)

    def _latest_deployment_id(self, principal: Principal, requested_project: str) -> str:
        self._require_loaded()
        if principal.admin or principal.service:
            if not requested_project:
                raise errors.InvalidArgument("project: required with latest for this credential", field="project")
            mine = [b for b in self._table.bindings() if _names_project(requested_project, b)]
        else:
            mine = [b for b in self._table.bindings() if b.project_id == principal.project_id]
        if not mine:
            raise errors.NotFound(
                "no deployment found in this project", hint="deploy one with `berth deploy`",
                resource_type="deployment", resource_name="",
            )
        latest = max(mine, key=lambda b: (b.deployment.created_at.seconds, b.deployment.created_at.nanos))
        return latest.deployment.id

    def _deployment_id(self, principal: Principal, request_project: str, deployment_id: str, latest: bool) -> str:
        """The deployment a request names: ``deployment_id``, or with
        ``latest`` (and no id) the project's newest one. An empty id never
        means anything by itself."""
        self._check_project(principal, request_project)
        if latest:
            if deployment_id:
                raise errors.InvalidArgument("latest: set either deployment_id or latest, not both", field="latest")
            return self._latest_deployment_id(principal, request_project)
        if not deployment_id:
            raise errors.InvalidArgument(
                "deployment_id is required (or set latest for the project's newest deployment)",
                field="deployment_id",
            )
        return validate_deployment_id(deployment_id)

    def _require_loaded(self) -> None:
        require_loaded(self._table)

    def _bindings_of(self, deployment_id: str) -> list[common_pb2.Binding]:
        return [b for b in self._table.bindings() if b.deployment.id == deployment_id]

    # -- RPCs ---------------------------------------------------------------
    async def GetDeploymentStatus(
        self, request: scheduler_pb2.GetDeploymentStatusRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.DeploymentStatus:
        principal = caller()
        deployment_id = self._deployment_id(principal, request.project, request.deployment_id, request.latest)
        self._require_loaded()
        bindings = self._bindings_of(deployment_id)
        if not bindings:
            raise self._not_found(principal, request.project, deployment_id)
        first = bindings[0]
        self._authorize(principal, request.project, deployment_id, first.project_id, first.project_name)
        require_leader(self._leadership)
        views = await self._reconciler.status(deployment_id)
        if request.environment:
            views = [
                v for v in views if request.environment in (v.binding.environment_id, v.binding.environment_name)
            ]
            if not views:
                raise errors.NotFound(
                    f"deployment {deployment_id} is not bound to environment {request.environment!r}",
                    resource_type="binding", resource_name=f"{request.environment}/{deployment_id}",
                )
        response = scheduler_pb2.DeploymentStatus(deployment=first.deployment)
        if self._leadership is not None:
            response.scheduler_leader.instance = self._leadership.identity
            response.scheduler_leader.epoch = self._leadership.epoch
        for view in sorted(views, key=lambda v: v.binding.environment_name):
            b = view.binding
            status = response.bindings.add(
                environment_id=b.environment_id,
                environment=b.environment_name,
                status=enums.number(scheduler_pb2.BindingStatus.Status, view.status.value),
                min_replicas=b.min_replicas,
                max_replicas=b.max_replicas,
                serving=b.serving,
                desired_replicas=view.desired,
            )
            for r in view.replicas:
                replica = status.replicas.add(
                    id=r.container_id,
                    name=r.name,
                    index=r.index,
                    state=enums.number(scheduler_pb2.Replica.State, r.state.value),
                    restarts=r.restarts,
                    address=r.address,
                    node=r.node,
                )
                started = _timestamp(r.started_at)
                if started is not None:
                    replica.started_at.CopyFrom(started)
            figures = self._request_metrics.figures((b.environment_id, b.deployment.id))
            if figures is not None:
                status.requests.CopyFrom(_request_metrics(figures))
        return response

    async def ListDeploymentErrors(
        self, request: scheduler_pb2.ListDeploymentErrorsRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.ListDeploymentErrorsResponse:
        principal = caller()
        deployment_id = self._deployment_id(principal, request.project, request.deployment_id, request.latest)
        bindings = self._bindings_of(deployment_id)
        if bindings:
            project_id, project_name = bindings[0].project_id, bindings[0].project_name
        else:
            # Events outlive bindings: the stored project decides ownership.
            owner = self._events.project_of(deployment_id)
            if owner is None:
                raise self._not_found(principal, request.project, deployment_id)
            project_id, project_name = owner, ""
        self._authorize(principal, request.project, deployment_id, project_id, project_name)
        size = paging.page_size(request.page_size)
        scope = f"ListDeploymentErrors/{project_id}/{deployment_id}"
        after = paging.decode_token(request.page_token, scope)
        if after is not None and (
            len(after) != 2 or not isinstance(after[0], str) or not isinstance(after[1], int)
        ):
            raise paging.bad_token()
        try:
            found = self._events.page(
                deployment_id, after=(after[0], after[1]) if after is not None else None, limit=size + 1
            )
        except ValueError:  # a last_seen that is no time
            raise paging.bad_token() from None
        page, more = paging.split(found, size)
        response = scheduler_pb2.ListDeploymentErrorsResponse(
            next_page_token=paging.encode_token(scope, list(page[-1][1])) if more else ""
        )
        for event, _ in page:
            error = response.errors.add(
                kind=enums.number(scheduler_pb2.DeploymentError.Kind, event.kind),
                message=event.message,
                deployment_id=event.deployment_id,
                environment_id=event.environment_id,
                environment=event.environment,
                replica=event.replica,
                count=event.count,
            )
            error.first_seen.FromDatetime(event.first_seen)
            error.last_seen.FromDatetime(event.last_seen)
        return response

    # -- logs (logs.py) -------------------------------------------------------
    async def StreamDeploymentLogs(
        self, request: scheduler_pb2.StreamDeploymentLogsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.LogLine]:
        principal = caller()
        since = _log_since(request)
        tail = request.tail if request.HasField("tail") else None
        if tail is not None and not 0 <= tail <= MAX_TAIL:
            raise errors.InvalidArgument(f"tail must be between 0 and {MAX_TAIL}, not {tail}", field="tail")
        deployment_id = self._deployment_id(principal, request.project, request.deployment_id, request.latest)
        self._require_loaded()
        bindings = self._bindings_of(deployment_id)
        if not bindings:
            raise self._not_found(principal, request.project, deployment_id)
        first = bindings[0]
        self._authorize(principal, request.project, deployment_id, first.project_id, first.project_name)
        if request.environment:
            bindings = [b for b in bindings if request.environment in (b.environment_id, b.environment_name)]
            if not bindings:
                raise errors.NotFound(
                    f"deployment {deployment_id} is not bound to environment {request.environment!r}",
                    resource_type="binding", resource_name=f"{request.environment}/{deployment_id}",
                )
        if self._logs is None:
            raise errors.Unimplemented(
                "this scheduler's runtime (swarm) does not serve replica logs yet; read them on the cluster with "
                "`docker service logs`",
            )
        # The leader reads the engine (as status does): one rule for every status call.
        require_leader(self._leadership)
        names = {b.environment_id: b.environment_name for b in bindings}
        query = LogQuery(
            deployment_id=deployment_id, environment_ids=frozenset(names), replica=request.replica, since=since,
            tail=tail, follow=request.follow,
        )
        await self._logs.check_replica(query, max(b.max_replicas for b in bindings))
        # The request is valid: say so before the first line (a follow may send
        # none for a while), so a caller can answer success at once.
        await context.send_initial_metadata(((LOGS_STARTED, "1"),))
        # (aclosing: a cancelled call stops the engine readers at once, not at GC)
        async with contextlib.aclosing(self._logs.read(query)) as entries:
            async for entry in entries:
                line = scheduler_pb2.LogLine(
                    replica_id=entry.replica_id, replica_index=entry.replica_index,
                    environment_id=entry.environment_id, environment=names.get(entry.environment_id, ""),
                    stream=enums.number(scheduler_pb2.LogLine.Stream, entry.stream), text=entry.text,
                    dropped=entry.dropped, archived=entry.archived,
                )
                line.time.FromDatetime(entry.time)
                yield line


# Initial metadata StreamDeploymentLogs sends once the request is accepted.
LOGS_STARTED = "berth-logs-started"


def _log_since(request: scheduler_pb2.StreamDeploymentLogsRequest) -> datetime | None:
    if not request.HasField("since"):
        return None
    since = request.since
    if not 0 <= since.nanos < 1_000_000_000 or since.seconds < 0:
        raise errors.InvalidArgument("since: not a valid time", field="since")
    try:
        when = since.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise errors.InvalidArgument("since: not a valid time", field="since") from None
    if (when - datetime.now(UTC)).total_seconds() > 60:
        raise errors.InvalidArgument(f"since: {when.isoformat()} is in the future", field="since")
    return when


class SchedulerInternalServicer(scheduler_internal_pb2_grpc.SchedulerInternalServicer):
    """What the router asks of the scheduler."""

    def __init__(self, table: DesiredTable, reconciler: Runtime, leadership: LeaderElector | None = None,
                 request_metrics: RequestMetricsStore | None = None) -> None:
        self._table = table
        self._reconciler = reconciler
        self._leadership = leadership
        # The routers' request windows (request_metrics.py), read by GetDeploymentStatus.
        self.request_metrics = request_metrics if request_metrics is not None else RequestMetricsStore()
        self.routers = RouterRevisions()  # routers' revisions, for ListRouters

    async def WatchEndpoints(
        self, request: scheduler_internal_pb2.WatchEndpointsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_internal_pb2.EndpointSnapshot]:
        require_leader(self._leadership)  # the stream ends when this one stops leading
        async for sets in self._reconciler.endpoints.subscribe():
            yield scheduler_internal_pb2.EndpointSnapshot(
                sets=[
                    scheduler_internal_pb2.EndpointSet(
                        project_id=s.project_id,
                        environment_id=s.environment_id,
                        deployment_id=s.deployment_id,
                        addresses=list(s.addresses),
                        status=s.status,
                    )
                    for s in sets
                ]
            )

    async def ReportLoad(
        self, request: scheduler_internal_pb2.ReportLoadRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_internal_pb2.ReportLoadResponse:
        require_leader(self._leadership)
        loads: dict[tuple[str, str], tuple[int, int]] = {}
        for i, load in enumerate(request.bindings):
            if not load.environment_id or not load.deployment_id:
                raise errors.InvalidArgument(
                    f"bindings[{i}]: environment_id and deployment_id are required",
                    field=f"bindings[{i}]." + ("environment_id" if not load.environment_id else "deployment_id"),
                )
            if load.in_flight < 0 or load.requests < 0:
                raise errors.InvalidArgument(
                    f"bindings[{i}]: in_flight and requests cannot be negative",
                    field=f"bindings[{i}]." + ("in_flight" if load.in_flight < 0 else "requests"),
                )
            key = (load.environment_id, load.deployment_id)
            in_flight, requests = loads.get(key, (0, 0))
            loads[key] = (in_flight + load.in_flight, requests + int(load.requests))
        try:
            windows = self.request_metrics.parse(request.bindings)
        except InvalidWindow as exc:
            raise errors.InvalidArgument(str(exc), field=exc.field) from None
        self._reconciler.report_load(loads, reporter=request.reporter)
        self.routers.record(request)
        self.request_metrics.record(request.reporter, windows)
        return scheduler_internal_pb2.ReportLoadResponse()

    # -- router revisions (ListRouters; services/scheduler/routers.py) ---------
    async def ListRouters(
        self, request: scheduler_internal_pb2.ListRoutersRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_internal_pb2.ListRoutersResponse:
        return self.routers.live()
    # -- end router revisions ----------------------------------------------------

    async def Activate(
        self, request: scheduler_internal_pb2.ActivateRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_internal_pb2.ActivateResponse:
        if not request.environment_id or not request.deployment_id:
            raise errors.InvalidArgument(
                "environment_id and deployment_id are required",
                field="environment_id" if not request.environment_id else "deployment_id",
            )
        require_loaded(self._table)
        require_leader(self._leadership)
        key = (request.environment_id, request.deployment_id)
        binding = self._table.get(key)
        if binding is None:
            raise errors.NotFound(
                f"deployment {request.deployment_id} is not bound to environment {request.environment_id}",
                resource_type="binding", resource_name=f"{request.environment_id}/{request.deployment_id}",
            )
        if is_terminated(binding):
            return scheduler_internal_pb2.ActivateResponse(status="terminated")  # `berth deployment start` first
        self._reconciler.activate(key)
        if await self._reconciler.resume_paused(key):
            # A paused replica was thawed and answers again: routed now.
            return scheduler_internal_pb2.ActivateResponse(status="running")
        state = self._reconciler.binding_status(key)
        if state is None or state.value == "scaled_to_zero":
            return scheduler_internal_pb2.ActivateResponse(status="deploying")
        return scheduler_internal_pb2.ActivateResponse(status=state.value)


def add_to_server(
    server: grpc.aio.Server, table: DesiredTable, reconciler: Runtime, events: EventStore,
    *, leadership: LeaderElector | None = None, logs: DeploymentLogs | None = None,
    request_metrics: RequestMetricsStore | None = None,
) -> None:
    """The public and the internal service, on one server. ``leadership``:
    the lease, when standbys may run (``lease.py``); ``logs``: the replica
    log reader (local runtime; None answers UNIMPLEMENTED)."""
    # Reported through the internal service, read through the public one (and by the canary controller).
    request_metrics = request_metrics if request_metrics is not None else RequestMetricsStore()
    public = SchedulerServicer(table, reconciler, events, leadership, request_metrics)
    public._logs = logs
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(public, server)
    scheduler_internal_pb2_grpc.add_SchedulerInternalServicer_to_server(
        SchedulerInternalServicer(table, reconciler, leadership, request_metrics), server
    )
