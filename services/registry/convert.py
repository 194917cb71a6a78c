"""Storage rows -> protobuf messages (one direction only: the registry never
reads its rows back from protos). States and kinds are stored as the
contract's words (``"promote"``) and sent as the protos' enums
(``HistoryEntry.KIND_PROMOTE``), through berth.enums."""
from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from berth import enums
from berth.v1 import common_pb2, registry_pb2
from services.registry import canary as canary_domain
from services.registry import domain
from services.registry.storage import (
    ApiKeyRow,
    BindingRow,
    DeploymentRow,
    EnvironmentGateRow,
    EnvironmentRow,
    ExperimentRunRow,
    HistoryRow,
    ProjectRow,
)


def timestamp(value: datetime | None) -> Timestamp:
    ts = Timestamp()
    if value is not None:
        if value.tzinfo is None:  # SQLite drops the zone; we only ever store UTC
            value = value.replace(tzinfo=UTC)
        ts.FromDatetime(value)
    return ts


def project(row: ProjectRow) -> common_pb2.Project:
    return common_pb2.Project(id=row.id, name=row.name, created_at=timestamp(row.created_at))


def worker_config(config: domain.WorkerConfig) -> common_pb2.WorkerConfig:
    return common_pb2.WorkerConfig(
        port=config.port,
        command=list(config.command),
        health_path=config.health_path,
        variables=config.variables,
        resources=common_pb2.Resources(memory_bytes=config.resources.memory_bytes, cpus=config.resources.cpus),
    )


def config_from_proto(msg: common_pb2.WorkerConfig) -> domain.WorkerConfig:
    return domain.WorkerConfig(
        port=msg.port,
        command=tuple(msg.command),
        health_path=msg.health_path,
        variables=dict(msg.variables),
        resources=domain.Resources(memory_bytes=msg.resources.memory_bytes, cpus=msg.resources.cpus),
    )


def deployment(row: DeploymentRow) -> common_pb2.Deployment:
    return common_pb2.Deployment(
        id=row.id,
        project_id=row.project_id,
        image=row.image,
        image_id=row.image_id,
        config=worker_config(domain.WorkerConfig.from_json(row.config)),
        state=enums.number(common_pb2.Deployment.State, row.state),
        created_at=timestamp(row.created_at),
        created_by=row.created_by,
    )


def environment(row: EnvironmentRow, project_name: str) -> common_pb2.Environment:
    return common_pb2.Environment(
        id=row.id,
        project_id=row.project_id,
        project_name=project_name,
        name=row.name,
        deployment_id=row.deployment_id or "",
        sequence=row.sequence,
        protected=row.protected,
        created_at=timestamp(row.created_at),
        previous_deployment_id=row.previous_deployment_id or "",
        canary=canary(row.canary),
    )


def canary(data: dict | None) -> common_pb2.Canary | None:
    if not data:
        return None
    c = canary_domain.Canary.from_json(data)
    return common_pb2.Canary(
        stable_deployment_id=c.stable_deployment_id,
        candidate_deployment_id=c.candidate_deployment_id,
        candidate_weight=c.candidate_weight,
        steps=[common_pb2.Canary.Step(weight=s.weight, bake_seconds=s.bake_seconds) for s in c.steps],
        step=c.step,
        step_started_at=timestamp(c.step_started_at),
        state=enums.number(common_pb2.Canary.State, c.state.value),
        thresholds=common_pb2.Canary.Thresholds(
            max_error_rate_increase=c.thresholds.max_error_rate_increase,
            max_latency_ratio=c.thresholds.max_latency_ratio,
            min_requests=c.thresholds.min_requests,
        ),
        last_analysis=c.last_analysis,
        last_analysis_at=timestamp(c.last_analysis_at) if c.last_analysis_at else None,
        reason=c.reason,
        actor=c.actor,
    )


def api_key(row: ApiKeyRow) -> common_pb2.ApiKeyInfo:
    """What may be shown of a key: never the key or its hash."""
    info = common_pb2.ApiKeyInfo(
        id=row.id, project_id=row.project_id, name=row.name, prefix=row.prefix, created_at=timestamp(row.created_at)
    )
    if row.revoked_at is not None:
        info.revoked_at.CopyFrom(timestamp(row.revoked_at))
    return info


def binding(
    row: BindingRow, env: EnvironmentRow, dep: DeploymentRow, project_name: str
) -> common_pb2.Binding:
    return common_pb2.Binding(
        project_id=row.project_id,
        project_name=project_name,
        environment_id=env.id,
        environment_name=env.name,
        deployment=deployment(dep),
        min_replicas=row.min_replicas,
        max_replicas=row.max_replicas,
        state=enums.number(common_pb2.Binding.State, row.state),
        serving=env.deployment_id == dep.id,
        updated_at=timestamp(row.updated_at),
        idle_pause_seconds=row.idle_pause_seconds or 0,
        idle_stop_seconds=row.idle_stop_seconds or 0,
    )


def history_entry(row: HistoryRow) -> common_pb2.HistoryEntry:
    return common_pb2.HistoryEntry(
        environment_id=row.environment_id,
        sequence=row.sequence,
        kind=enums.number(common_pb2.HistoryEntry.Kind, row.kind),
        deployment_id=row.deployment_id,
        previous_deployment_id=row.previous_deployment_id,
        min_replicas=row.min_replicas,
        max_replicas=row.max_replicas,
        actor=row.actor,
        created_at=timestamp(row.created_at),
        reason=row.reason,
    )


def experiment_run(row: ExperimentRunRow, *, with_cases: bool) -> registry_pb2.ExperimentRun:
    run = registry_pb2.ExperimentRun(
        id=row.id, project_id=row.project_id, name=row.name, deployment_id=row.deployment_id,
        dataset_digest=row.dataset_digest, total=row.total, passed=row.passed, pass_rate=row.pass_rate,
        latency_p50_ms=row.latency_p50_ms, latency_p99_ms=row.latency_p99_ms, actor=row.actor,
        created_at=timestamp(row.created_at),
    )
    if with_cases:
        run.cases.extend(
            registry_pb2.ExperimentCaseResult(
                name=c["name"], passed=bool(c["passed"]), status=int(c["status"]),
                latency_ms=float(c["latency_ms"]), reason=c.get("reason", ""),
            )
            for c in row.cases
        )
    return run


def environment_gate(row: EnvironmentGateRow, environment_name: str) -> registry_pb2.EnvironmentGate:
    return registry_pb2.EnvironmentGate(
        environment_id=row.environment_id, environment_name=environment_name, experiment=row.experiment,
        threshold=row.threshold, dataset_digest=row.dataset_digest, actor=row.actor,
        updated_at=timestamp(row.updated_at),
    )
