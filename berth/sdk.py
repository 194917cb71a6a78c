"""Berth's typed Python SDK: the public API (``berth.v1``) as typed methods.

:class:`Berth` is the synchronous client, :class:`AsyncBerth` the asyncio one
(``grpc.aio``); both take the same arguments and return the same frozen
dataclasses. Every call carries a deadline (``timeout``) and raises a
:mod:`berth.errors` exception carrying the ``google.rpc.Status`` details the
service sent (``field`` of a ``BadRequest``, ``reason``/``metadata`` of an
``ErrorInfo`` such as ``SEQUENCE_CONFLICT`` with ``metadata["current_sequence"]``,
``resource_type``/``resource_name``). The status -> exception conversion is
:func:`berth.client.error_from_rpc`, shared with the CLI's client.

One :class:`RetryPolicy` applies to idempotent methods (reads, set-to-a-value
writes) on UNAVAILABLE; a pointer move (promote, rollback) is retried only
when it carries ``expected_sequence`` (a compare-and-swap: a move that did
land makes the retry fail with ``Aborted`` instead of moving twice); a
deploy, create or delete is never retried.

Enums arrive as Python :class:`enum.Enum` members; a number a newer server
sends that these stubs do not know reads as ``UNKNOWN`` (see
:mod:`berth.enums`), never as a crash.
"""
from __future__ import annotations

import asyncio
import datetime as _dt
import enum
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import Message

from berth import enums
from berth.client import Endpoints, error_from_rpc, open_channel
from berth.v1 import (
    common_pb2,
    registry_pb2,
    registry_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
    secrets_pb2,
    secrets_pb2_grpc,
)

T = TypeVar("T")
EnumT = TypeVar("EnumT", bound="_WordEnum")

__all__ = [
    "ApiKey", "AsyncBerth", "Berth", "CreatedApiKey", "EnvironmentGate", "ExperimentCase", "ExperimentRun", "LogLine", "LogStream", "MasterKeyRotated", "Binding", "BindingState", "Canary", "CanaryChanged", "CanaryState", "CanaryStep", "CanaryThresholds", "BindingStatus", "CreatedProject", "Deployed", "Deployment",
    "DeploymentError", "DeploymentState", "DeploymentStatus", "Environment", "ErrorKind", "HistoryEntry",
    "HistoryKind", "Page", "PointerMoved", "Project", "Replica", "ReplicaState", "Resources", "RetryPolicy",
    "SecretInfo", "SecretScope", "ServingStatus", "WatchEvent", "WorkerConfig",
]


# ---------------------------------------------------------------- enums


class _WordEnum(str, enum.Enum):
    """An enum whose values are the contract's lowercase words."""

    @classmethod
    def _from_proto(cls: type[EnumT], proto_enum: Any, number: int) -> EnumT:
        word = enums.label(proto_enum, number)
        try:
            return cls(word)
        except ValueError:  # a word the stubs know but this SDK does not
            return cls(enums.UNKNOWN)


class DeploymentState(_WordEnum):
    UNSPECIFIED = "unspecified"
    UNKNOWN = "unknown"
    ACTIVE = "active"
    TERMINATED = "terminated"


BindingState = DeploymentState  # Binding.State has the same words


class HistoryKind(_WordEnum):
    UNSPECIFIED = "unspecified"
    UNKNOWN = "unknown"
    DEPLOY = "deploy"
    PROMOTE = "promote"
    ROLLBACK = "rollback"
    CANARY = "canary"


class ServingStatus(_WordEnum):
    """``BindingStatus.Status``: how a deployment runs in one environment."""

    UNSPECIFIED = "unspecified"
    UNKNOWN = "unknown"
    DEPLOYING = "deploying"
    RUNNING = "running"
    DEGRADED = "degraded"
    FAILED = "failed"
    SCALED_TO_ZERO = "scaled_to_zero"
    TERMINATED = "terminated"


class ReplicaState(_WordEnum):
    UNSPECIFIED = "unspecified"
    UNKNOWN = "unknown"
    PENDING = "pending"
    STARTING = "starting"
    READY = "ready"
    UNHEALTHY = "unhealthy"
    EXITED = "exited"
    FAILED = "failed"
    STOPPING = "stopping"
    PAUSED = "paused"


class ErrorKind(_WordEnum):
    UNSPECIFIED = "unspecified"
    UNKNOWN = "unknown"
    IMAGE_PULL_ERROR = "image_pull_error"
    SCHEDULING_FAILURE = "scheduling_failure"
    CRASH_LOOP = "crash_loop"
    OOM_KILLED = "oom_killed"
    HEALTH_CHECK_FAILED = "health_check_failed"
    NODE_DOWN = "node_down"
    CANARY_ABORTED = "canary_aborted"


class SecretScope(_WordEnum):
    UNSPECIFIED = "unspecified"
    UNKNOWN = "unknown"
    PROJECT = "project"
    ENVIRONMENT = "environment"


# ---------------------------------------------------------------- results


def _time(message: Message, name: str) -> _dt.datetime | None:
    if not message.HasField(name):
        return None
    ts = getattr(message, name)
    if ts.seconds == 0 and ts.nanos == 0:
        return None
    result: _dt.datetime = ts.ToDatetime(tzinfo=_dt.UTC)
    return result


@dataclass(frozen=True)
class Project:
    id: str
    name: str
    created_at: _dt.datetime | None

    #: The message as received (for tools that need a field this SDK does
    #: not type yet); not compared.
    raw: common_pb2.Project = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, m: common_pb2.Project) -> Project:
        return cls(raw=m, id=m.id, name=m.name, created_at=_time(m, "created_at"))


@dataclass(frozen=True)
class CreatedProject:
    """A new project and its first API key (shown only once)."""

    project: Project
    api_key: str


@dataclass(frozen=True)
class ApiKey:
    """A project API key's metadata (the key itself is shown only when
    created)."""

    id: str
    project_id: str
    name: str
    prefix: str
    created_at: _dt.datetime | None
    revoked_at: _dt.datetime | None
    #: The message as received; not compared.
    raw: common_pb2.ApiKeyInfo = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, m: common_pb2.ApiKeyInfo) -> ApiKey:
        return cls(raw=m, id=m.id, project_id=m.project_id, name=m.name, prefix=m.prefix,
                   created_at=_time(m, "created_at"), revoked_at=_time(m, "revoked_at"))


@dataclass(frozen=True)
class CreatedApiKey:
    """A new API key: its metadata and the key (shown only once)."""

    key: ApiKey
    api_key: str


@dataclass(frozen=True)
class EnvironmentGate:
    """A promotion gate: moves into the environment need a recorded
    experiment run of ``experiment`` passing at least ``threshold``."""

    environment_id: str
    environment_name: str
    experiment: str
    threshold: float
    dataset_digest: str
    actor: str
    updated_at: _dt.datetime | None
    #: The message as received; not compared.
    raw: registry_pb2.EnvironmentGate = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, m: registry_pb2.EnvironmentGate) -> EnvironmentGate:
        return cls(raw=m, environment_id=m.environment_id, environment_name=m.environment_name,
                   experiment=m.experiment, threshold=m.threshold, dataset_digest=m.dataset_digest, actor=m.actor,
                   updated_at=_time(m, "updated_at"))


@dataclass(frozen=True)
class ExperimentCase:
    """One case of an experiment run."""

    name: str
    passed: bool
    status: int = 0
    latency_ms: float = 0.0
    reason: str = ""


@dataclass(frozen=True)
class ExperimentRun:
    """A recorded experiment run (``cases`` is empty in lists)."""

    id: str
    project_id: str
    name: str
    deployment_id: str
    dataset_digest: str
    total: int
    passed: int
    pass_rate: float
    latency_p50_ms: float
    latency_p99_ms: float
    cases: tuple[ExperimentCase, ...]
    actor: str
    created_at: _dt.datetime | None
    #: The message as received; not compared.
    raw: registry_pb2.ExperimentRun = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, m: registry_pb2.ExperimentRun) -> ExperimentRun:
        return cls(
            raw=m, id=m.id, project_id=m.project_id, name=m.name, deployment_id=m.deployment_id,
            dataset_digest=m.dataset_digest, total=m.total, passed=m.passed, pass_rate=m.pass_rate,
            latency_p50_ms=m.latency_p50_ms, latency_p99_ms=m.latency_p99_ms,
            cases=tuple(ExperimentCase(name=c.name, passed=c.passed, status=c.status, latency_ms=c.latency_ms,
                                       reason=c.reason) for c in m.cases),
            actor=m.actor, created_at=_time(m, "created_at"),
        )


class LogStream(_WordEnum):
    UNSPECIFIED = "unspecified"
    UNKNOWN = "unknown"
    STDOUT = "stdout"
    STDERR = "stderr"


@dataclass(frozen=True)
class LogLine:
    """One line a replica printed (``dropped`` > 0: that many lines were
    lost before it; ``archived``: read from a stopped replica's kept tail)."""

    time: _dt.datetime | None
    replica_id: str
    replica_index: int
    environment_id: str
    environment: str
    stream: LogStream
    text: str
    dropped: int
    archived: bool
    #: The message as received; not compared.
    raw: scheduler_pb2.LogLine = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, m: scheduler_pb2.LogLine) -> LogLine:
        return cls(raw=m, time=_time(m, "time"), replica_id=m.replica_id, replica_index=m.replica_index,
                   environment_id=m.environment_id, environment=m.environment,
                   stream=LogStream._from_proto(scheduler_pb2.LogLine.Stream, m.stream), text=m.text,
                   dropped=m.dropped, archived=m.archived)


@dataclass(frozen=True)
class Resources:
    memory_bytes: int = 0
    cpus: float = 0.0


