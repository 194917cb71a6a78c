"""Observe -> plan -> execute.

Each pass lists this instance's managed containers by label (the engine is
the truth; nothing here is cached as truth), probes running replicas,
resolves each wanted binding's spec (image id, secrets), asks ``plan.plan``
what to change and carries it out. Passes run on every desired-state change,
after a new replica becomes ready, and on a periodic tick. What the
reconciler keeps in memory is only bookkeeping the engine cannot tell:
readiness, restart counts/backoff and the last failure of each binding.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Protocol

from berth import errors
from berth.v1 import common_pb2

from . import docker_adapter as da
from . import spec as specs
from .desired import DesiredTable, binding_key, desired_count
from .events import EventKind, EventStore, scrub
from .plan import (
    BindingKey,
    ContainerStatus,
    Create,
    DesiredReplicas,
    ObservedReplica,
    Plan,
    Remove,
    RemoveReason,
    SlotKey,
    plan,
)
from .probes import probe_http

log = logging.getLogger("berth.scheduler.reconciler")


@dataclass(frozen=True)
class SchedulerConfig:
    instance: str = "default"
    reconcile_interval: float = 2.0
    pull_timeout: float = 60.0
    stop_grace: float = 10.0
    probe_timeout: float = 1.0
    fast_probe_interval: float = 0.1
    startup_timeout: float = 120.0
    quick_exit: float = 10.0  # a replica that ran less than this restarted "quickly"
    crash_loop_after: int = 3
    restart_backoff: float = 1.0
    restart_backoff_max: float = 60.0
    pull_retry: float = 5.0
    pull_retry_max: float = 300.0


class SecretsResolver(Protocol):
    async def resolve(self, project_id: str, environment_id: str) -> Sequence[specs.SecretValue]: ...


# Records the image id resolved for a deployment registered by reference.
ImageRecorder = Callable[[str, str], Awaitable[None]]


class ReplicaState(str, Enum):
    PENDING = "pending"
    STARTING = "starting"
    READY = "ready"
    UNHEALTHY = "unhealthy"
    EXITED = "exited"
    FAILED = "failed"


class BindingState(str, Enum):
    DEPLOYING = "deploying"
    RUNNING = "running"
    DEGRADED = "degraded"
    FAILED = "failed"
    SCALED_TO_ZERO = "scaled_to_zero"
    TERMINATED = "terminated"


@dataclass
class _Readiness:
    ready: bool = False
    ever_ready: bool = False
    message: str = ""


@dataclass
class _Restarts:
    total: int = 0
    quick: int = 0
    not_before: float = 0.0


@dataclass(frozen=True)
class _Problem:
    kind: EventKind
    message: str


@dataclass
class _PullFailure:
    message: str
    not_before: float
    backoff: float


@dataclass(frozen=True)
class EndpointSet:
    project_id: str
    environment_id: str
    deployment_id: str
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class ReplicaView:
    container_id: str
    name: str
    index: int
    state: ReplicaState
    started_at: datetime | None
    restarts: int
    address: str


@dataclass(frozen=True)
class BindingView:
    binding: common_pb2.Binding = field(repr=False)
    status: BindingState
    replicas: tuple[ReplicaView, ...]


class EndpointBroadcast:
    """Latest-value broadcast of the ready endpoint sets."""

    def __init__(self) -> None:
        self._value: tuple[EndpointSet, ...] = ()
        self._queues: set[asyncio.Queue[tuple[EndpointSet, ...] | None]] = set()

    @property
    def current(self) -> tuple[EndpointSet, ...]:
        return self._value

    def publish(self, value: tuple[EndpointSet, ...]) -> bool:
        if value == self._value:
            return False
        self._value = value
        for queue in self._queues:
            self._offer(queue, value)
        return True

    def close(self) -> None:
        for queue in self._queues:
            self._offer(queue, None)

    @staticmethod
    def _offer(queue: asyncio.Queue[tuple[EndpointSet, ...] | None], value: tuple[EndpointSet, ...] | None) -> None:
        while not queue.empty():  # only the latest value matters
            queue.get_nowait()
        queue.put_nowait(value)

    async def subscribe(self) -> AsyncIterator[tuple[EndpointSet, ...]]:
        queue: asyncio.Queue[tuple[EndpointSet, ...] | None] = asyncio.Queue(maxsize=1)
        self._queues.add(queue)
        try:
            yield self._value
            while True:
                value = await queue.get()
                if value is None:
                    return
                yield value
        finally:
            self._queues.discard(queue)


def _labels_ok(labels: Mapping[str, str]) -> bool:
    try:
        int(labels.get(da.REPLICA_LABEL, ""))
        int(labels.get(da.GENERATION_LABEL, "0"))
    except ValueError:
        return False
    return bool(labels.get(da.ENVIRONMENT_LABEL) and labels.get(da.DEPLOYMENT_LABEL))


def _key_of(c: da.ContainerInfo) -> BindingKey:
    return (c.labels[da.ENVIRONMENT_LABEL], c.labels[da.DEPLOYMENT_LABEL])


def _index_of(c: da.ContainerInfo) -> int:
    return int(c.labels[da.REPLICA_LABEL])


def _address_of(c: da.ContainerInfo) -> str:
    port = c.labels.get(specs.PORT_LABEL) or str(specs.DEFAULT_PORT)
    return f"{c.ip}:{port}" if c.ip else ""


class Reconciler:
    def __init__(
        self,
        adapter: da.DockerAdapter,
        table: DesiredTable,
        secrets: SecretsResolver,
        events: EventStore,
        config: SchedulerConfig,
        *,
        record_image: ImageRecorder | None = None,
    ) -> None:
        self._adapter = adapter
        self._table = table
        self._secrets = secrets
        self._events = events
        self.config = config
        self._record_image = record_image
        self.endpoints = EndpointBroadcast()
        self._wake = asyncio.Event()
        self._pass_lock = asyncio.Lock()
        self._observed: list[da.ContainerInfo] = []
        self._readiness: dict[str, _Readiness] = {}
        self._restarts: dict[SlotKey, _Restarts] = {}
        self._problems: dict[BindingKey, _Problem] = {}
        self._pulls: dict[str, asyncio.Task[None]] = {}
        self._pull_failures: dict[str, _PullFailure] = {}
        self._recorded_images: set[str] = set()
        self._startup_probes: dict[str, asyncio.Task[None]] = {}
        table.on_change(self.wake)

    # -- loop ---------------------------------------------------------------
    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Reconciles until cancelled: at once on a wake-up, else every tick."""
        while True:
            self._wake.clear()
            try:
                await self.reconcile_once()
            except asyncio.CancelledError:
                raise
            except da.EngineError as exc:
                log.warning("reconcile_failed", extra={"error": exc.message})
            except Exception:  # noqa: BLE001 - the loop must outlive one bad pass
                log.exception("reconcile_crashed")
            try:
                await asyncio.wait_for(self._wake.wait(), self.config.reconcile_interval)
            except asyncio.TimeoutError:
                pass

    async def close(self) -> None:
        """Stops background probes and pulls. Replicas keep running: they
        outlive the control plane and a restarted scheduler adopts them."""
        self.endpoints.close()
        tasks = [*self._startup_probes.values(), *self._pulls.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- one pass -----------------------------------------------------------
    async def reconcile_once(self) -> Plan:
        async with self._pass_lock:
            observed = [
                c for c in await self._adapter.list_managed(self.config.instance) if _labels_ok(c.labels)
            ]
            self._observed = observed
            await self._probe_running(observed)
            live_ids = {c.id for c in observed}
            for gone in [cid for cid in self._readiness if cid not in live_ids and cid not in self._startup_probes]:
                del self._readiness[gone]
            self._publish_endpoints()

            resolved = await self._resolve_specs()
            desired = [
                DesiredReplicas(
                    key=binding_key(b),
                    count=desired_count(b),
                    spec_hash=(resolved[binding_key(b)].spec_hash if binding_key(b) in resolved else None),
                )
                for b in self._table.bindings()
            ]
            replicas = [
                ObservedReplica(
                    container_id=c.id,
                    name=c.name,
                    key=_key_of(c),
                    index=_index_of(c),
                    generation=int(c.labels.get(da.GENERATION_LABEL, "0")),
                    spec_hash=c.labels.get(da.SPEC_HASH_LABEL, ""),
                    status=ContainerStatus.parse(c.status),
                    ready=self._readiness.get(c.id, _Readiness()).ready,
                )
                for c in observed
            ]
            now = time.monotonic()
            result = plan(
                desired,
                replicas,
                snapshot_complete=self._table.snapshot_complete,
                now=now,
                not_before={slot: r.not_before for slot, r in self._restarts.items()},
            )
            self._clear_recovered(replicas, desired)
            if not result.empty:
                log.info(
                    "plan",
                    extra={
                        "creates": [f"{c.key[1]}/{c.key[0]}#{c.index} ({c.reason.value})" for c in result.creates],
                        "removes": [f"{r.name} ({r.reason.value})" for r in result.removes],
                    },
                )
            await self._execute(result, resolved, {c.id: c for c in observed})
            return result

    async def _probe_running(self, observed: list[da.ContainerInfo]) -> None:
        running = [
            c for c in observed if c.status == ContainerStatus.RUNNING.value and c.id not in self._startup_probes
        ]
        results = await asyncio.gather(*(self._probe(c) for c in running))
        for c, (ok, message) in zip(running, results):
            state = self._readiness.setdefault(c.id, _Readiness())
            was_ready = state.ready
            state.ready, state.message = ok, message
            if ok:
                state.ever_ready = True
            elif was_ready:
                self._record_for_container(c, EventKind.HEALTH_CHECK_FAILED, f"health check failed: {message}")
        for c in observed:
            if c.status != ContainerStatus.RUNNING.value and c.id in self._readiness:
                self._readiness[c.id].ready = False

    async def _probe(self, c: da.ContainerInfo) -> tuple[bool, str]:
        port = int(c.labels.get(specs.PORT_LABEL) or specs.DEFAULT_PORT)
        result = await probe_http(
            c.ip, port, c.labels.get(specs.HEALTH_PATH_LABEL) or "/", timeout=self.config.probe_timeout
        )
        return result.ok, result.message

    def _publish_endpoints(self) -> None:
        groups: dict[tuple[str, str, str], list[str]] = {}
        for c in self._observed:
            if c.status != ContainerStatus.RUNNING.value or not self._readiness.get(c.id, _Readiness()).ready:
                continue
            address = _address_of(c)
            if not address:
                continue
            env_id, dep_id = _key_of(c)
            groups.setdefault((c.labels.get(da.PROJECT_LABEL, ""), env_id, dep_id), []).append(address)
        value = tuple(
            EndpointSet(project_id=p, environment_id=e, deployment_id=d, addresses=tuple(sorted(addrs)))
            for (p, e, d), addrs in sorted(groups.items())
        )
        if self.endpoints.publish(value):
            log.info("endpoints_changed", extra={"sets": len(value), "addresses": sum(len(s.addresses) for s in value)})

    def _clear_recovered(self, replicas: list[ObservedReplica], desired: list[DesiredReplicas]) -> None:
        for want in desired:
            ready = {r.index for r in replicas if r.key == want.key and r.ready and r.index < want.count}
            if want.count and len(ready) >= want.count:
                self._problems.pop(want.key, None)

    # -- specs --------------------------------------------------------------
    async def _resolve_specs(self) -> dict[BindingKey, specs.ResolvedSpec]:
        wanted = [b for b in self._table.bindings() if desired_count(b) > 0]
        secrets_by_env: dict[tuple[str, str], Sequence[specs.SecretValue] | None] = {}
        resolved: dict[BindingKey, specs.ResolvedSpec] = {}
        for b in wanted:
            image_id = await self._image_for(b)
            if image_id is None:
                continue
            env_key = (b.project_id, b.environment_id)
            if env_key not in secrets_by_env:
                try:
                    secrets_by_env[env_key] = await self._secrets.resolve(b.project_id, b.environment_id)
                except errors.BerthError as exc:
                    # Infrastructure, not the deployment's fault: keep what runs, retry next pass.
                    log.warning(
                        "secrets_unavailable",
                        extra={"environment_id": b.environment_id, "error": type(exc).__name__},
                    )
                    secrets_by_env[env_key] = None
            values = secrets_by_env[env_key]
            if values is None:
                continue
            resolved[binding_key(b)] = specs.resolve(b, image_id, values)
        return resolved

    async def _image_for(self, b: common_pb2.Binding) -> str | None:
        """The image id to run, or None (pull pending or failed)."""
        dep = b.deployment
        if dep.image_id and await self._adapter.image_id(dep.image_id):
            return dep.image_id
        ref = dep.image
        if not ref:
            self._fail(b, EventKind.IMAGE_PULL_ERROR, f"image {dep.image_id} is not present on this engine")
            return None
        local = await self._adapter.image_id(ref)
        if local is None:
            failure = self._pull_failures.get(ref)
            if failure is not None:
                self._problems[binding_key(b)] = _Problem(EventKind.IMAGE_PULL_ERROR, failure.message)
            if ref not in self._pulls and (failure is None or failure.not_before <= time.monotonic()):
                self._pulls[ref] = asyncio.create_task(self._pull(ref), name=f"pull {ref}")
            return None
        if dep.image_id and local != dep.image_id:
            self._fail(
                b, EventKind.IMAGE_PULL_ERROR, f"{ref} resolves to {local}, but the deployment is pinned to {dep.image_id}"
            )
            return None
        if self._problems.get(binding_key(b), _Problem(EventKind.CRASH_LOOP, "")).kind is EventKind.IMAGE_PULL_ERROR:
            del self._problems[binding_key(b)]
        if not dep.image_id and self._record_image is not None and dep.id not in self._recorded_images:
            try:
                await self._record_image(dep.id, local)
                self._recorded_images.add(dep.id)
            except errors.BerthError as exc:
                log.warning("resolve_image_failed", extra={"deployment_id": dep.id, "error": exc.message})
        return local

    async def _pull(self, ref: str) -> None:
        try:
            log.info("pull_started", extra={"image": ref})
            await self._adapter.pull(ref, timeout=self.config.pull_timeout)
            self._pull_failures.pop(ref, None)
            log.info("pull_done", extra={"image": ref})
        except da.EngineError as exc:
            previous = self._pull_failures.get(ref)
            backoff = min(self.config.pull_retry_max, previous.backoff * 2) if previous else self.config.pull_retry
            self._pull_failures[ref] = _PullFailure(exc.message, time.monotonic() + backoff, backoff)
            log.warning("pull_failed", extra={"image": ref, "error": exc.message})
            for b in self._table.bindings():
                if b.deployment.image == ref and desired_count(b) > 0:
                    self._fail(b, EventKind.IMAGE_PULL_ERROR, exc.message)
        finally:
            self._pulls.pop(ref, None)
            self.wake()

    # -- execute ------------------------------------------------------------
    async def _execute(
        self, p: Plan, resolved: dict[BindingKey, specs.ResolvedSpec], observed: dict[str, da.ContainerInfo]
    ) -> None:
        await asyncio.gather(*(self._remove(r, observed.get(r.container_id)) for r in p.removes))
        await asyncio.gather(*(self._create(c, resolved[c.key]) for c in p.creates if c.key in resolved))

    async def _remove(self, r: Remove, info: da.ContainerInfo | None) -> None:
        if r.reason is RemoveReason.EXITED and info is not None:
            self._note_exit(r, info)
        probe = self._startup_probes.pop(r.container_id, None)
        if probe is not None:
            probe.cancel()
        grace = 0.0 if r.reason in (RemoveReason.EXITED, RemoveReason.NEVER_STARTED) else self.config.stop_grace
        try:
            await self._adapter.remove(r.container_id, grace=grace)
        except da.ContainerGone:
            pass  # vanished meanwhile: done
        except da.EngineError as exc:
            log.warning("remove_failed", extra={"container": r.name, "error": exc.message})
            return
        self._readiness.pop(r.container_id, None)
        log.info("removed", extra={"container": r.name, "reason": r.reason.value})

    def _note_exit(self, r: Remove, info: da.ContainerInfo) -> None:
        slot = (r.key[0], r.key[1], r.index)
        record = self._restarts.setdefault(slot, _Restarts())
        record.total += 1
        ran = (
            (info.finished_at - info.started_at).total_seconds()
            if info.started_at and info.finished_at and info.finished_at >= info.started_at
            else 0.0
        )
        record.quick = record.quick + 1 if ran < self.config.quick_exit else 0
        if record.quick:
            delay = min(self.config.restart_backoff_max, self.config.restart_backoff * 2 ** (record.quick - 1))
            record.not_before = time.monotonic() + delay * random.uniform(0.8, 1.2)
        else:
            record.not_before = 0.0
        detail = f"exit code {info.exit_code}" + (f": {info.error}" if info.error else "")
        if info.oom_killed:
            self._record_for_container(
                info, EventKind.OOM_KILLED, f"replica {r.index} was killed for exceeding its memory limit ({detail})"
            )
        if record.quick >= self.config.crash_loop_after:
            self._record_for_container(
                info,
                EventKind.CRASH_LOOP,
                f"replica {r.index} exited {record.quick} times in quick succession; last {detail}",
            )
            self._problems[r.key] = _Problem(EventKind.CRASH_LOOP, detail)

    async def _create(self, c: Create, spec: specs.ResolvedSpec) -> None:
        run = specs.run_spec(self.config.instance, spec, c.index, c.generation)
        b = spec.binding
        try:
            info = await self._adapter.run(run)
        except da.NameConflict:
            log.info("name_conflict", extra={"container": run.name})  # someone made it: re-read
            self.wake()
            return
        except da.StartFailed as exc:
            message = scrub(exc.message, spec.secret_values)
            slot = (c.key[0], c.key[1], c.index)
            record = self._restarts.setdefault(slot, _Restarts())
            record.quick += 1
            record.not_before = time.monotonic() + min(
                self.config.restart_backoff_max, self.config.restart_backoff * 2 ** (record.quick - 1)
            )
            self._fail(b, EventKind.SCHEDULING_FAILURE, message, replica=str(c.index))
            return
        except da.EngineError as exc:
            log.warning("create_failed", extra={"container": run.name, "error": scrub(exc.message, spec.secret_values)})
            return
        if self._problems.get(c.key, _Problem(EventKind.CRASH_LOOP, "")).kind is EventKind.SCHEDULING_FAILURE:
            del self._problems[c.key]
        self._readiness[info.id] = _Readiness()
        log.info("created", extra={"container": run.name, "id": info.id[:12], "reason": c.reason.value})
        self._startup_probes[info.id] = asyncio.create_task(
            self._startup_probe(info, spec.port, spec.health_path), name=f"probe {run.name}"
        )

    async def _startup_probe(self, info: da.ContainerInfo, port: int, path: str) -> None:
        """Probes a new replica every ~100 ms until it is ready."""
        deadline = time.monotonic() + self.config.startup_timeout
        message = ""
        try:
            while time.monotonic() < deadline:
                result = await probe_http(info.ip, port, path, timeout=self.config.probe_timeout)
                if result.ok:
                    state = self._readiness.setdefault(info.id, _Readiness())
                    state.ready = state.ever_ready = True
                    state.message = result.message
                    log.info("ready", extra={"container": info.name})
                    return
                message = result.message
                await asyncio.sleep(self.config.fast_probe_interval)
            self._record_for_container(
                info,
                EventKind.HEALTH_CHECK_FAILED,
                f"not ready within {self.config.startup_timeout:g} s: {message}",
            )
        finally:
            self._startup_probes.pop(info.id, None)
            self.wake()

    # -- failures -----------------------------------------------------------
    def _fail(self, b: common_pb2.Binding, kind: EventKind, message: str, *, replica: str = "") -> None:
        self._problems[binding_key(b)] = _Problem(kind, message)
        self._events.record(
            kind,
            message=message,
            project_id=b.project_id,
            deployment_id=b.deployment.id,
            environment_id=b.environment_id,
            environment=b.environment_name,
            replica=replica,
        )
        log.warning(kind.value, extra={"deployment_id": b.deployment.id, "environment_id": b.environment_id})

    def _record_for_container(self, c: da.ContainerInfo, kind: EventKind, message: str) -> None:
        env_id, dep_id = _key_of(c)
        b = self._table.get((env_id, dep_id))
        self._events.record(
            kind,
            message=message,
            project_id=c.labels.get(da.PROJECT_LABEL, ""),
            deployment_id=dep_id,
            environment_id=env_id,
            environment=b.environment_name if b is not None else "",
            replica=c.labels.get(da.REPLICA_LABEL, ""),
        )
        log.warning(kind.value, extra={"container": c.name})

    # -- status -------------------------------------------------------------
    async def status(self, deployment_id: str) -> list[BindingView]:
        """Re-reads the deployment's containers from the engine and derives
        each binding's status."""
        containers = [
            c
            for c in await self._adapter.list_managed(self.config.instance, {da.DEPLOYMENT_LABEL: deployment_id})
            if _labels_ok(c.labels)
        ]
        views = []
        for b in self._table.bindings():
            if b.deployment.id != deployment_id:
                continue
            key = binding_key(b)
            mine = sorted((c for c in containers if _key_of(c) == key), key=lambda c: (_index_of(c), c.name))
            replicas = tuple(
                ReplicaView(
                    container_id=c.id,
                    name=c.name,
                    index=_index_of(c),
                    state=self._replica_state(c),
                    started_at=c.started_at,
                    restarts=self._restarts.get((key[0], key[1], _index_of(c)), _Restarts()).total,
                    address=_address_of(c),
                )
                for c in mine
            )
            views.append(BindingView(binding=b, status=self._binding_state(b, replicas), replicas=replicas))
        return views

    def _replica_state(self, c: da.ContainerInfo) -> ReplicaState:
        status = ContainerStatus.parse(c.status)
        readiness = self._readiness.get(c.id, _Readiness())
        if status is ContainerStatus.CREATED:
            return ReplicaState.PENDING
        if status is ContainerStatus.RUNNING:
            if readiness.ready:
                return ReplicaState.READY
            return ReplicaState.UNHEALTHY if readiness.ever_ready else ReplicaState.STARTING
        if status in (ContainerStatus.RESTARTING,):
            return ReplicaState.STARTING
        if status is ContainerStatus.PAUSED:
            return ReplicaState.UNHEALTHY
        if c.oom_killed or c.error:
            return ReplicaState.FAILED
        return ReplicaState.EXITED

    def _binding_state(self, b: common_pb2.Binding, replicas: tuple[ReplicaView, ...]) -> BindingState:
        if b.state == "terminated" or b.deployment.state == "terminated":
            return BindingState.TERMINATED
        want = desired_count(b)
        if want == 0:
            return BindingState.SCALED_TO_ZERO
        ready = len({r.index for r in replicas if r.state is ReplicaState.READY and r.index < want})
        if ready >= want:
            return BindingState.RUNNING
        problem = self._problems.get(binding_key(b))
        if problem is not None and problem.kind in (EventKind.IMAGE_PULL_ERROR, EventKind.SCHEDULING_FAILURE):
            return BindingState.FAILED
        if problem is not None and problem.kind is EventKind.CRASH_LOOP:
            return BindingState.DEGRADED if ready else BindingState.FAILED
        if ready or any(r.state in (ReplicaState.UNHEALTHY, ReplicaState.EXITED) for r in replicas):
            return BindingState.DEGRADED
        return BindingState.DEPLOYING
