"""The OpenAPI 3 document of ``/api/v1``, built from the same operation
table and body descriptions the handlers use (``api.OPERATIONS``), plus the
response schemas written here next to them."""
from __future__ import annotations

import copy
import functools
from typing import Any

from services.router import api

STRING = {"type": "string"}
INTEGER = {"type": "integer"}
PAGE_TOKEN = {"type": "string", "description": "pass as page_token for the next page; empty on the last page"}
BOOLEAN = {"type": "boolean"}
TIME = {"type": "string", "description": "RFC 3339 time; empty when unknown"}


def obj(properties: dict[str, Any], description: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "required": list(properties), "properties": properties}
    if description:
        out["description"] = description
    return out


def optional(schema: dict[str, Any], *names: str) -> dict[str, Any]:
    """``schema`` (an ``obj``) with ``names`` present only sometimes."""
    return {**schema, "required": [n for n in schema["required"] if n not in names]}


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def array(items: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": items}


SCHEMAS: dict[str, Any] = {
    "Error": obj({"error": obj({"code": STRING, "message": STRING})}),
    "WorkerConfig": obj({
        "port": INTEGER,
        "command": array(STRING),
        "health_path": STRING,
        "variables": {"type": "object", "additionalProperties": STRING},
        "resources": obj({"memory_bytes": INTEGER, "cpus": {"type": "number"}}),
    }),
    "Deployment": obj({
        "id": STRING,
        "project_id": STRING,
        "image": {"type": "string", "description": "the reference given at deploy time"},
        "image_id": {"type": "string", "description": "content-addressed sha256: id the scheduler runs"},
        "state": {"type": "string", "description": "active | terminated"},
        "created_at": TIME,
        "created_by": STRING,
        "config": ref("WorkerConfig"),
    }),
    "Environment": obj({
        "id": STRING,
        "name": STRING,
        "project_id": STRING,
        "project_name": STRING,
        "deployment_id": {"type": "string", "description": "empty until the first deploy"},
        "previous_deployment_id": STRING,
        "sequence": {"type": "integer", "description": "sequence of the latest history entry; 0 = none"},
        "protected": BOOLEAN,
        "created_at": TIME,
    }),
    "ServingEnvironment": {
        "allOf": [ref("Environment"), obj({
            "fallback": {
                "type": "object", "nullable": True, "required": ["deployment_id", "since"],
                "properties": {"deployment_id": STRING, "since": TIME},
                "description": "null unless this router serves the environment by its previous deployment "
                               "(responses carry X-Berth-Fallback: 1) because the current one failed: that "
                               "deployment, and since when the router has seen the current one failed",
            },
        })],
    },
    "HistoryEntry": obj({
        "sequence": INTEGER,
        "kind": {"type": "string", "description": "deploy | promote | rollback"},
        "deployment_id": STRING,
        "previous_deployment_id": STRING,
        "min_replicas": INTEGER,
        "max_replicas": INTEGER,
        "actor": STRING,
        "reason": STRING,
        "created_at": TIME,
    }),
    "Binding": obj({
        "environment_id": STRING,
        "environment": STRING,
        "deployment_id": STRING,
        "min_replicas": INTEGER,
        "max_replicas": INTEGER,
        "state": {"type": "string", "description": "active | terminated"},
        "serving": BOOLEAN,
        "updated_at": TIME,
        "idle_pause_seconds": {"type": "integer", "description": "seconds idle before a min-0 binding's replicas "
                               "are paused; 0: the scheduler's default"},
        "idle_stop_seconds": {"type": "integer", "description": "seconds idle before they are stopped; 0: the "
                              "scheduler's default"},
    }),
    "Replica": obj({
        "id": STRING, "name": STRING, "index": INTEGER,
        "state": {"type": "string", "description": "pending | starting | ready | unhealthy | stopping | exited | failed | paused"},
        "started_at": TIME, "restarts": INTEGER, "address": STRING,
        "node": {"type": "string", "description": "the cluster node it runs on (swarm runtime); "
                 "empty on one engine"},
    }),
    "BindingStatus": obj({
        "environment": STRING,
        "environment_id": STRING,
        "status": {"type": "string",
                   "description": "deploying | running | degraded | failed | scaled_to_zero | terminated"},
        "serving": BOOLEAN,
        "min_replicas": INTEGER,
        "max_replicas": INTEGER,
        "desired_replicas": {"type": "integer", "description": "the replica count the scheduler is driving the "
                             "binding to now (within the bounds, by load; 0 when terminated)"},
        "requests": {"allOf": [ref("RequestMetrics")], "nullable": True,
                     "description": "requests the routers answered lately; null when none in the last 5 minutes"},
        "replicas": array(ref("Replica")),
    }),
    "RequestWindow": obj({
        "window_seconds": {"type": "number", "description": "60 or 300"},
        "requests": INTEGER,
        "requests_per_second": {"type": "number"},
        "responses": obj({"2xx": INTEGER, "3xx": INTEGER, "4xx": INTEGER, "5xx": INTEGER}),
        "error_rate": {"type": "number", "description": "5xx responses / requests (0 to 1); 0 with no request"},
        "p50_seconds": {"type": "number", "description": "from the routers' merged latency histogram"},
        "p99_seconds": {"type": "number", "description": "from the routers' merged latency histogram"},
    }, "requests answered in a trailing window, summed over every router"),
    "RequestMetrics": obj({
        "last_minute": ref("RequestWindow"),
        "last_five_minutes": ref("RequestWindow"),
        "history": array(obj({
            "time": TIME, "requests": INTEGER, "requests_per_second": {"type": "number"},
            "error_rate": {"type": "number"}, "p99_seconds": {"type": "number"},
        }, "the last minute's figures at the end of one minute (time: the minute's end)")),
    }, "a binding's request figures; history: one point per minute over the last 15 minutes, oldest first"),
    "DeploymentError": obj({
        "kind": {"type": "string", "description": "image_pull_error | scheduling_failure | crash_loop | "
                 "oom_killed | health_check_failed | node_down"},
        "message": STRING, "environment": STRING, "environment_id": STRING, "replica": STRING,
        "count": INTEGER, "first_seen": TIME, "last_seen": TIME,
    }),
    "Secret": obj({
        "name": STRING,
        "type": STRING,
        "scope": {"type": "string", "description": "project | environment:<name>"},
        "environment_id": STRING,
        "version": INTEGER,
        "deleted": BOOLEAN,
        "created_at": TIME,
        "updated_at": TIME,
        "updated_by": STRING,
    }, "a secret's metadata; values are write-only and never returned"),
    # Results
    "PointerMove": optional(obj({
        "environment": ref("Environment"),
        "entry": ref("HistoryEntry"),
        "routed": {"type": "boolean", "description": "true when this router, and every other live router "
                   "instance, already routes new requests by the move (read your own write, whichever router "
                   "the next request reaches); false if one lagged beyond a few seconds"},
        "lagging": {**array(obj({
            "router": {"type": "string", "description": "the router instance (host:port), or * when the "
                       "scheduler that tracks the routers could not tell"},
            "revision": {"type": "integer", "description": "the registry revision it routes by"},
            "reason": STRING,
        })), "description": "only when routed is false because of other routers: those that did not route by "
                            "the move in time"},
    }), "lagging"),
    "Deployed": {
        "allOf": [obj({"deployment": ref("Deployment")}), ref("PointerMove")],
        "description": "the new deployment and the move of the environment's pointer to it (a deploy entry)",
    },
    "BindingResult": obj({"binding": ref("Binding")}),
    "DeploymentResult": obj({"deployment": ref("Deployment")}),
    "DeploymentList": obj({"deployments": array(ref("Deployment")), "next_page_token": PAGE_TOKEN}),
    "DeploymentStatus": {
        "allOf": [ref("Deployment"), {
            "type": "object", "required": ["bindings"],
            "properties": {
                "bindings": array(ref("BindingStatus")),
                "scheduler_leader": obj({
                    "instance": STRING,
                    "epoch": {"type": "integer", "description": "the leader's fencing epoch: higher is later"},
                }, "the scheduler instance that leads (holds the lease) and answered"),
            },
        }],
    },
    "LogLine": optional(obj({
        "time": TIME,
        "replica_id": {"type": "string", "description": "the replica's container id"},
        "replica_index": INTEGER,
        "environment_id": STRING,
        "environment": STRING,
        "stream": {"type": "string", "enum": ["stdout", "stderr"]},
        "text": {"type": "string", "description": "the line as printed, without its newline (cut at 8 KiB)"},
        "dropped": {"type": "integer", "description": "only on a marker: lines of this stream dropped (printed "
                    "faster than the rate limit)"},
        "archived": {"type": "boolean", "description": "only when true: kept from a removed replica"},
    }), "dropped", "archived"),
    "LogLines": obj({"deployment_id": STRING, "lines": array(ref("LogLine"))}),
    "DeploymentErrors": obj({"deployment_id": STRING, "errors": array(ref("DeploymentError")),
                             "next_page_token": PAGE_TOKEN}),
    "EnvironmentList": obj({"environments": array(ref("ServingEnvironment")), "next_page_token": PAGE_TOKEN}),
    "EnvironmentResult": obj({"environment": ref("Environment")}),
    "History": obj({"environment": STRING, "entries": array(ref("HistoryEntry")), "next_page_token": PAGE_TOKEN}),
    "ExperimentRun": optional(obj({
        "id": STRING,
        "name": {"type": "string", "description": "the experiment's name"},
        "deployment_id": STRING,
        "dataset_digest": {"type": "string", "description": "sha256: of the canonical dataset"},
        "total": INTEGER,
        "passed": INTEGER,
        "pass_rate": {"type": "number", "description": "passed / total"},
        "latency_p50_ms": {"type": "number"},
        "latency_p99_ms": {"type": "number"},
        "actor": STRING,
        "created_at": TIME,
        "cases": array(obj({
            "name": STRING, "passed": BOOLEAN,
            "status": {"type": "integer", "description": "the HTTP status answered; 0: no answer"},
            "latency_ms": {"type": "number"},
            "reason": {"type": "string", "description": "why it failed; empty when it passed"},
        })),
    }), "cases"),
    "ExperimentRunList": obj({"runs": array(ref("ExperimentRun")), "next_page_token": PAGE_TOKEN}),
    "Gate": obj({
        "environment": STRING,
        "environment_id": STRING,
        "experiment": STRING,
        "threshold": {"type": "number", "description": "the lowest passing rate"},
        "dataset_digest": STRING,
        "actor": STRING,
        "updated_at": TIME,
    }),
    "GateList": obj({"gates": array(ref("Gate"))}),
    "GateResult": obj({"gate": ref("Gate")}),
    "Canary": obj({
        "state": {"type": "string", "description": "running | paused | aborted | promoted"},
        "stable_deployment_id": STRING,
        "candidate_deployment_id": STRING,
        "candidate_weight": {"type": "integer", "description": "percent of new requests the candidate takes"},
        "steps": array(obj({"weight": INTEGER, "bake_seconds": INTEGER})),
        "step": {"type": "integer", "description": "index of the current step"},
        "step_started_at": TIME,
        "thresholds": obj({"max_error_rate_increase": {"type": "number"}, "max_latency_ratio": {"type": "number"},
                           "min_requests": INTEGER}),
        "last_analysis": STRING,
        "last_analysis_at": TIME,
        "reason": STRING,
        "actor": STRING,
    }),
    "CanaryResult": optional(obj({
        "environment": ref("Environment"),
        "canary": {**ref("Canary"), "nullable": True},
        "entry": ref("HistoryEntry"),
    }), "entry"),
    "GateCleared": obj({"environment": STRING, "cleared": {"type": "boolean",
                                                           "description": "false when it had no gate"}}),
    "SecretList": obj({"secrets": array(ref("Secret")), "next_page_token": PAGE_TOKEN}),
    "SecretResult": obj({"secret": ref("Secret")}),
    "SecretVersions": obj({"name": STRING, "versions": array(ref("Secret")), "next_page_token": PAGE_TOKEN}),
}

EVENT_STREAM = (
    "Server-sent events, one per change of the project: `event:` names it — `environment` and `binding` (the "
    "current state, before the marker, when not resuming), `snapshot_complete` (the marker; `resumed`: true when "
    "the events before it were the changes after since_revision, false when they were the current state: replace "
    "what you hold), `moved` (a deploy, promote or rollback: `environment` and `entry`), `created`, `deleted` "
    "(`environment`), `binding` (a binding as it now is). `data:` is the JSON of the change in the shapes of "
    "this API, with `revision`. `id:` (the registry revision) is set on the marker and on every event after it: "
    "reconnect with it as Last-Event-ID. Lines starting with `:` are heartbeats. The stream ends after an hour; "
    "reconnect."
)

LOG_STREAM = (
    "JSON (`lines`, at most 10000, in time order); with follow=true, server-sent events instead: `event: line` "
    "with `data:` a line's JSON, as the replicas print them (a replica started later joins; lines of replicas "
    "found later may be older than lines already sent); lines starting with `:` are heartbeats; the stream ends "
    "after an hour. A line with `dropped` stands for that many lines the replica printed faster than the "
    "scheduler's rate limit; `archived` marks a line kept from a removed (crashed, replaced) replica."
)

ERRORS = {
    "400": "Malformed input; the message names the field",
    "401": "No API key, or not a valid one",
    "403": "The key's project may not do this (another project's resource)",
    "404": "Unknown resource (or another project's)",
    "409": "Lost a compare-and-swap (re-read and retry), or already exists",
    "412": "The current state forbids it (e.g. terminated deployment, unconfirmed production move, a gated "
           "environment without a passing experiment run: the message names the gate and the run)",
    "413": f"Request body larger than the API accepts ({api.MAX_API_BODY_BYTES} bytes), or a secret value over "
           f"{api.secret_limits.MAX_VALUE_BYTES} bytes",
    "500": "A service failed (a bug; see its log)",
    "501": "The platform's service does not implement this call",
    "503": "A service is unavailable; retry after Retry-After seconds",
}


def _error(description: str, retry: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": ref("Error")}},
    }
    if retry:
        out["headers"] = {"Retry-After": {"description": "seconds", "schema": INTEGER}}
    return out


def _operation(op: api.Operation) -> dict[str, Any]:
    out: dict[str, Any] = {"operationId": op.operation_id, "summary": op.summary}
    parameters: list[dict[str, Any]] = [
        {"name": s[1:-1], "in": "path", "required": True, "schema": {"type": "string", "minLength": 1},
         "description": "secret name" if s == "{name}" else
         "environment name or id" if "environments" in op.path else
         "experiment run id" if "experiments" in op.path else "deployment id"}
        for s in op.segments if s.startswith("{")
    ]
    parameters += [
        {"name": name, "in": "query", "required": False,
         "schema": INTEGER if name == "page_size" else {"type": "integer", "minimum": 0}
         if name == "since_revision" else STRING, "description": description}
        for name, description in op.query
    ]
    if op.stream:
        parameters.append({"name": "Last-Event-ID", "in": "header", "required": False,
                           "schema": {"type": "integer", "minimum": 0},
                           "description": "the id of the last event received (EventSource sends it when it "
                                          "reconnects): resume after it; wins over since_revision"})
    if parameters:
        out["parameters"] = parameters
    if op.body is not None:
        out["requestBody"] = {
            "required": op.body.required,
            "content": {"application/json": {"schema": op.body.schema()}},
        }
    if not op.auth:
        out["security"] = []
        out["responses"] = {"200": {"description": "The OpenAPI document",
                                    "content": {"application/json": {"schema": {"type": "object"}}}}}
        return out
    responses: dict[str, Any] = {
        "200": {"description": "OK", "content": {"application/json": {"schema": ref(op.response)}}},
    }
    if op.stream:
        responses["200"] = {"description": EVENT_STREAM, "content": {"text/event-stream": {"schema": STRING}}}
    if op.stream_optional:
        responses["200"]["content"]["text/event-stream"] = {"schema": STRING}
        responses["200"]["description"] = LOG_STREAM
    for code, description in ERRORS.items():
        if code == "413" and op.body is None:
            continue
        responses[code] = _error(description, retry=code == "503")
    out["responses"] = responses
    return out


@functools.cache
def _document() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for op in api.OPERATIONS:
        paths.setdefault(api.PREFIX + op.path, {})[op.method.lower()] = _operation(op)
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Berth REST API",
            "version": "1",
            "description": (
                "Promote, roll back, scale and inspect deployments, environments and secrets of the project "
                "the API key belongs to. Environments are given by name or id. Request bodies are JSON objects; "
                "unknown fields are rejected (400), unknown query parameters ignored. Errors are "
                '{"error": {"code", "message"}}. Once promote or rollback returns, this router routes new '
                "requests by the move."
            ),
        },
        "servers": [{"url": "/"}],
        "components": {
            "securitySchemes": {"apiKey": {"type": "apiKey", "in": "header", "name": "X-API-KEY"}},
            "schemas": SCHEMAS,
        },
        "security": [{"apiKey": []}],
        "paths": paths,
    }


def document() -> dict[str, Any]:
    return copy.deepcopy(_document())
