"""The only module that touches the Docker SDK's Swarm API (services, tasks,
nodes), through a swarm manager. Blocking calls run in a small thread pool;
Docker errors are translated once, into ``docker_adapter``'s exceptions.

Every write (create, update, remove) first asks the optional ``fence``
whether this scheduler still leads (``fence.ensure_leading()`` raises when
its lease is lost) and stamps the services it writes with the fence's epoch
(``berth.epoch``), so a deposed scheduler cannot overwrite a newer leader's
services unnoticed.

Facts this is built on (CLUSTER-NOTES.md): no IPVS here, so services use
``endpoint_mode=dnsrr`` and expose their port in host mode with no fixed
published port (each task gets its own, two tasks can share a node); the
address of a task is its node's address and the port Swarm allocated, read
from the task's ``PortStatus``.
"""
from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import docker
import docker.errors

from . import docker_adapter as da
from .docker_adapter import _explanation, _parse_time, _translated
from .lease import EPOCH_LABEL, Fence

log = logging.getLogger("berth.scheduler.swarm")

T = TypeVar("T")

SERVICE_LABEL = "berth.service"  # on task containers: the binding's service name
API_VERSION = "1.41"
NANOS = 1_000_000_000


class NotAManager(da.EngineError):
    """The engine is not a swarm manager (not in a swarm, or a worker)."""


@dataclass(frozen=True)
class ServiceInfo:
    id: str
    name: str
    labels: Mapping[str, str]
    replicas: int
    version: int
    created_at: datetime | None


@dataclass(frozen=True)
class TaskInfo:
    id: str
    service_id: str
    node_id: str
    slot: int
    state: str  # Swarm's task state: new ... running, complete, failed, rejected, shutdown, orphaned
    desired_state: str
    message: str
    error: str
    timestamp: datetime | None  # of the last state change
    created_at: datetime | None
    host_ports: Mapping[int, int]  # target port -> published port on the node
    exit_code: int | None = None
    spec_hash: str = ""  # of the service spec the task was created from


@dataclass(frozen=True)
class NodeInfo:
    id: str
    hostname: str
    address: str
    state: str  # ready | down | unknown | disconnected
    availability: str  # active | pause | drain


@dataclass(frozen=True)
class ServiceDefinition:
    """What one binding's service runs: everything ``create``/``update``
    send. ``environment`` holds secret values: never logged (repr hides it)."""

    name: str
    image: str  # by digest: repo@sha256:...
    labels: Mapping[str, str]
    container_labels: Mapping[str, str]
    environment: Mapping[str, str] = field(repr=False)
    command: Sequence[str] = ()
    port: int = 8080
    replicas: int = 1
    mem_limit: int = 0
    nano_cpus: int = 0
    stop_grace: float = 10.0
    restart_delay: float = 0.0
    update_monitor: float = 1.0
    update_parallelism: int = 1


def service_body(d: ServiceDefinition, *, epoch: int | None) -> dict[str, Any]:
    """The Swarm service spec of a definition (pure): the keyword arguments
    of ``APIClient.create_service`` / ``update_service``."""
    labels = dict(d.labels)
    if epoch is not None:
        labels[EPOCH_LABEL] = str(epoch)
    container = docker.types.ContainerSpec(
        image=d.image,
        args=list(d.command) or None,
        env=[f"{k}={v}" for k, v in sorted(d.environment.items())],
        labels=dict(d.container_labels),
        init=True,
        stop_grace_period=int(d.stop_grace * NANOS),
    )
    resources = None
    if d.mem_limit or d.nano_cpus:
        # The memory limit is also reserved: Swarm places a replica only on a
        # node that has it (else the task waits on "no suitable node").
        resources = docker.types.Resources(cpu_limit=d.nano_cpus or None, mem_limit=d.mem_limit or None,
                                           mem_reservation=d.mem_limit or None)
    template = docker.types.TaskTemplate(
        container_spec=container,
        resources=resources,
        # Swarm restarts and reschedules at once; Berth's autoscaler owns the count.
        restart_policy=docker.types.RestartPolicy(condition="any", delay=int(d.restart_delay * NANOS)),
    )
    return {
        "task_template": template,
        "name": d.name,
        "labels": labels,
        "mode": {"Replicated": {"Replicas": d.replicas}},
        # New tasks start before old ones stop, one at a time, watched briefly.
        "update_config": docker.types.UpdateConfig(
            parallelism=d.update_parallelism, order="start-first", monitor=int(d.update_monitor * NANOS),
            failure_action="continue",
        ),
        # No VIP (no IPVS here): reach each task on its node, port allocated per task.
        "endpoint_spec": {
            "Mode": "dnsrr",
            "Ports": [{"Protocol": "tcp", "TargetPort": d.port, "PublishMode": "host"}],
        },
    }


