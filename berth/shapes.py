"""JSON shapes of Berth's objects: one definition shared by the CLI's
``--output json`` and the router's REST API, so both name things the same way
(``shared/DESIGN.md``). Timestamps are RFC 3339 strings, "" when unset.

States and kinds are enums in the protos and the contract's lowercase words
here (``"kind": "promote"``), converted by berth.enums; a value a newer
server sends that these stubs do not know reads ``"unknown"``."""
from __future__ import annotations

from typing import Any

from google.protobuf.message import Message

from berth import enums, errors
from berth.v1 import common_pb2, scheduler_pb2, secrets_pb2


def timestamp(message: Message, name: str) -> str:
    return getattr(message, name).ToJsonString() if message.HasField(name) else ""


def deployment_state(d: common_pb2.Deployment) -> str:
    return enums.label(common_pb2.Deployment.State, d.state)


def binding_status(b: scheduler_pb2.BindingStatus) -> str:
    return enums.label(scheduler_pb2.BindingStatus.Status, b.status)


def replica_state(r: scheduler_pb2.Replica) -> str:
    return enums.label(scheduler_pb2.Replica.State, r.state)


def error_kind(e: scheduler_pb2.DeploymentError) -> str:
    return enums.label(scheduler_pb2.DeploymentError.Kind, e.kind)


def secret_scope(s: secrets_pb2.SecretInfo) -> str:
    """``project`` or ``environment:<name>`` (DESIGN.md's words)."""
    if s.scope == secrets_pb2.SecretInfo.SCOPE_ENVIRONMENT:
        return f"environment:{s.environment or s.environment_id}"
    return enums.label(secrets_pb2.SecretInfo.Scope, s.scope)


def deployment_json(d: common_pb2.Deployment) -> dict[str, Any]:
    c = d.config
    return {
        "id": d.id,
        "project_id": d.project_id,
        "image": d.image,
        "image_id": d.image_id,
        "state": deployment_state(d),
        "created_at": timestamp(d, "created_at"),
        "created_by": d.created_by,
        "config": {
            "port": c.port,
            "command": list(c.command),
            "health_path": c.health_path,
            "variables": dict(c.variables),
            "resources": {"memory_bytes": c.resources.memory_bytes, "cpus": c.resources.cpus},
        },
    }


def environment_json(e: common_pb2.Environment) -> dict[str, Any]:
    return {
        "id": e.id,
        "name": e.name,
        "project_id": e.project_id,
        "project_name": e.project_name,
        "deployment_id": e.deployment_id,
        "previous_deployment_id": e.previous_deployment_id,
        "sequence": e.sequence,
        "protected": e.protected,
        "created_at": timestamp(e, "created_at"),
    }


def entry_json(h: common_pb2.HistoryEntry) -> dict[str, Any]:
    return {
        "sequence": h.sequence,
        "kind": enums.label(common_pb2.HistoryEntry.Kind, h.kind),
        "deployment_id": h.deployment_id,
        "previous_deployment_id": h.previous_deployment_id,
        "min_replicas": h.min_replicas,
        "max_replicas": h.max_replicas,
        "actor": h.actor,
        "reason": h.reason,
        "created_at": timestamp(h, "created_at"),
    }


def binding_json(b: common_pb2.Binding) -> dict[str, Any]:
    return {
        "environment_id": b.environment_id,
        "environment": b.environment_name,
        "deployment_id": b.deployment.id,
        "min_replicas": b.min_replicas,
        "max_replicas": b.max_replicas,
        "state": enums.label(common_pb2.Binding.State, b.state),
        "serving": b.serving,
        "updated_at": timestamp(b, "updated_at"),
        # The paused tier's windows in seconds; 0: the scheduler's default.
        "idle_pause_seconds": b.idle_pause_seconds,
        "idle_stop_seconds": b.idle_stop_seconds,
    }


def request_window_json(w: scheduler_pb2.RequestWindowStats) -> dict[str, Any]:
    return {
        "window_seconds": w.window_seconds,
        "requests": w.requests,
        "requests_per_second": w.requests_per_second,
        "responses": {"2xx": w.responses_2xx, "3xx": w.responses_3xx, "4xx": w.responses_4xx,
                      "5xx": w.responses_5xx},
        "error_rate": w.error_rate,
        "p50_seconds": w.p50_seconds,
        "p99_seconds": w.p99_seconds,
    }


def request_metrics_json(m: scheduler_pb2.RequestMetrics) -> dict[str, Any]:
    """A binding's request figures (the routers' sliding windows, merged by
    the scheduler) and its per-minute history over 15 minutes."""
    return {
        "last_minute": request_window_json(m.last_minute),
        "last_five_minutes": request_window_json(m.last_five_minutes),
        "history": [
            {"time": timestamp(p, "time"), "requests": p.requests, "requests_per_second": p.requests_per_second,
             "error_rate": p.error_rate, "p99_seconds": p.p99_seconds}
            for p in m.history
        ],
    }