@dataclass(frozen=True)
class WorkerConfig:
    """How a deployment's replicas run: the port they listen on, the command
    (empty: the image's), the health path, plain variables, resources."""

    port: int = 8080
    command: tuple[str, ...] = ()
    health_path: str = ""
    variables: tuple[tuple[str, str], ...] = ()
    resources: Resources = field(default_factory=Resources)

    @classmethod
    def from_proto(cls, m: common_pb2.WorkerConfig) -> WorkerConfig:
        return cls(
            port=m.port, command=tuple(m.command), health_path=m.health_path,
            variables=tuple(sorted(m.variables.items())),
            resources=Resources(memory_bytes=m.resources.memory_bytes, cpus=m.resources.cpus),
        )

    def to_proto(self) -> common_pb2.WorkerConfig:
        return common_pb2.WorkerConfig(
            port=self.port, command=list(self.command), health_path=self.health_path,
            variables=dict(self.variables),
            resources=common_pb2.Resources(memory_bytes=self.resources.memory_bytes, cpus=self.resources.cpus),
        )


@dataclass(frozen=True)
class Deployment:
    id: str
    project_id: str
    image: str
    image_id: str
    config: WorkerConfig
    state: DeploymentState
    created_at: _dt.datetime | None
    created_by: str

    #: The message as received (for tools that need a field this SDK does
    #: not type yet); not compared.
    raw: common_pb2.Deployment = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, m: common_pb2.Deployment) -> Deployment:
        return cls(raw=m,
            id=m.id, project_id=m.project_id, image=m.image, image_id=m.image_id,
            config=WorkerConfig.from_proto(m.config),
            state=DeploymentState._from_proto(common_pb2.Deployment.State, m.state),
            created_at=_time(m, "created_at"), created_by=m.created_by,
        )


class CanaryState(_WordEnum):
    UNSPECIFIED = "unspecified"
    UNKNOWN = "unknown"
    RUNNING = "running"
    PAUSED = "paused"
    ABORTED = "aborted"
    PROMOTED = "promoted"


@dataclass(frozen=True)
class CanaryStep:
    """A step of a canary: ``weight`` percent of requests to the candidate
    for ``bake_seconds``."""

    weight: int
    bake_seconds: int


@dataclass(frozen=True)
class CanaryThresholds:
    """When a canary aborts: error rate above the stable's by more than
    ``max_error_rate_increase``, latency above ``max_latency_ratio`` times
    the stable's (0: not checked), judged after ``min_requests``."""

    max_error_rate_increase: float = 0.0
    max_latency_ratio: float = 0.0
    min_requests: int = 0


@dataclass(frozen=True)
class Canary:
    stable_deployment_id: str
    candidate_deployment_id: str
    candidate_weight: int
    steps: tuple[CanaryStep, ...]
    step: int
    step_started_at: _dt.datetime | None
    state: CanaryState
    thresholds: CanaryThresholds
    last_analysis: str
    last_analysis_at: _dt.datetime | None
    reason: str
    actor: str

    @classmethod
    def from_proto(cls, m: common_pb2.Canary) -> Canary:
        t = m.thresholds
        return cls(
            stable_deployment_id=m.stable_deployment_id, candidate_deployment_id=m.candidate_deployment_id,
            candidate_weight=m.candidate_weight,
            steps=tuple(CanaryStep(weight=x.weight, bake_seconds=x.bake_seconds) for x in m.steps), step=m.step,
            step_started_at=_time(m, "step_started_at"),
            state=CanaryState._from_proto(common_pb2.Canary.State, m.state),
            thresholds=CanaryThresholds(max_error_rate_increase=t.max_error_rate_increase,
                                        max_latency_ratio=t.max_latency_ratio, min_requests=t.min_requests),
            last_analysis=m.last_analysis, last_analysis_at=_time(m, "last_analysis_at"), reason=m.reason,
            actor=m.actor,
        )


@dataclass(frozen=True)
class Environment:
    id: str
    project_id: str
    project_name: str
    name: str
    deployment_id: str
    sequence: int
    protected: bool
    created_at: _dt.datetime | None
    previous_deployment_id: str
    #: The environment's canary (running or the last one), None when it never had one.
    canary: Canary | None

    #: The message as received (for tools that need a field this SDK does
    #: not type yet); not compared.
    raw: common_pb2.Environment = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, m: common_pb2.Environment) -> Environment:
        return cls(raw=m,
            id=m.id, project_id=m.project_id, project_name=m.project_name, name=m.name,
            deployment_id=m.deployment_id, sequence=m.sequence, protected=m.protected,
            created_at=_time(m, "created_at"), previous_deployment_id=m.previous_deployment_id,
            canary=Canary.from_proto(m.canary) if m.HasField("canary") else None,
        )


@dataclass(frozen=True)
class HistoryEntry:
    environment_id: str
    sequence: int
    kind: HistoryKind
    deployment_id: str
    previous_deployment_id: str
    min_replicas: int
    max_replicas: int
    actor: str
    created_at: _dt.datetime | None
    reason: str

    #: The message as received (for tools that need a field this SDK does
    #: not type yet); not compared.
    raw: common_pb2.HistoryEntry = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, m: common_pb2.HistoryEntry) -> HistoryEntry:
        return cls(raw=m,
            environment_id=m.environment_id, sequence=m.sequence,
            kind=HistoryKind._from_proto(common_pb2.HistoryEntry.Kind, m.kind),
            deployment_id=m.deployment_id, previous_deployment_id=m.previous_deployment_id,
            min_replicas=m.min_replicas, max_replicas=m.max_replicas, actor=m.actor,
            created_at=_time(m, "created_at"), reason=m.reason,
        )


@dataclass(frozen=True)
class Binding:
    """A deployment bound to an environment with its replica bounds."""

    project_id: str
    project_name: str
    environment_id: str
    environment_name: str
    deployment: Deployment
    min_replicas: int
    max_replicas: int
    state: DeploymentState
    serving: bool
    updated_at: _dt.datetime | None
    #: Seconds without a request before the replicas pause / stop; 0 = the
    #: scheduler's default.
    idle_pause_seconds: int
    idle_stop_seconds: int

    #: The message as received (for tools that need a field this SDK does
    #: not type yet); not compared.
    raw: common_pb2.Binding = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, m: common_pb2.Binding) -> Binding:
        return cls(raw=m,
            project_id=m.project_id, project_name=m.project_name, environment_id=m.environment_id,
            environment_name=m.environment_name, deployment=Deployment.from_proto(m.deployment),
            min_replicas=m.min_replicas, max_replicas=m.max_replicas,
            state=DeploymentState._from_proto(common_pb2.Binding.State, m.state),
            serving=m.serving, updated_at=_time(m, "updated_at"),
            idle_pause_seconds=m.idle_pause_seconds, idle_stop_seconds=m.idle_stop_seconds,
        )


@dataclass(frozen=True)
class Deployed:
    """What a deploy did: the new deployment, the environment now pointing
    at it, and the history entry recording the move."""

    deployment: Deployment
    environment: Environment
    entry: HistoryEntry


@dataclass(frozen=True)
class PointerMoved:
    """What a promote or rollback did: the environment after the move and
    the history entry recording it."""

    environment: Environment
    entry: HistoryEntry


@dataclass(frozen=True)
class CanaryChanged:
    """What a canary call did: the environment (with its ``canary``) and
    the history entry, when the call moved the pointer (start, promote)."""

    environment: Environment
    entry: HistoryEntry | None


@dataclass(frozen=True)
class Replica:
    id: str
    name: str
    index: int
    state: ReplicaState
    started_at: _dt.datetime | None
    restarts: int
    address: str
    node: str

    #: The message as received (for tools that need a field this SDK does
    #: not type yet); not compared.
    raw: scheduler_pb2.Replica = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, m: scheduler_pb2.Replica) -> Replica:
        return cls(raw=m,
            id=m.id, name=m.name, index=m.index,
            state=ReplicaState._from_proto(scheduler_pb2.Replica.State, m.state),
            started_at=_time(m, "started_at"), restarts=m.restarts, address=m.address, node=m.node,
        )


@dataclass(frozen=True)
class BindingStatus:
    environment_id: str
    environment: str
    status: ServingStatus
    min_replicas: int
    max_replicas: int
    serving: bool
    replicas: tuple[Replica, ...]

    #: The message as received (for tools that need a field this SDK does
    #: not type yet); not compared.
    raw: scheduler_pb2.BindingStatus = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, m: scheduler_pb2.BindingStatus) -> BindingStatus:
        return cls(raw=m,
            environment_id=m.environment_id, environment=m.environment,
            status=ServingStatus._from_proto(scheduler_pb2.BindingStatus.Status, m.status),
            min_replicas=m.min_replicas, max_replicas=m.max_replicas, serving=m.serving,
            replicas=tuple(Replica.from_proto(r) for r in m.replicas),
        )


@dataclass(frozen=True)
class DeploymentStatus:
    deployment: Deployment
    bindings: tuple[BindingStatus, ...]

    #: The message as received (for tools that need a field this SDK does
    #: not type yet); not compared.
    raw: scheduler_pb2.DeploymentStatus = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, m: scheduler_pb2.DeploymentStatus) -> DeploymentStatus:
        return cls(raw=m,
            deployment=Deployment.from_proto(m.deployment),
            bindings=tuple(BindingStatus.from_proto(b) for b in m.bindings),
        )


@dataclass(frozen=True)
class DeploymentError:
    kind: ErrorKind
    message: str
    deployment_id: str
    environment_id: str
    environment: str
    replica: str
    count: int
    first_seen: _dt.datetime | None
    last_seen: _dt.datetime | None

    #: The message as received (for tools that need a field this SDK does
    #: not type yet); not compared.
    raw: scheduler_pb2.DeploymentError = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, m: scheduler_pb2.DeploymentError) -> DeploymentError:
        return cls(raw=m,
            kind=ErrorKind._from_proto(scheduler_pb2.DeploymentError.Kind, m.kind),
            message=m.message, deployment_id=m.deployment_id, environment_id=m.environment_id,
            environment=m.environment, replica=m.replica, count=m.count,
            first_seen=_time(m, "first_seen"), last_seen=_time(m, "last_seen"),
        )