def _service_info(attrs: Mapping[str, Any]) -> ServiceInfo:
    spec = attrs.get("Spec") or {}
    replicated = (spec.get("Mode") or {}).get("Replicated") or {}
    return ServiceInfo(
        id=attrs["ID"],
        name=spec.get("Name", ""),
        labels=dict(spec.get("Labels") or {}),
        replicas=int(replicated.get("Replicas") or 0),
        version=int((attrs.get("Version") or {}).get("Index") or 0),
        created_at=_parse_time(attrs.get("CreatedAt")),
    )


def _task_info(attrs: Mapping[str, Any]) -> TaskInfo:
    status = attrs.get("Status") or {}
    ports: dict[int, int] = {}
    for p in (status.get("PortStatus") or {}).get("Ports") or []:
        if p.get("PublishedPort"):
            ports[int(p.get("TargetPort") or 0)] = int(p["PublishedPort"])
    container = status.get("ContainerStatus") or {}
    exit_code = container.get("ExitCode")
    template = (attrs.get("Spec") or {}).get("ContainerSpec") or {}
    return TaskInfo(
        id=attrs["ID"],
        service_id=attrs.get("ServiceID", ""),
        node_id=attrs.get("NodeID", ""),
        slot=int(attrs.get("Slot") or 0),
        state=status.get("State", ""),
        desired_state=attrs.get("DesiredState", ""),
        message=status.get("Message", ""),
        error=status.get("Err", ""),
        timestamp=_parse_time(status.get("Timestamp")),
        created_at=_parse_time(attrs.get("CreatedAt")),
        host_ports=ports,
        exit_code=int(exit_code) if exit_code is not None else None,
        spec_hash=(template.get("Labels") or {}).get(da.SPEC_HASH_LABEL, ""),
    )


def _node_info(attrs: Mapping[str, Any]) -> NodeInfo:
    status = attrs.get("Status") or {}
    address = status.get("Addr", "")
    if not address or address == "0.0.0.0":
        # A manager may report 0.0.0.0: its manager address says where it is.
        manager = (attrs.get("ManagerStatus") or {}).get("Addr", "")
        address = manager.rsplit(":", 1)[0] if manager else address
    return NodeInfo(
        id=attrs["ID"],
        hostname=(attrs.get("Description") or {}).get("Hostname", ""),
        address=address,
        state=status.get("State", "unknown"),
        availability=(attrs.get("Spec") or {}).get("Availability", ""),
    )