def status_json(s: scheduler_pb2.DeploymentStatus) -> dict[str, Any]:
    data = deployment_json(s.deployment)
    data["bindings"] = [
        {
            "environment": b.environment,
            "environment_id": b.environment_id,
            "status": binding_status(b),
            "serving": b.serving,
            "min_replicas": b.min_replicas,
            "max_replicas": b.max_replicas,
            "desired_replicas": b.desired_replicas,
            "requests": request_metrics_json(b.requests) if b.HasField("requests") else None,
            "replicas": [
                {"id": r.id, "name": r.name, "index": r.index, "state": replica_state(r),
                 "started_at": timestamp(r, "started_at"), "restarts": r.restarts, "address": r.address,
                 "node": r.node}
                for r in b.replicas
            ],
        }
        for b in s.bindings
    ]
    if s.HasField("scheduler_leader"):  # the scheduler that leads (holds the lease) and answered
        data["scheduler_leader"] = {"instance": s.scheduler_leader.instance, "epoch": s.scheduler_leader.epoch}
    return data


def error_json(e: scheduler_pb2.DeploymentError) -> dict[str, Any]:
    return {
        "kind": error_kind(e),
        "message": e.message,
        "environment": e.environment,
        "environment_id": e.environment_id,
        "replica": e.replica,
        "count": e.count,
        "first_seen": timestamp(e, "first_seen"),
        "last_seen": timestamp(e, "last_seen"),
    }


def log_line_json(line: scheduler_pb2.LogLine) -> dict[str, Any]:
    """A replica's log line (``berth logs --output json``, the REST logs);
    ``dropped`` only on a marker of dropped lines, ``archived`` only on a line
    kept from a removed replica."""
    data: dict[str, Any] = {
        "time": timestamp(line, "time"),
        "replica_id": line.replica_id,
        "replica_index": line.replica_index,
        "environment_id": line.environment_id,
        "environment": line.environment,
        "stream": enums.label(scheduler_pb2.LogLine.Stream, line.stream),
        "text": line.text,
    }
    if line.dropped:
        data["dropped"] = line.dropped
    if line.archived:
        data["archived"] = True
    return data


def secret_json(s: secrets_pb2.SecretInfo) -> dict[str, Any]:
    # SecretInfo has no value field: a value can never leak through here.
    return {
        "name": s.name,
        "type": s.type,
        "scope": secret_scope(s),
        "environment_id": s.environment_id,
        "version": s.version,
        "deleted": s.deleted,
        "created_at": timestamp(s, "created_at"),
        "updated_at": timestamp(s, "updated_at"),
        "updated_by": s.updated_by,
    }


def api_key_json(k: common_pb2.ApiKeyInfo) -> dict[str, Any]:
    # ApiKeyInfo carries a prefix, never the key.
    return {
        "id": k.id,
        "name": k.name,
        "prefix": k.prefix,
        "created_at": timestamp(k, "created_at"),
        "revoked_at": timestamp(k, "revoked_at"),
    }


def canary_state(c: common_pb2.Canary) -> str:
    return enums.label(common_pb2.Canary.State, c.state)


def canary_json(c: common_pb2.Canary) -> dict[str, Any]:
    """An environment's canary (``Environment.canary``) in the contract's words."""
    return {
        "state": canary_state(c),
        "stable_deployment_id": c.stable_deployment_id,
        "candidate_deployment_id": c.candidate_deployment_id,
        "candidate_weight": c.candidate_weight,
        "steps": [{"weight": s.weight, "bake_seconds": s.bake_seconds} for s in c.steps],
        "step": c.step,
        "step_started_at": timestamp(c, "step_started_at"),
        "thresholds": {
            "max_error_rate_increase": c.thresholds.max_error_rate_increase,
            "max_latency_ratio": c.thresholds.max_latency_ratio,
            "min_requests": c.thresholds.min_requests,
        },
        "last_analysis": c.last_analysis,
        "last_analysis_at": timestamp(c, "last_analysis_at"),
        "reason": c.reason,
        "actor": c.actor,
    }


# The canary plan's words (`berth promote --canary`, REST `plan`): 10:5m,50:10m.
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text: str) -> int:
    """``30s``, ``5m``, ``1h`` or plain seconds -> seconds."""
    text = text.strip().lower()
    unit = _DURATION_UNITS.get(text[-1:]) if text else None
    number = text[:-1] if unit else text
    if not number.isdigit():
        raise errors.InvalidArgument(f"{text!r} is not a duration (e.g. 30s, 5m, 1h)", field="canary")
    return int(number) * (unit or 1)


def parse_canary_plan(plan: str) -> list[tuple[int, int]]:
    """``10:5m,50:10m`` -> [(10, 300), (50, 600)]; weights increasing within 1-99."""
    steps: list[tuple[int, int]] = []
    for part in (p.strip() for p in plan.split(",")):
        weight_text, sep, duration = part.partition(":")
        if not sep or not weight_text.strip().isdigit():
            raise errors.InvalidArgument(f"canary step {part!r} is not WEIGHT:DURATION (e.g. 10:5m)", field="canary")
        weight, bake = int(weight_text), parse_duration(duration)
        if not 1 <= weight <= 99:
            raise errors.InvalidArgument(f"canary weight {weight} is outside 1-99 (100% is the promotion itself)",
                                         field="canary")
        if steps and weight <= steps[-1][0]:
            raise errors.InvalidArgument(f"canary weights must increase: {weight} after {steps[-1][0]}",
                                         field="canary")
        if bake < 1:
            raise errors.InvalidArgument(f"canary step {part!r} bakes for no time", field="canary")
        steps.append((weight, bake))
    return steps