@dataclass(frozen=True)
class SecretInfo:
    """A secret's metadata (never its value)."""

    name: str
    type: str
    scope: SecretScope
    environment_id: str
    environment: str
    version: int
    created_at: _dt.datetime | None
    updated_at: _dt.datetime | None
    updated_by: str
    deleted: bool

    #: The message as received (for tools that need a field this SDK does
    #: not type yet); not compared.
    raw: secrets_pb2.SecretInfo = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, m: secrets_pb2.SecretInfo) -> SecretInfo:
        return cls(raw=m,
            name=m.name, type=m.type, scope=SecretScope._from_proto(secrets_pb2.SecretInfo.Scope, m.scope),
            environment_id=m.environment_id, environment=m.environment, version=m.version,
            created_at=_time(m, "created_at"), updated_at=_time(m, "updated_at"),
            updated_by=m.updated_by, deleted=m.deleted,
        )


@dataclass(frozen=True)
class MasterKeyRotated:
    """What a master key rotation did: data keys re-wrapped, and the new
    key's fingerprint (a hash, never the key)."""

    data_keys_rewrapped: int
    key_fingerprint: str


@dataclass(frozen=True)
class WatchEvent:
    """One event of :meth:`Berth.watch_environments`. ``change`` names what
    happened (``"environment"`` snapshot, ``"moved"``, ``"created"``,
    ``"deleted"``, ``"binding"``; ``""`` for a marker such as
    ``snapshot_complete``); ``environment``/``entry``/``binding`` carry it."""

    revision: int
    change: str
    environment: Environment | None
    entry: HistoryEntry | None
    binding: Binding | None
    snapshot_complete: bool
    resumed: bool

    @classmethod
    def from_proto(cls, m: registry_pb2.EnvironmentEvent) -> WatchEvent:
        change = m.WhichOneof("change") or ""
        environment: Environment | None = None
        entry: HistoryEntry | None = None
        binding: Binding | None = None
        if change in ("environment", "created", "deleted"):
            environment = Environment.from_proto(getattr(m, change))
        elif change == "moved":
            environment = Environment.from_proto(m.moved.environment)
            entry = HistoryEntry.from_proto(m.moved.entry)
        elif change == "binding":
            binding = Binding.from_proto(m.binding)
        return cls(revision=m.revision, change=change, environment=environment, entry=entry, binding=binding,
                   snapshot_complete=m.snapshot_complete, resumed=m.resumed)


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a list: its items and the token of the next page (empty
    on the last page)."""

    items: tuple[T, ...]
    next_page_token: str


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of idempotent calls that failed UNAVAILABLE (a restarting
    service, a standby answering NOT_LEADER): at most ``max_attempts``
    attempts in all, sleeping ``initial_backoff`` seconds, times
    ``multiplier`` after each attempt, at most ``max_backoff``. Each attempt
    has the call's full deadline. ``RetryPolicy(max_attempts=1)`` disables
    retries."""

    max_attempts: int = 5
    initial_backoff: float = 0.05
    max_backoff: float = 1.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and the multiplier >= 1")

    def backoffs(self) -> Iterator[float]:
        """The sleeps between attempts (``max_attempts - 1`` of them)."""
        delay = self.initial_backoff
        for _ in range(self.max_attempts - 1):
            yield min(delay, self.max_backoff)
            delay *= self.multiplier


# ---------------------------------------------------------------- operations
#
# Each method is one _Op: the service and RPC it calls, how its reply
# becomes a result, and whether it may be retried. Berth and AsyncBerth
# differ only in how they send it.


@dataclass(frozen=True)
class _Op(Generic[T]):
    service: str
    method: str
    convert: Callable[[Any], T]
    idempotent: bool = False


def _created(r: registry_pb2.CreateProjectResponse) -> CreatedProject:
    return CreatedProject(project=Project.from_proto(r.project), api_key=r.api_key)


def _deployed(r: registry_pb2.DeployResponse) -> Deployed:
    return Deployed(deployment=Deployment.from_proto(r.deployment), environment=Environment.from_proto(r.environment),
                    entry=HistoryEntry.from_proto(r.entry))


def _moved(r: registry_pb2.PointerMoveResponse) -> PointerMoved:
    return PointerMoved(environment=Environment.from_proto(r.environment), entry=HistoryEntry.from_proto(r.entry))


def _page(items_field: str, convert: Callable[[Any], T]) -> Callable[[Any], Page[T]]:
    def to_page(r: Any) -> Page[T]:
        return Page(items=tuple(convert(i) for i in getattr(r, items_field)), next_page_token=r.next_page_token)
    return to_page


_CREATE_PROJECT = _Op("registry", "CreateProject", _created)
_RECORD_RUN = _Op("registry", "RecordExperimentRun", ExperimentRun.from_proto)
_LIST_RUNS = _Op("registry", "ListExperimentRuns", _page("runs", ExperimentRun.from_proto), True)
_GET_RUN = _Op("registry", "GetExperimentRun", ExperimentRun.from_proto, idempotent=True)
def _canary(r: registry_pb2.CanaryResponse) -> CanaryChanged:
    return CanaryChanged(environment=Environment.from_proto(r.environment),
                         entry=HistoryEntry.from_proto(r.entry) if r.HasField("entry") and r.entry.sequence else None)


_START_CANARY = _Op("registry", "StartCanary", _canary)
_GET_CANARY = _Op("registry", "GetCanary", _canary, idempotent=True)
_PAUSE_CANARY = _Op("registry", "PauseCanary", _canary)
_RESUME_CANARY = _Op("registry", "ResumeCanary", _canary)
_ABORT_CANARY = _Op("registry", "AbortCanary", _canary)
_PROMOTE_CANARY = _Op("registry", "PromoteCanaryNow", _canary)
_CANARY_ACTIONS = {"pause": (_PAUSE_CANARY, registry_pb2.PauseCanaryRequest),
                   "resume": (_RESUME_CANARY, registry_pb2.ResumeCanaryRequest),
                   "abort": (_ABORT_CANARY, registry_pb2.AbortCanaryRequest)}
_CREATE_KEY = _Op("registry", "CreateApiKey",
                  lambda r: CreatedApiKey(key=ApiKey.from_proto(r.key), api_key=r.api_key))
_LIST_KEYS = _Op("registry", "ListApiKeys", _page("keys", ApiKey.from_proto), True)
_REVOKE_KEY = _Op("registry", "RevokeApiKey", ApiKey.from_proto)
_SET_GATE = _Op("registry", "SetEnvironmentGate", EnvironmentGate.from_proto, idempotent=True)
_CLEAR_GATE = _Op("registry", "ClearEnvironmentGate", lambda r: bool(r.cleared))
_LIST_GATES = _Op("registry", "ListEnvironmentGates",
                  lambda r: tuple(EnvironmentGate.from_proto(g) for g in r.gates), idempotent=True)
_GET_PROJECT = _Op("registry", "GetProject", Project.from_proto, idempotent=True)
_LIST_ENVIRONMENTS = _Op("registry", "ListEnvironments", _page("environments", Environment.from_proto), True)
_CREATE_ENVIRONMENT = _Op("registry", "CreateEnvironment", Environment.from_proto)
_DELETE_ENVIRONMENT = _Op("registry", "DeleteEnvironment", lambda r: Environment.from_proto(r.environment))
_DEPLOY = _Op("registry", "Deploy", _deployed)
_GET_DEPLOYMENT = _Op("registry", "GetDeployment", Deployment.from_proto, idempotent=True)
_LIST_DEPLOYMENTS = _Op("registry", "ListDeployments", _page("deployments", Deployment.from_proto), True)
_PROMOTE = _Op("registry", "Promote", _moved)
_ROLLBACK = _Op("registry", "Rollback", _moved)
_LIST_HISTORY = _Op("registry", "ListHistory", _page("entries", HistoryEntry.from_proto), True)
_LIST_BINDINGS = _Op("registry", "ListBindings", _page("bindings", Binding.from_proto), True)
_SCALE = _Op("registry", "ScaleBinding", Binding.from_proto, idempotent=True)
_TERMINATE = _Op("registry", "TerminateDeployment", Deployment.from_proto)
_START = _Op("registry", "StartDeployment", Deployment.from_proto)
_STATUS = _Op("scheduler", "GetDeploymentStatus", DeploymentStatus.from_proto, idempotent=True)
_ERRORS = _Op("scheduler", "ListDeploymentErrors", _page("errors", DeploymentError.from_proto), True)
_SET_SECRET = _Op("secrets", "SetSecret", SecretInfo.from_proto)
_LIST_SECRETS = _Op("secrets", "ListSecrets", _page("secrets", SecretInfo.from_proto), True)
_SECRET_VERSIONS = _Op("secrets", "ListSecretVersions", _page("versions", SecretInfo.from_proto), True)
_ROLLBACK_SECRET = _Op("secrets", "RollbackSecret", SecretInfo.from_proto)
_ROTATE_MASTER_KEY = _Op("secrets", "RotateMasterKey",
                         lambda r: MasterKeyRotated(data_keys_rewrapped=r.data_keys_rewrapped,
                                                    key_fingerprint=r.key_fingerprint))
_ADJUST = _Op("registry", "AdjustReplicas", Binding.from_proto)
_DELETE_SECRET = _Op("secrets", "DeleteSecret", lambda r: SecretInfo.from_proto(r.secret))