class SwarmAdapter:
    def __init__(self, client: docker.DockerClient, *, fence: Fence | None = None, workers: int = 4) -> None:
        self._client = client
        self._fence = fence
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="swarm")

    @property
    def epoch(self) -> int | None:
        return self._fence.epoch if self._fence is not None else None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(_translated, fn, *args))

    def _guard(self) -> None:
        if self._fence is not None:
            self._fence.ensure_leading()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- reading ------------------------------------------------------------
    def check_manager(self) -> str:
        """Blocking: raises ``NotAManager`` unless the engine manages a swarm;
        returns the engine's node id."""
        info = self._client.info()
        swarm = info.get("Swarm") or {}
        if swarm.get("LocalNodeState") != "active":
            raise NotAManager(f"the Docker engine is not part of a swarm (state {swarm.get('LocalNodeState')!r})")
        if not swarm.get("ControlAvailable"):
            raise NotAManager("the Docker engine is a swarm worker, not a manager")
        return str(swarm.get("NodeID", ""))

    async def list_services(self, instance: str, extra: Mapping[str, str] | None = None) -> list[ServiceInfo]:
        labels = [f"{da.MANAGED_LABEL}=true", f"{da.INSTANCE_LABEL}={instance}"]
        labels += [f"{k}={v}" for k, v in (extra or {}).items()]

        def list_() -> list[ServiceInfo]:
            return [_service_info(s) for s in self._client.api.services(filters={"label": labels})]

        return await self._run(list_)

    async def list_tasks(self, service_ids: Sequence[str]) -> list[TaskInfo]:
        if not service_ids:
            return []

        def list_() -> list[TaskInfo]:
            return [_task_info(t) for t in self._client.api.tasks(filters={"service": list(service_ids)})]

        return await self._run(list_)

    async def list_nodes(self) -> list[NodeInfo]:
        def list_() -> list[NodeInfo]:
            return [_node_info(n) for n in self._client.api.nodes()]

        return await self._run(list_)

    # -- writing (fenced) ---------------------------------------------------
    async def create(self, d: ServiceDefinition) -> str:
        """Creates the service; ``NameConflict`` when one of that name exists."""

        def create_() -> str:
            self._guard()
            try:
                answer = self._client.api.create_service(**service_body(d, epoch=self.epoch))
            except docker.errors.APIError as exc:
                if exc.status_code == 409:
                    raise da.NameConflict(_explanation(exc)) from None
                raise da.StartFailed(_explanation(exc)) from None
            return str(answer.get("ID", ""))

        return await self._run(create_)

    async def update(self, service_id: str, d: ServiceDefinition) -> None:
        """Replaces the service's spec (Swarm rolls its tasks start-first)."""

        def update_() -> None:
            self._guard()
            version = self._client.api.inspect_service(service_id)["Version"]["Index"]
            self._client.api.update_service(service_id, version, **service_body(d, epoch=self.epoch))

        await self._run(update_)

    async def scale(self, service_id: str, replicas: int) -> None:
        """Sets the replica count, keeping the rest of the spec as it is
        (re-read at its current version: a lost race is retried next pass)."""

        def scale_() -> None:
            self._guard()
            attrs = self._client.api.inspect_service(service_id)
            spec = attrs["Spec"]
            labels = dict(spec.get("Labels") or {})
            if self.epoch is not None:
                labels[EPOCH_LABEL] = str(self.epoch)
            self._client.api.update_service(
                service_id,
                attrs["Version"]["Index"],
                task_template=spec.get("TaskTemplate"),
                name=spec.get("Name"),
                labels=labels,
                mode={"Replicated": {"Replicas": replicas}},
                update_config=spec.get("UpdateConfig"),
                endpoint_spec=spec.get("EndpointSpec"),
                rollback_config=spec.get("RollbackConfig"),
            )

        await self._run(scale_)

    async def force_update(self, service_id: str) -> None:
        """Replaces the service's tasks anew (``TaskTemplate.ForceUpdate`` + 1,
        as ``docker service update --force``), keeping the rest of the spec:
        Swarm rolls them by the service's update config (start-first, one at
        a time), so each replacement serves before the task it replaces
        stops. Re-read at its current version: a lost race fails and the
        caller tries again."""

        def force_() -> None:
            self._guard()
            attrs = self._client.api.inspect_service(service_id)
            spec = attrs["Spec"]
            template = dict(spec.get("TaskTemplate") or {})
            template["ForceUpdate"] = int(template.get("ForceUpdate") or 0) + 1
            labels = dict(spec.get("Labels") or {})
            if self.epoch is not None:
                labels[EPOCH_LABEL] = str(self.epoch)
            self._client.api.update_service(
                service_id,
                attrs["Version"]["Index"],
                task_template=template,
                name=spec.get("Name"),
                labels=labels,
                mode=spec.get("Mode"),
                update_config=spec.get("UpdateConfig"),
                endpoint_spec=spec.get("EndpointSpec"),
                rollback_config=spec.get("RollbackConfig"),
            )

        await self._run(force_)

    async def remove(self, service_id: str) -> None:
        """Removes the service (its tasks stop); already gone counts as done."""

        def remove_() -> None:
            self._guard()
            try:
                self._client.api.remove_service(service_id)
            except docker.errors.NotFound:
                return

        await self._run(remove_)

    # -- registry -----------------------------------------------------------
    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs another blocking call (e.g. asking an image registry) in the pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args))