def _retryable(op: _Op[Any], request: Any) -> bool:
    if op.idempotent:
        return True
    # a pointer move under compare-and-swap: a retry after a move that did
    # land fails ABORTED rather than moving twice
    return op.method in ("Promote", "Rollback") and request.HasField("expected_sequence")


def _resolve(api_key: str | None, endpoints: Endpoints | None) -> tuple[str, Endpoints]:
    """The key and addresses as the CLI resolves them: the arguments, else
    ``BERTH_API_KEY`` and ``berth.local.endpoints()`` (``BERTH_*_ADDR``, else
    the running platform's ``platform.json``, else the defaults)."""
    from berth import local

    key = api_key if api_key is not None else os.environ.get("BERTH_API_KEY", "")
    return key, endpoints if endpoints is not None else local.endpoints()


def _move_fields(expected_sequence: int | None, min_replicas: int | None, max_replicas: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if expected_sequence is not None:
        out["expected_sequence"] = expected_sequence
    if min_replicas is not None:
        out["min_replicas"] = min_replicas
    if max_replicas is not None:
        out["max_replicas"] = max_replicas
    return out


class _Requests:
    """Request builders shared by both clients (one place per method)."""

    @staticmethod
    def record_run(project: str, name: str, deployment_id: str, dataset_digest: str,
                   cases: tuple[ExperimentCase, ...] | list[ExperimentCase]) -> registry_pb2.RecordExperimentRunRequest:
        return registry_pb2.RecordExperimentRunRequest(
            project=project, name=name, deployment_id=deployment_id, dataset_digest=dataset_digest,
            cases=[registry_pb2.ExperimentCaseResult(name=c.name, passed=c.passed, status=c.status,
                                                     latency_ms=c.latency_ms, reason=c.reason) for c in cases],
        )

    @staticmethod
    def start_canary(project: str, deployment_id: str, environment: str,
                     steps: tuple[CanaryStep, ...] | list[CanaryStep], thresholds: CanaryThresholds | None,
                     min_replicas: int | None, max_replicas: int | None, expected_sequence: int | None,
                     confirm: bool, reason: str, skip_gate: bool) -> registry_pb2.StartCanaryRequest:
        request = registry_pb2.StartCanaryRequest(
            project=project, deployment_id=deployment_id, environment=environment, confirm=confirm, reason=reason,
            skip_gate=skip_gate, steps=[common_pb2.Canary.Step(weight=x.weight, bake_seconds=x.bake_seconds)
                                        for x in steps],
            **_move_fields(expected_sequence, min_replicas, max_replicas),
        )
        if thresholds is not None:
            request.thresholds.CopyFrom(common_pb2.Canary.Thresholds(
                max_error_rate_increase=thresholds.max_error_rate_increase,
                max_latency_ratio=thresholds.max_latency_ratio, min_requests=thresholds.min_requests))
        return request

    @staticmethod
    def canary_action(action: str, project: str, environment: str, expected_sequence: int | None,
                      reason: str) -> tuple[_Op[CanaryChanged], Any]:
        op, request_type = _CANARY_ACTIONS[action]
        return op, request_type(project=project, environment=environment, reason=reason,
                                **_move_fields(expected_sequence, None, None))

    @staticmethod
    def logs(project: str, deployment_id: str, latest: bool, environment: str, replica: str,
             since: _dt.datetime | None, tail: int | None, follow: bool) -> scheduler_pb2.StreamDeploymentLogsRequest:
        request = scheduler_pb2.StreamDeploymentLogsRequest(
            project=project, deployment_id=deployment_id, latest=latest, environment=environment, replica=replica,
            follow=follow,
        )
        if since is not None:
            request.since.FromDatetime(since)
        if tail is not None:
            request.tail = tail
        return request

    @staticmethod
    def deploy(project: str, image: str, environment: str, config: WorkerConfig | None, image_id: str,
               min_replicas: int | None, max_replicas: int | None, expected_sequence: int | None,
               confirm: bool, reason: str) -> registry_pb2.DeployRequest:
        request = registry_pb2.DeployRequest(
            project=project, image=image, image_id=image_id, environment=environment, confirm=confirm,
            reason=reason, **_move_fields(expected_sequence, min_replicas, max_replicas),
        )
        if config is not None:
            request.config.CopyFrom(config.to_proto())
        return request

    @staticmethod
    def promote(project: str, deployment_id: str, to: str, min_replicas: int | None, max_replicas: int | None,
                scale_previous_to_zero: bool, expected_sequence: int | None, confirm: bool, reason: str,
                skip_gate: bool) -> registry_pb2.PromoteRequest:
        return registry_pb2.PromoteRequest(
            project=project, deployment_id=deployment_id, target_environment=to,
            scale_previous_to_zero=scale_previous_to_zero, confirm=confirm, reason=reason, skip_gate=skip_gate,
            **_move_fields(expected_sequence, min_replicas, max_replicas),
        )

    @staticmethod
    def rollback(project: str, environment: str, to_deployment_id: str, expected_sequence: int | None,
                 confirm: bool, reason: str) -> registry_pb2.RollbackRequest:
        return registry_pb2.RollbackRequest(
            project=project, environment=environment, to_deployment_id=to_deployment_id, confirm=confirm,
            reason=reason, **_move_fields(expected_sequence, None, None),
        )

    @staticmethod
    def scale(project: str, deployment_id: str, environment: str, min_replicas: int | None,
              max_replicas: int | None, idle_pause_seconds: int | None = None,
              idle_stop_seconds: int | None = None) -> registry_pb2.ScaleBindingRequest:
        return registry_pb2.ScaleBindingRequest(
            project=project, deployment_id=deployment_id, environment=environment,
            idle_pause_seconds=idle_pause_seconds, idle_stop_seconds=idle_stop_seconds,
            **_move_fields(None, min_replicas, max_replicas),
        )


def _stubs(channels: dict[str, Any]) -> dict[str, Any]:
    return {
        "registry": registry_pb2_grpc.RegistryStub(channels["registry"]),
        "secrets": secrets_pb2_grpc.SecretsStub(channels["secrets"]),
        "scheduler": scheduler_pb2_grpc.SchedulerStub(channels["scheduler"]),
    }


def _open_channels(endpoints: Endpoints, make: Callable[..., Any]) -> dict[str, Any]:
    return {name: open_channel(name, getattr(endpoints, name), make) for name in ("registry", "secrets", "scheduler")}


# ---------------------------------------------------------------- sync


class Berth:
    """Synchronous client of Berth's public API.

    ``Berth(api_key=..., endpoints=Endpoints(registry=..., ...))``; with no
    arguments the key is ``BERTH_API_KEY`` and the addresses are resolved
    as the CLI resolves them (``BERTH_*_ADDR``, the running platform's
    ``platform.json``). Use it as a context manager, or call :meth:`close`.

    Credentials: a project API key for everything but :meth:`create_project`,
    which takes the platform's admin key. Every method raises
    ``berth.errors.Unauthenticated`` for a missing or unknown key and
    ``berth.errors.Unavailable`` when a service cannot be reached within
    ``timeout`` (after the retries of :class:`RetryPolicy`, for idempotent
    methods)."""

    def __init__(self, api_key: str | None = None, *, endpoints: Endpoints | None = None, timeout: float = 15.0,
                 retry: RetryPolicy = RetryPolicy()) -> None:
        self.api_key, self.endpoints = _resolve(api_key, endpoints)
        self.timeout = timeout
        self.retry = retry
        self._channels = _open_channels(self.endpoints, grpc.insecure_channel)
        self._stubs = _stubs(self._channels)

    def __enter__(self) -> Berth:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channels."""
        for channel in self._channels.values():
            channel.close()

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("x-api-key", self.api_key),) if self.api_key else ()

    def _call(self, op: _Op[T], request: Any, timeout: float | None) -> T:
        method = getattr(self._stubs[op.service], op.method)
        backoffs = self.retry.backoffs() if _retryable(op, request) else iter(())
        while True:
            try:
                reply = method(request, metadata=self._metadata(), timeout=timeout or self.timeout)
            except grpc.RpcError as exc:
                delay = next(backoffs, None) if exc.code() == grpc.StatusCode.UNAVAILABLE else None
                if delay is None:
                    raise error_from_rpc(exc) from None
                time.sleep(delay)
                continue
            return op.convert(reply)

    def _all(self, op: _Op[Page[T]], request: Any, timeout: float | None) -> Iterator[T]:
        for _ in range(1_000_000):  # bounded: a server that never ends its pages
            page = self._call(op, request, timeout)
            yield from page.items
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    # projects

    def create_project(self, name: str, *, timeout: float | None = None) -> CreatedProject:
        """Create a project; the result carries its first API key (shown
        once). Credentials: the platform's admin key. Errors: InvalidArgument
        (``field="name"``), AlreadyExists, PermissionDenied."""
        return self._call(_CREATE_PROJECT, registry_pb2.CreateProjectRequest(name=name), timeout)

    def get_project(self, project: str, *, timeout: float | None = None) -> Project:
        """The project the key belongs to (``project``: its name or id).
        Credentials: the project's key. Errors: NotFound."""
        return self._call(_GET_PROJECT, registry_pb2.GetProjectRequest(project=project), timeout)

    def create_api_key(self, project: str, name: str, *, timeout: float | None = None) -> CreatedApiKey:
        """Create another API key of the project (the key is in the result,
        shown once). Credentials: the project's key. Errors: InvalidArgument
        (``name``), AlreadyExists."""
        return self._call(_CREATE_KEY, registry_pb2.CreateApiKeyRequest(project=project, name=name), timeout)

    def list_api_keys(self, project: str, *, page_size: int = 0,
                      timeout: float | None = None) -> Iterator[ApiKey]:
        """The project's API keys, oldest first (metadata only).
        Credentials: the project's key."""
        return self._all(_LIST_KEYS, registry_pb2.ListApiKeysRequest(project=project, page_size=page_size), timeout)

    def revoke_api_key(self, project: str, key: str, *, timeout: float | None = None) -> ApiKey:
        """Revoke a key (by id or name); calls with it fail Unauthenticated
        from then on. Credentials: the project's key. Errors: NotFound."""
        return self._call(_REVOKE_KEY, registry_pb2.RevokeApiKeyRequest(project=project, key=key), timeout)

    # environments

    def list_environments(self, project: str, *, page_size: int = 0,
                          timeout: float | None = None) -> Iterator[Environment]:
        """Every environment of ``project``, oldest first, following page
        tokens. Credentials: the project's key. Errors: NotFound."""
        return self._all(_LIST_ENVIRONMENTS, registry_pb2.ListEnvironmentsRequest(project=project,
                                                                                  page_size=page_size), timeout)

    def create_environment(self, project: str, name: str, *, timeout: float | None = None) -> Environment:
        """Create environment ``name``. Credentials: the project's key.
        Errors: InvalidArgument (``field="name"``), AlreadyExists."""
        return self._call(_CREATE_ENVIRONMENT, registry_pb2.CreateEnvironmentRequest(project=project, name=name),
                          timeout)

    def delete_environment(self, project: str, environment: str, *, force: bool = False, confirm: bool = False,
                           timeout: float | None = None) -> Environment:
        """Delete an environment (``force`` when it points at a deployment;
        ``confirm`` for a protected one). Credentials: the project's key.
        Errors: NotFound, FailedPrecondition (points somewhere, protected)."""
        return self._call(_DELETE_ENVIRONMENT, registry_pb2.DeleteEnvironmentRequest(
            project=project, environment=environment, force=force, confirm=confirm), timeout)

    # deployments

    def deploy(self, project: str, image: str, *, environment: str = "", config: WorkerConfig | None = None,
               image_id: str = "", min_replicas: int | None = None, max_replicas: int | None = None,
               expected_sequence: int | None = None, confirm: bool = False, reason: str = "",
               timeout: float | None = None) -> Deployed:
        """Register a deployment of the image reference ``image`` and point
        ``environment`` (default ``preview``) at it. ``expected_sequence``
        makes the move a compare-and-swap. Never retried. Credentials: the
        project's key. Errors: InvalidArgument (the field), NotFound (the
        image or environment), Aborted (``reason="SEQUENCE_CONFLICT"``,
        ``metadata["current_sequence"]``), FailedPrecondition (protected
        without ``confirm``)."""
        request = _Requests.deploy(project, image, environment, config, image_id, min_replicas, max_replicas,
                                   expected_sequence, confirm, reason)
        return self._call(_DEPLOY, request, timeout)

    def get_deployment(self, project: str, deployment_id: str, *, timeout: float | None = None) -> Deployment:
        """One deployment. Credentials: the project's key. Errors:
        InvalidArgument (malformed id), NotFound."""
        return self._call(_GET_DEPLOYMENT, registry_pb2.GetDeploymentRequest(project=project,
                                                                             deployment_id=deployment_id), timeout)

    def list_deployments(self, project: str, *, environment: str = "", page_size: int = 0,
                         timeout: float | None = None) -> Iterator[Deployment]:
        """The project's deployments, newest first (only those bound to
        ``environment`` when given), following page tokens. Credentials: the
        project's key. Errors: NotFound (the environment)."""
        return self._all(_LIST_DEPLOYMENTS, registry_pb2.ListDeploymentsRequest(
            project=project, environment=environment, page_size=page_size), timeout)

    def list_bindings(self, project: str, *, deployment_id: str = "", environment: str = "", page_size: int = 0,
                      timeout: float | None = None) -> Iterator[Binding]:
        """Bindings (deployment x environment with replica bounds), filtered
        by deployment and/or environment. Credentials: the project's key."""
        return self._all(_LIST_BINDINGS, registry_pb2.ListBindingsRequest(
            project=project, deployment_id=deployment_id, environment=environment, page_size=page_size), timeout)

    def promote(self, project: str, deployment_id: str, to: str, *, min_replicas: int | None = None,
                max_replicas: int | None = None, scale_previous_to_zero: bool = False,
                expected_sequence: int | None = None, confirm: bool = False, reason: str = "",
                skip_gate: bool = False, timeout: float | None = None) -> PointerMoved:
        """Point environment ``to`` at ``deployment_id``. Retried on
        UNAVAILABLE only with ``expected_sequence``. Credentials: the
        project's key. Errors: NotFound, Aborted (``SEQUENCE_CONFLICT`` with
        ``metadata["current_sequence"]``), FailedPrecondition (protected
        without ``confirm``, a gate, a terminated deployment)."""
        request = _Requests.promote(project, deployment_id, to, min_replicas, max_replicas, scale_previous_to_zero,
                                    expected_sequence, confirm, reason, skip_gate)
        return self._call(_PROMOTE, request, timeout)

    def rollback(self, project: str, environment: str, *, to_deployment_id: str = "",
                 expected_sequence: int | None = None, confirm: bool = False, reason: str = "",
                 timeout: float | None = None) -> PointerMoved:
        """Point ``environment`` back at its previous deployment (or
        ``to_deployment_id`` from its history). Retried only with
        ``expected_sequence``. Credentials: the project's key. Errors:
        NotFound, Aborted (``current_sequence``), FailedPrecondition."""
        request = _Requests.rollback(project, environment, to_deployment_id, expected_sequence, confirm, reason)
        return self._call(_ROLLBACK, request, timeout)

    def history_page(self, project: str, environment: str, *, page_size: int = 0, page_token: str = "",
                     timeout: float | None = None) -> Page[HistoryEntry]:
        """One page of an environment's history, oldest first. Credentials:
        the project's key. Errors: NotFound, InvalidArgument
        (``page_token``)."""
        return self._call(_LIST_HISTORY, registry_pb2.ListHistoryRequest(
            project=project, environment=environment, page_size=page_size, page_token=page_token), timeout)

    def history(self, project: str, environment: str, *, page_size: int = 0,
                timeout: float | None = None) -> Iterator[HistoryEntry]:
        """Every history entry of an environment, oldest first, fetching
        pages of ``page_size`` as it goes. Credentials/errors: as
        :meth:`history_page`."""
        return self._all(_LIST_HISTORY, registry_pb2.ListHistoryRequest(
            project=project, environment=environment, page_size=page_size), timeout)

    def scale(self, project: str, deployment_id: str, environment: str, *, min_replicas: int | None = None,
              max_replicas: int | None = None, idle_pause_seconds: int | None = None,
              idle_stop_seconds: int | None = None, timeout: float | None = None) -> Binding:
        """Set a binding's replica bounds and idle windows (each unset one is
        kept; an idle window of 0 is the scheduler's default). ``environment``
        may be "" when the deployment serves one environment. Credentials:
        the project's key. Errors: InvalidArgument (``min_replicas``,
        ``max_replicas``, the idle windows; also an environment needed),
        NotFound."""
        request = _Requests.scale(project, deployment_id, environment, min_replicas, max_replicas,
                                  idle_pause_seconds, idle_stop_seconds)
        return self._call(_SCALE, request, timeout)

    def terminate(self, project: str, deployment_id: str, *, timeout: float | None = None) -> Deployment:
        """Stop every replica of a deployment. Credentials: the project's
        key. Errors: NotFound, FailedPrecondition."""
        return self._call(_TERMINATE, registry_pb2.TerminateDeploymentRequest(
            project=project, deployment_id=deployment_id), timeout)

    def start(self, project: str, deployment_id: str, *, timeout: float | None = None) -> Deployment:
        """Start a terminated deployment again. Credentials: the project's
        key. Errors: NotFound."""
        return self._call(_START, registry_pb2.StartDeploymentRequest(
            project=project, deployment_id=deployment_id), timeout)

    def set_gate(self, project: str, environment: str, experiment: str, threshold: float, *,
                 dataset_digest: str = "", timeout: float | None = None) -> EnvironmentGate:
        """Gate moves into ``environment`` on a passing run of
        ``experiment`` (pass rate >= ``threshold``, 0..1). Credentials: the
        project's key. Errors: InvalidArgument (``threshold``,
        ``experiment``), NotFound."""
        return self._call(_SET_GATE, registry_pb2.SetEnvironmentGateRequest(
            project=project, environment=environment, experiment=experiment, threshold=threshold,
            dataset_digest=dataset_digest), timeout)

    def clear_gate(self, project: str, environment: str, *, timeout: float | None = None) -> bool:
        """Remove an environment's gate; False when it had none.
        Credentials: the project's key. Errors: NotFound."""
        return self._call(_CLEAR_GATE, registry_pb2.ClearEnvironmentGateRequest(
            project=project, environment=environment), timeout)

    def list_gates(self, project: str, *, timeout: float | None = None) -> tuple[EnvironmentGate, ...]:
        """Every gate of the project. Credentials: the project's key."""
        return self._call(_LIST_GATES, registry_pb2.ListEnvironmentGatesRequest(project=project), timeout)

    def start_canary(self, project: str, deployment_id: str, environment: str,
                     steps: tuple[CanaryStep, ...] | list[CanaryStep], *,
                     thresholds: CanaryThresholds | None = None, min_replicas: int | None = None,
                     max_replicas: int | None = None, expected_sequence: int | None = None, confirm: bool = False,
                     reason: str = "", skip_gate: bool = False, timeout: float | None = None) -> CanaryChanged:
        """Start shifting ``environment``'s traffic to ``deployment_id``
        step by step (the platform's controller advances or aborts it).
        Never retried. Credentials: the project's key. Errors:
        InvalidArgument (``steps``, ``thresholds``), NotFound,
        FailedPrecondition (a canary already running, protected without
        ``confirm``, a gate), Aborted (``current_sequence``)."""
        request = _Requests.start_canary(project, deployment_id, environment, steps, thresholds, min_replicas,
                                         max_replicas, expected_sequence, confirm, reason, skip_gate)
        return self._call(_START_CANARY, request, timeout)

    def get_canary(self, project: str, environment: str, *, timeout: float | None = None) -> CanaryChanged:
        """The environment with its canary. Credentials: the project's key.
        Errors: NotFound."""
        return self._call(_GET_CANARY, registry_pb2.GetCanaryRequest(project=project, environment=environment),
                          timeout)

    def pause_canary(self, project: str, environment: str, *, expected_sequence: int | None = None,
                     reason: str = "", timeout: float | None = None) -> CanaryChanged:
        """Hold a running canary at its weight. Credentials: the project's
        key. Errors: NotFound, FailedPrecondition (no canary, ended),
        Aborted."""
        op, request = _Requests.canary_action("pause", project, environment, expected_sequence, reason)
        return self._call(op, request, timeout)

    def resume_canary(self, project: str, environment: str, *, expected_sequence: int | None = None,
                      reason: str = "", timeout: float | None = None) -> CanaryChanged:
        """Resume a paused canary. Credentials/errors: as :meth:`pause_canary`."""
        op, request = _Requests.canary_action("resume", project, environment, expected_sequence, reason)
        return self._call(op, request, timeout)

    def abort_canary(self, project: str, environment: str, *, expected_sequence: int | None = None,
                     reason: str = "", timeout: float | None = None) -> CanaryChanged:
        """Send every request back to the stable deployment. Credentials/
        errors: as :meth:`pause_canary`."""
        op, request = _Requests.canary_action("abort", project, environment, expected_sequence, reason)
        return self._call(op, request, timeout)

    def promote_canary_now(self, project: str, environment: str, *, expected_sequence: int | None = None,
                           reason: str = "", confirm: bool = False, timeout: float | None = None) -> CanaryChanged:
        """Skip the remaining steps: the candidate takes all traffic (a
        promote move). Credentials: the project's key. Errors: NotFound,
        FailedPrecondition (no canary, ended, protected without
        ``confirm``), Aborted."""
        request = registry_pb2.PromoteCanaryNowRequest(project=project, environment=environment, reason=reason,
                                                       confirm=confirm, **_move_fields(expected_sequence, None, None))
        return self._call(_PROMOTE_CANARY, request, timeout)

    # scheduler

    def status(self, project: str, *, deployment_id: str = "", environment: str = "", latest: bool = False,
               timeout: float | None = None) -> DeploymentStatus:
        """How a deployment runs, per environment it is bound to:
        ``deployment_id``, or ``latest=True`` for the project's newest bound
        deployment (exactly one of the two); ``environment`` keeps only that
        binding. Credentials: the project's key. Errors: InvalidArgument
        (``deployment_id``), NotFound (also: not bound to ``environment``)."""
        return self._call(_STATUS, scheduler_pb2.GetDeploymentStatusRequest(
            project=project, deployment_id=deployment_id, environment=environment, latest=latest), timeout)

    def errors(self, project: str, *, deployment_id: str = "", latest: bool = False, page_size: int = 0,
               timeout: float | None = None) -> Iterator[DeploymentError]:
        """Recorded errors of a deployment (``deployment_id`` or
        ``latest=True``), most recently seen first. Credentials: the
        project's key. Errors: InvalidArgument, NotFound."""
        return self._all(_ERRORS, scheduler_pb2.ListDeploymentErrorsRequest(
            project=project, deployment_id=deployment_id, latest=latest, page_size=page_size), timeout)

    # secrets

    def set_secret(self, project: str, name: str, value: str, *, type: str = "generic", environment: str = "",
                   timeout: float | None = None) -> SecretInfo:
        """Set a secret (project-wide, or for ``environment``); a new
        version when it exists. Credentials: the project's key. Errors:
        InvalidArgument (``name``, ``type``, ``value``), NotFound."""
        return self._call(_SET_SECRET, secrets_pb2.SetSecretRequest(
            project=project, name=name, type=type, value=value, environment=environment), timeout)

    def list_secrets(self, project: str, *, environment: str = "", page_size: int = 0,
                     timeout: float | None = None) -> Iterator[SecretInfo]:
        """Secrets' metadata by name (never values). Credentials: the
        project's key. Errors: NotFound (the environment)."""
        return self._all(_LIST_SECRETS, secrets_pb2.ListSecretsRequest(
            project=project, environment=environment, page_size=page_size), timeout)

    def delete_secret(self, project: str, name: str, *, environment: str = "",
                      timeout: float | None = None) -> SecretInfo:
        """Delete a secret. Credentials: the project's key. Errors:
        NotFound."""
        return self._call(_DELETE_SECRET, secrets_pb2.DeleteSecretRequest(
            project=project, name=name, environment=environment), timeout)

    def record_experiment_run(self, project: str, name: str, deployment_id: str, dataset_digest: str,
                              cases: tuple[ExperimentCase, ...] | list[ExperimentCase], *,
                              timeout: float | None = None) -> ExperimentRun:
        """Record a run of experiment ``name`` against a deployment (its
        cases' results; the server computes the totals). Not retried.
        Credentials: the project's key. Errors: InvalidArgument (the field),
        NotFound."""
        return self._call(_RECORD_RUN, _Requests.record_run(project, name, deployment_id, dataset_digest, cases),
                          timeout)

    def list_experiment_runs(self, project: str, *, deployment_id: str = "", name: str = "", page_size: int = 0,
                             timeout: float | None = None) -> Iterator[ExperimentRun]:
        """Experiment runs, newest first, without their cases. Credentials:
        the project's key. Errors: InvalidArgument, NotFound."""
        return self._all(_LIST_RUNS, registry_pb2.ListExperimentRunsRequest(
            project=project, deployment_id=deployment_id, name=name, page_size=page_size), timeout)

    def get_experiment_run(self, project: str, run_id: str, *, timeout: float | None = None) -> ExperimentRun:
        """One run with its cases. Credentials: the project's key. Errors:
        InvalidArgument (malformed id), NotFound."""
        return self._call(_GET_RUN, registry_pb2.GetExperimentRunRequest(project=project, run_id=run_id), timeout)

    def logs(self, project: str, *, deployment_id: str = "", latest: bool = False, environment: str = "",
             replica: str = "", since: _dt.datetime | None = None, tail: int | None = None, follow: bool = False,
             timeout: float | None = None) -> Iterator[LogLine]:
        """Lines the deployment's replicas printed (``deployment_id`` or
        ``latest=True``), filtered by environment/replica/time, the last
        ``tail``; ``follow`` keeps the stream open for new lines (bound it
        with ``timeout``, or stop iterating). Credentials: the project's
        key. Errors: InvalidArgument, NotFound, Unavailable (a standby
        scheduler: logs are served by the leader)."""
        request = _Requests.logs(project, deployment_id, latest, environment, replica, since, tail, follow)
        call = self._stubs["scheduler"].StreamDeploymentLogs(
            request, metadata=self._metadata(), timeout=timeout if follow else (timeout or self.timeout))
        try:
            for line in call:
                yield LogLine.from_proto(line)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                raise error_from_rpc(exc) from None
        finally:
            call.cancel()

    def secret_versions(self, project: str, name: str, *, environment: str = "", page_size: int = 0,
                        timeout: float | None = None) -> Iterator[SecretInfo]:
        """Every version of a secret, oldest first (metadata only).
        Credentials: the project's key. Errors: NotFound."""
        return self._all(_SECRET_VERSIONS, secrets_pb2.ListSecretVersionsRequest(
            project=project, name=name, environment=environment, page_size=page_size), timeout)

    def rollback_secret(self, project: str, name: str, to_version: int, *, environment: str = "",
                        timeout: float | None = None) -> SecretInfo:
        """Make an earlier version's value current again (as a new
        version). Not retried. Credentials: the project's key. Errors:
        InvalidArgument (``to_version``), NotFound."""
        return self._call(_ROLLBACK_SECRET, secrets_pb2.RollbackSecretRequest(
            project=project, name=name, environment=environment, to_version=to_version), timeout)

    def rotate_master_key(self, *, timeout: float | None = None) -> MasterKeyRotated:
        """Re-wrap every project's data key under a new master key.
        Credentials: the admin key. Errors: PermissionDenied (a project
        key), FailedPrecondition (the master key comes from
        BERTH_MASTER_KEY)."""
        return self._call(_ROTATE_MASTER_KEY, secrets_pb2.RotateMasterKeyRequest(), timeout)

    def adjust_replicas(self, project: str, deployment_id: str, environment: str, delta: int, *,
                        timeout: float | None = None) -> Binding:
        """Move a binding's replica bounds by ``delta`` (+N up, -N down).
        Not retried (it is relative). Credentials: the project's key.
        Errors: InvalidArgument (``delta``), NotFound."""
        return self._call(_ADJUST, registry_pb2.AdjustReplicasRequest(
            project=project, deployment_id=deployment_id, environment=environment, delta=delta), timeout)

    # watch

    def watch_environments(self, project: str, *, since_revision: int = 0,
                           timeout: float | None = None) -> Iterator[WatchEvent]:
        """The project's environments as a stream of :class:`WatchEvent`:
        a snapshot, then pointer moves, creations, deletions and binding
        changes; resume with ``since_revision`` (the last event's revision).
        ``timeout`` bounds the whole stream (None: open until the caller
        stops iterating, which cancels it). Credentials: the project's key.
        Errors: NotFound, InvalidArgument (``since_revision``)."""
        call = self._stubs["registry"].WatchEnvironments(
            registry_pb2.WatchEnvironmentsRequest(project=project, since_revision=since_revision),
            metadata=self._metadata(), timeout=timeout)
        try:
            for event in call:
                yield WatchEvent.from_proto(event)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                raise error_from_rpc(exc) from None
        finally:
            call.cancel()


# ---------------------------------------------------------------- asyncio


class AsyncBerth:
    """The asyncio client (``grpc.aio``): the same methods, arguments,
    results, credentials and errors as :class:`Berth`, as coroutines; the
    list methods and :meth:`watch_environments` are async iterators. Create
    it inside a running event loop; ``async with AsyncBerth(...) as b``."""

    def __init__(self, api_key: str | None = None, *, endpoints: Endpoints | None = None, timeout: float = 15.0,
                 retry: RetryPolicy = RetryPolicy()) -> None:
        self.api_key, self.endpoints = _resolve(api_key, endpoints)
        self.timeout = timeout
        self.retry = retry
        self._channels = _open_channels(self.endpoints, grpc.aio.insecure_channel)
        self._stubs = _stubs(self._channels)

    async def __aenter__(self) -> AsyncBerth:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channels."""
        for channel in self._channels.values():
            await channel.close()

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("x-api-key", self.api_key),) if self.api_key else ()

    async def _call(self, op: _Op[T], request: Any, timeout: float | None) -> T:
        method = getattr(self._stubs[op.service], op.method)
        backoffs = self.retry.backoffs() if _retryable(op, request) else iter(())
        while True:
            try:
                reply = await method(request, metadata=self._metadata(), timeout=timeout or self.timeout)
            except grpc.aio.AioRpcError as exc:
                delay = next(backoffs, None) if exc.code() == grpc.StatusCode.UNAVAILABLE else None
                if delay is None:
                    raise error_from_rpc(exc) from None
                await asyncio.sleep(delay)
                continue
            return op.convert(reply)

    async def _all(self, op: _Op[Page[T]], request: Any, timeout: float | None) -> AsyncIterator[T]:
        for _ in range(1_000_000):
            page = await self._call(op, request, timeout)
            for item in page.items:
                yield item
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    async def create_project(self, name: str, *, timeout: float | None = None) -> CreatedProject:
        """Create a project (see :meth:`Berth.create_project`). Credentials:
        the admin key. Errors: InvalidArgument, AlreadyExists."""
        return await self._call(_CREATE_PROJECT, registry_pb2.CreateProjectRequest(name=name), timeout)

    async def get_project(self, project: str, *, timeout: float | None = None) -> Project:
        """The project (see :meth:`Berth.get_project`). Errors: NotFound."""
        return await self._call(_GET_PROJECT, registry_pb2.GetProjectRequest(project=project), timeout)

    async def create_api_key(self, project: str, name: str, *, timeout: float | None = None) -> CreatedApiKey:
        """Create an API key (see :meth:`Berth.create_api_key`)."""
        return await self._call(_CREATE_KEY, registry_pb2.CreateApiKeyRequest(project=project, name=name), timeout)

    def list_api_keys(self, project: str, *, page_size: int = 0,
                      timeout: float | None = None) -> AsyncIterator[ApiKey]:
        """The project's API keys (see :meth:`Berth.list_api_keys`)."""
        return self._all(_LIST_KEYS, registry_pb2.ListApiKeysRequest(project=project, page_size=page_size), timeout)

    async def revoke_api_key(self, project: str, key: str, *, timeout: float | None = None) -> ApiKey:
        """Revoke a key (see :meth:`Berth.revoke_api_key`)."""
        return await self._call(_REVOKE_KEY, registry_pb2.RevokeApiKeyRequest(project=project, key=key), timeout)

    async def set_gate(self, project: str, environment: str, experiment: str, threshold: float, *,
                       dataset_digest: str = "", timeout: float | None = None) -> EnvironmentGate:
        """Gate an environment (see :meth:`Berth.set_gate`)."""
        return await self._call(_SET_GATE, registry_pb2.SetEnvironmentGateRequest(
            project=project, environment=environment, experiment=experiment, threshold=threshold,
            dataset_digest=dataset_digest), timeout)

    async def clear_gate(self, project: str, environment: str, *, timeout: float | None = None) -> bool:
        """Remove a gate (see :meth:`Berth.clear_gate`)."""
        return await self._call(_CLEAR_GATE, registry_pb2.ClearEnvironmentGateRequest(
            project=project, environment=environment), timeout)

    async def list_gates(self, project: str, *, timeout: float | None = None) -> tuple[EnvironmentGate, ...]:
        """Every gate (see :meth:`Berth.list_gates`)."""
        return await self._call(_LIST_GATES, registry_pb2.ListEnvironmentGatesRequest(project=project), timeout)

    def list_environments(self, project: str, *, page_size: int = 0,
                          timeout: float | None = None) -> AsyncIterator[Environment]:
        """Every environment, oldest first (see :meth:`Berth.list_environments`)."""
        return self._all(_LIST_ENVIRONMENTS, registry_pb2.ListEnvironmentsRequest(project=project,
                                                                                  page_size=page_size), timeout)

    async def create_environment(self, project: str, name: str, *, timeout: float | None = None) -> Environment:
        """Create an environment (see :meth:`Berth.create_environment`)."""
        return await self._call(_CREATE_ENVIRONMENT, registry_pb2.CreateEnvironmentRequest(
            project=project, name=name), timeout)

    async def delete_environment(self, project: str, environment: str, *, force: bool = False,
                                 confirm: bool = False, timeout: float | None = None) -> Environment:
        """Delete an environment (see :meth:`Berth.delete_environment`)."""
        return await self._call(_DELETE_ENVIRONMENT, registry_pb2.DeleteEnvironmentRequest(
            project=project, environment=environment, force=force, confirm=confirm), timeout)

    async def deploy(self, project: str, image: str, *, environment: str = "", config: WorkerConfig | None = None,
                     image_id: str = "", min_replicas: int | None = None, max_replicas: int | None = None,
                     expected_sequence: int | None = None, confirm: bool = False, reason: str = "",
                     timeout: float | None = None) -> Deployed:
        """Register a deployment by image and move an environment to it (see
        :meth:`Berth.deploy`). Never retried. Errors: InvalidArgument,
        NotFound, Aborted, FailedPrecondition."""
        request = _Requests.deploy(project, image, environment, config, image_id, min_replicas, max_replicas,
                                   expected_sequence, confirm, reason)
        return await self._call(_DEPLOY, request, timeout)

    async def get_deployment(self, project: str, deployment_id: str, *,
                             timeout: float | None = None) -> Deployment:
        """One deployment (see :meth:`Berth.get_deployment`). Errors:
        InvalidArgument, NotFound."""
        return await self._call(_GET_DEPLOYMENT, registry_pb2.GetDeploymentRequest(
            project=project, deployment_id=deployment_id), timeout)

    def list_deployments(self, project: str, *, environment: str = "", page_size: int = 0,
                         timeout: float | None = None) -> AsyncIterator[Deployment]:
        """The project's deployments, newest first (see :meth:`Berth.list_deployments`)."""
        return self._all(_LIST_DEPLOYMENTS, registry_pb2.ListDeploymentsRequest(
            project=project, environment=environment, page_size=page_size), timeout)

    def list_bindings(self, project: str, *, deployment_id: str = "", environment: str = "", page_size: int = 0,
                      timeout: float | None = None) -> AsyncIterator[Binding]:
        """Bindings (see :meth:`Berth.list_bindings`)."""
        return self._all(_LIST_BINDINGS, registry_pb2.ListBindingsRequest(
            project=project, deployment_id=deployment_id, environment=environment, page_size=page_size), timeout)

    async def promote(self, project: str, deployment_id: str, to: str, *, min_replicas: int | None = None,
                      max_replicas: int | None = None, scale_previous_to_zero: bool = False,
                      expected_sequence: int | None = None, confirm: bool = False, reason: str = "",
                      skip_gate: bool = False, timeout: float | None = None) -> PointerMoved:
        """Point an environment at a deployment (see :meth:`Berth.promote`).
        Errors: NotFound, Aborted (``current_sequence``), FailedPrecondition."""
        request = _Requests.promote(project, deployment_id, to, min_replicas, max_replicas, scale_previous_to_zero,
                                    expected_sequence, confirm, reason, skip_gate)
        return await self._call(_PROMOTE, request, timeout)

    async def rollback(self, project: str, environment: str, *, to_deployment_id: str = "",
                       expected_sequence: int | None = None, confirm: bool = False, reason: str = "",
                       timeout: float | None = None) -> PointerMoved:
        """Point an environment back (see :meth:`Berth.rollback`). Errors:
        NotFound, Aborted, FailedPrecondition."""
        request = _Requests.rollback(project, environment, to_deployment_id, expected_sequence, confirm, reason)
        return await self._call(_ROLLBACK, request, timeout)

    async def history_page(self, project: str, environment: str, *, page_size: int = 0, page_token: str = "",
                           timeout: float | None = None) -> Page[HistoryEntry]:
        """One page of history (see :meth:`Berth.history_page`)."""
        return await self._call(_LIST_HISTORY, registry_pb2.ListHistoryRequest(
            project=project, environment=environment, page_size=page_size, page_token=page_token), timeout)

    def history(self, project: str, environment: str, *, page_size: int = 0,
                timeout: float | None = None) -> AsyncIterator[HistoryEntry]:
        """Every history entry, oldest first (see :meth:`Berth.history`)."""
        return self._all(_LIST_HISTORY, registry_pb2.ListHistoryRequest(
            project=project, environment=environment, page_size=page_size), timeout)

    async def scale(self, project: str, deployment_id: str, environment: str, *, min_replicas: int | None = None,
                    max_replicas: int | None = None, idle_pause_seconds: int | None = None,
                    idle_stop_seconds: int | None = None, timeout: float | None = None) -> Binding:
        """Set a binding's replica bounds and idle windows (see :meth:`Berth.scale`)."""
        request = _Requests.scale(project, deployment_id, environment, min_replicas, max_replicas,
                                  idle_pause_seconds, idle_stop_seconds)
        return await self._call(_SCALE, request, timeout)

    async def terminate(self, project: str, deployment_id: str, *, timeout: float | None = None) -> Deployment:
        """Stop a deployment's replicas (see :meth:`Berth.terminate`)."""
        return await self._call(_TERMINATE, registry_pb2.TerminateDeploymentRequest(
            project=project, deployment_id=deployment_id), timeout)

    async def start(self, project: str, deployment_id: str, *, timeout: float | None = None) -> Deployment:
        """Start a terminated deployment (see :meth:`Berth.start`)."""
        return await self._call(_START, registry_pb2.StartDeploymentRequest(
            project=project, deployment_id=deployment_id), timeout)

    async def start_canary(self, project: str, deployment_id: str, environment: str,
                           steps: tuple[CanaryStep, ...] | list[CanaryStep], *,
                           thresholds: CanaryThresholds | None = None, min_replicas: int | None = None,
                           max_replicas: int | None = None, expected_sequence: int | None = None,
                           confirm: bool = False, reason: str = "", skip_gate: bool = False,
                           timeout: float | None = None) -> CanaryChanged:
        """Start a canary (see :meth:`Berth.start_canary`)."""
        request = _Requests.start_canary(project, deployment_id, environment, steps, thresholds, min_replicas,
                                         max_replicas, expected_sequence, confirm, reason, skip_gate)
        return await self._call(_START_CANARY, request, timeout)

    async def get_canary(self, project: str, environment: str, *, timeout: float | None = None) -> CanaryChanged:
        """The environment with its canary (see :meth:`Berth.get_canary`)."""
        return await self._call(_GET_CANARY, registry_pb2.GetCanaryRequest(project=project, environment=environment),
                                timeout)

    async def pause_canary(self, project: str, environment: str, *, expected_sequence: int | None = None,
                           reason: str = "", timeout: float | None = None) -> CanaryChanged:
        """Pause a canary (see :meth:`Berth.pause_canary`)."""
        op, request = _Requests.canary_action("pause", project, environment, expected_sequence, reason)
        return await self._call(op, request, timeout)

    async def resume_canary(self, project: str, environment: str, *, expected_sequence: int | None = None,
                            reason: str = "", timeout: float | None = None) -> CanaryChanged:
        """Resume a canary (see :meth:`Berth.resume_canary`)."""
        op, request = _Requests.canary_action("resume", project, environment, expected_sequence, reason)
        return await self._call(op, request, timeout)

    async def abort_canary(self, project: str, environment: str, *, expected_sequence: int | None = None,
                           reason: str = "", timeout: float | None = None) -> CanaryChanged:
        """Abort a canary (see :meth:`Berth.abort_canary`)."""
        op, request = _Requests.canary_action("abort", project, environment, expected_sequence, reason)
        return await self._call(op, request, timeout)

    async def promote_canary_now(self, project: str, environment: str, *, expected_sequence: int | None = None,
                                 reason: str = "", confirm: bool = False,
                                 timeout: float | None = None) -> CanaryChanged:
        """Promote a canary now (see :meth:`Berth.promote_canary_now`)."""
        request = registry_pb2.PromoteCanaryNowRequest(project=project, environment=environment, reason=reason,
                                                       confirm=confirm, **_move_fields(expected_sequence, None, None))
        return await self._call(_PROMOTE_CANARY, request, timeout)

    async def status(self, project: str, *, deployment_id: str = "", environment: str = "", latest: bool = False,
                     timeout: float | None = None) -> DeploymentStatus:
        """How a deployment runs (see :meth:`Berth.status`)."""
        return await self._call(_STATUS, scheduler_pb2.GetDeploymentStatusRequest(
            project=project, deployment_id=deployment_id, environment=environment, latest=latest), timeout)

    def errors(self, project: str, *, deployment_id: str = "", latest: bool = False, page_size: int = 0,
               timeout: float | None = None) -> AsyncIterator[DeploymentError]:
        """Recorded errors of a deployment (see :meth:`Berth.errors`)."""
        return self._all(_ERRORS, scheduler_pb2.ListDeploymentErrorsRequest(
            project=project, deployment_id=deployment_id, latest=latest, page_size=page_size), timeout)

    async def set_secret(self, project: str, name: str, value: str, *, type: str = "generic", environment: str = "",
                         timeout: float | None = None) -> SecretInfo:
        """Set a secret (see :meth:`Berth.set_secret`)."""
        return await self._call(_SET_SECRET, secrets_pb2.SetSecretRequest(
            project=project, name=name, type=type, value=value, environment=environment), timeout)

    def list_secrets(self, project: str, *, environment: str = "", page_size: int = 0,
                     timeout: float | None = None) -> AsyncIterator[SecretInfo]:
        """Secrets' metadata by name (see :meth:`Berth.list_secrets`)."""
        return self._all(_LIST_SECRETS, secrets_pb2.ListSecretsRequest(
            project=project, environment=environment, page_size=page_size), timeout)

    async def delete_secret(self, project: str, name: str, *, environment: str = "",
                            timeout: float | None = None) -> SecretInfo:
        """Delete a secret (see :meth:`Berth.delete_secret`)."""
        return await self._call(_DELETE_SECRET, secrets_pb2.DeleteSecretRequest(
            project=project, name=name, environment=environment), timeout)

    async def record_experiment_run(self, project: str, name: str, deployment_id: str, dataset_digest: str,
                                    cases: tuple[ExperimentCase, ...] | list[ExperimentCase], *,
                                    timeout: float | None = None) -> ExperimentRun:
        """Record an experiment run (see :meth:`Berth.record_experiment_run`)."""
        return await self._call(_RECORD_RUN, _Requests.record_run(project, name, deployment_id, dataset_digest,
                                                                  cases), timeout)

    def list_experiment_runs(self, project: str, *, deployment_id: str = "", name: str = "", page_size: int = 0,
                             timeout: float | None = None) -> AsyncIterator[ExperimentRun]:
        """Experiment runs, newest first (see :meth:`Berth.list_experiment_runs`)."""
        return self._all(_LIST_RUNS, registry_pb2.ListExperimentRunsRequest(
            project=project, deployment_id=deployment_id, name=name, page_size=page_size), timeout)

    async def get_experiment_run(self, project: str, run_id: str, *, timeout: float | None = None) -> ExperimentRun:
        """One run with its cases (see :meth:`Berth.get_experiment_run`)."""
        return await self._call(_GET_RUN, registry_pb2.GetExperimentRunRequest(project=project, run_id=run_id),
                                timeout)

    async def logs(self, project: str, *, deployment_id: str = "", latest: bool = False, environment: str = "",
                   replica: str = "", since: _dt.datetime | None = None, tail: int | None = None,
                   follow: bool = False, timeout: float | None = None) -> AsyncIterator[LogLine]:
        """Replica log lines (see :meth:`Berth.logs`); leaving the
        ``async for`` cancels the stream."""
        request = _Requests.logs(project, deployment_id, latest, environment, replica, since, tail, follow)
        call = self._stubs["scheduler"].StreamDeploymentLogs(
            request, metadata=self._metadata(), timeout=timeout if follow else (timeout or self.timeout))
        try:
            async for line in call:
                yield LogLine.from_proto(line)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                raise error_from_rpc(exc) from None
        finally:
            call.cancel()

    def secret_versions(self, project: str, name: str, *, environment: str = "", page_size: int = 0,
                        timeout: float | None = None) -> AsyncIterator[SecretInfo]:
        """Every version of a secret (see :meth:`Berth.secret_versions`)."""
        return self._all(_SECRET_VERSIONS, secrets_pb2.ListSecretVersionsRequest(
            project=project, name=name, environment=environment, page_size=page_size), timeout)

    async def rollback_secret(self, project: str, name: str, to_version: int, *, environment: str = "",
                              timeout: float | None = None) -> SecretInfo:
        """Restore a secret's earlier version (see :meth:`Berth.rollback_secret`)."""
        return await self._call(_ROLLBACK_SECRET, secrets_pb2.RollbackSecretRequest(
            project=project, name=name, environment=environment, to_version=to_version), timeout)

    async def rotate_master_key(self, *, timeout: float | None = None) -> MasterKeyRotated:
        """Rotate the master key (see :meth:`Berth.rotate_master_key`)."""
        return await self._call(_ROTATE_MASTER_KEY, secrets_pb2.RotateMasterKeyRequest(), timeout)

    async def adjust_replicas(self, project: str, deployment_id: str, environment: str, delta: int, *,
                              timeout: float | None = None) -> Binding:
        """Move replica bounds by ``delta`` (see :meth:`Berth.adjust_replicas`)."""
        return await self._call(_ADJUST, registry_pb2.AdjustReplicasRequest(
            project=project, deployment_id=deployment_id, environment=environment, delta=delta), timeout)

    async def watch_environments(self, project: str, *, since_revision: int = 0,
                                 timeout: float | None = None) -> AsyncIterator[WatchEvent]:
        """The project's environment events (see
        :meth:`Berth.watch_environments`); leaving the ``async for``
        cancels the stream."""
        call = self._stubs["registry"].WatchEnvironments(
            registry_pb2.WatchEnvironmentsRequest(project=project, since_revision=since_revision),
            metadata=self._metadata(), timeout=timeout)
        try:
            async for event in call:
                yield WatchEvent.from_proto(event)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                raise error_from_rpc(exc) from None
        finally:
            call.cancel()
