"""The REST API ``/api/v1``: JSON over HTTP, translated to the gRPC services.

The caller's ``X-API-KEY`` header travels as the ``x-api-key`` metadata of
every call: the services authenticate and scope it to the key's project (the
router only refuses a request that carries no key at all).

Decisions (also in the OpenAPI document, ``openapi.py``):

* Bodies are JSON objects. Unknown fields are rejected with 400 naming them,
  so a typo (``target_environment``) never silently does something else.
  Wrong types, out-of-range numbers and control characters in ids are 400
  naming the field. An empty body counts as ``{}``.
* Unknown query parameters are ignored.
* Environments may be given by name or id everywhere (``environment_id``).
* Errors are ``{"error": {"code", "message"}}``; ``HTTP_BY_GRPC`` is the one
  place gRPC status codes become HTTP statuses.
* After promote/rollback returns, this router already routes new requests by
  the move: the handler waits (bounded) until its watched table shows the new
  history entry, and says so in ``"routed"``. With several router instances
  it also waits until every live one reports (to the scheduler) that it
  routes by that revision, and otherwise names them in ``"lagging"``.
* A move interrupted by a registry instance's death is settled, not
  guessed: see ``RestApi.move``.
"""
from __future__ import annotations

import asyncio
import datetime
import json
import logging
import math
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import Message

from berth.client import error_from_rpc
from berth.errors import InvalidArgument as BerthInvalidArgument
from berth.experiments import gate_json, run_json
from berth.shapes import (
    binding_json,
    canary_json,
    deployment_json,
    entry_json,
    environment_json,
    error_json,
    log_line_json,
    parse_canary_plan,
    secret_json,
    status_json,
)
from berth.v1 import (
    common_pb2,
    registry_pb2,
    registry_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
    secrets_pb2,
    secrets_pb2_grpc,
)
from services.common.remote import channel
from services.registry.domain import MAX_REPLICA_DELTA, MAX_REPLICAS_LIMIT
from services.router.platform import PlatformRequest, PlatformResponse, error_response, json_response
from services.router.table import RouteError, RoutingState
from services.router.workers import SharedState
from services.secrets import limits as secret_limits

log = logging.getLogger("berth.router.api")

PREFIX = "/api/v1"
RETRY_AFTER_S = 2
MAX_REPLICAS = MAX_REPLICAS_LIMIT  # the registry's own bound: refused here with the same number
# Every API body is a small JSON object; the largest legitimate one is a
# secret (64 KiB of value, at most 6x that JSON-escaped). A body beyond this
# is refused with 413 before parsing, well below the gRPC message limit
# (4 MiB) that would otherwise surface as a 503 from the service call.
MAX_API_BODY_BYTES = 1024 * 1024

# --------------------------------------------------------------------------
# Errors: the one gRPC -> HTTP mapping
# --------------------------------------------------------------------------

HTTP_BY_GRPC: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_argument"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_argument"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "unauthenticated"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_denied"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "already_exists"),
    grpc.StatusCode.ABORTED: (409, "aborted"),
    grpc.StatusCode.FAILED_PRECONDITION: (412, "failed_precondition"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "not_implemented"),
    grpc.StatusCode.UNAVAILABLE: (503, "unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (503, "unavailable"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (503, "unavailable"),
}
RETRYABLE_STATUSES = frozenset({503})
MOVE_ATTEMPTS = 4  # sends of one pointer move (each under compare-and-swap)
# GET /watch (server-sent events): a comment line this often when nothing happens (a proxy keeps the
# connection, the router notices a client gone), and the stream ends after WATCH_MAX_SECONDS (the client
# reconnects with Last-Event-ID, as EventSource does by itself).
WATCH_HEARTBEAT_SECONDS = 15.0
WATCH_MAX_SECONDS = 3600.0
ROUTERS_POLL = 0.05  # seconds between asks while another router lags


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    @classmethod
    def from_rpc(cls, exc: grpc.aio.AioRpcError, service: str) -> ApiError:
        status, code = HTTP_BY_GRPC.get(exc.code(), (500, "internal"))
        message = exc.details() or exc.code().name
        hint = error_from_rpc(exc).hint  # sent in ErrorInfo.metadata["hint"]
        if hint and status < 500:
            message = f"{message} (hint: {hint})"
        if status == 503:
            message = f"the {service} service is unavailable ({message}); retry shortly"
        elif status == 501:
            message = f"this platform's {service} service does not implement the call yet ({message})"
        elif status == 500:
            log.error("service_error", extra={"service": service, "code": exc.code().name, "error": message})
            message = f"the {service} service failed; see its log"
        return cls(status, code, message)

    def response(self) -> PlatformResponse:
        headers = [("Retry-After", str(RETRY_AFTER_S))] if self.status in RETRYABLE_STATUSES else []
        return error_response(self.status, self.code, self.message, headers)


def bad(field: str, why: str) -> ApiError:
    return ApiError(400, "invalid_argument", f"{field}: {why}")


def sse_event(event: registry_pb2.EnvironmentEvent, *, with_id: bool) -> bytes:
    """One WatchEnvironments event as a server-sent event: ``event:`` names
    the change (environment, moved, created, deleted, binding,
    snapshot_complete), ``data:`` its JSON in the REST shapes."""
    which = event.WhichOneof("change")
    data: dict[str, Any]
    if event.snapshot_complete:
        name, data = "snapshot_complete", {"resumed": event.resumed}
    elif which == "moved":
        name = "moved"
        data = {"environment": environment_json(event.moved.environment), "entry": entry_json(event.moved.entry)}
    elif which == "binding":
        name, data = "binding", {"binding": binding_json(event.binding)}
    elif which in ("environment", "created", "deleted"):
        name, data = which, {"environment": environment_json(getattr(event, which))}
    else:
        name, data = "unknown", {}  # a change a newer registry sends that this router does not know
    data["revision"] = event.revision
    lines = [f"event: {name}"]
    if with_id:
        lines.append(f"id: {event.revision}")
    lines.append("data: " + json.dumps(data, separators=(",", ":")))
    return ("\n".join(lines) + "\n\n").encode()


def page(call: Call) -> dict[str, Any]:
    """``page_size`` and ``page_token`` of a list request's query string;
    the service checks their values (a negative size, a bad token: 400)."""
    raw = call.query.get("page_size", "").strip()
    size = 0
    if raw:
        try:
            size = int(raw)
        except ValueError:
            raise bad("page_size", "must be an integer") from None
        if not -(2**31) <= size < 2**31:
            raise bad("page_size", "is out of range (at most 1000 are returned)")
    return {"page_size": size, "page_token": call.query.get("page_token", "")}


# --------------------------------------------------------------------------
# Input: bodies described once, validated here and documented in OpenAPI
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    name: str
    type: type  # str | int | bool
    required: bool = False
    description: str = ""
    minimum: int | None = None
    maximum: int | None = None
    default: Any = None
    plain_text: bool = True  # strings: no control characters (ids, names)

    def schema(self) -> dict[str, Any]:
        kind = {str: "string", int: "integer", bool: "boolean", float: "number"}[self.type]
        out: dict[str, Any] = {"type": kind}
        if self.description:
            out["description"] = self.description
        if self.type is str and self.required:
            out["minLength"] = 1
        if self.minimum is not None:
            out["minimum"] = self.minimum
        if self.maximum is not None:
            out["maximum"] = self.maximum
        if self.default is not None:
            out["default"] = self.default
        return out


@dataclass(frozen=True)
class Body:
    fields: tuple[Field, ...]

    def schema(self) -> dict[str, Any]:
        return {
            "type": "object",
            "additionalProperties": False,
            "required": [f.name for f in self.fields if f.required],
            "properties": {f.name: f.schema() for f in self.fields},
        }

    @property
    def required(self) -> bool:
        return any(f.required for f in self.fields)

    def parse(self, raw: bytes) -> dict[str, Any]:
        if raw.strip():
            try:
                data = json.loads(raw)
            except UnicodeDecodeError:
                raise ApiError(400, "invalid_json", "the request body is not UTF-8 encoded JSON") from None
            except json.JSONDecodeError as exc:
                raise ApiError(400, "invalid_json",
                               f"the request body is not valid JSON ({exc.msg} at line {exc.lineno} "
                               f"column {exc.colno})") from None
        else:
            data = {}
        if not isinstance(data, dict):
            raise ApiError(400, "invalid_argument", f"the request body must be a JSON object, not {_json_type(data)}")
        known = {f.name: f for f in self.fields}
        for name in data:
            if name not in known:
                accepted = ", ".join(known) or "no fields"
                raise bad(str(name), f"unknown field; this endpoint accepts {accepted}")
        out: dict[str, Any] = {}
        for f in self.fields:
            if f.name not in data or data[f.name] is None:
                if f.required:
                    raise bad(f.name, "is required")
                out[f.name] = f.default
                continue
            out[f.name] = check_value(f, data[f.name])
        return out


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if value is None:
        return "null"
    return "an object"


def check_value(f: Field, value: Any) -> Any:
    if f.type is bool:
        if not isinstance(value, bool):
            raise bad(f.name, f"must be true or false, not {_json_type(value)}")
        return value
    if f.type is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise bad(f.name, f"must be an integer, not {_json_type(value)}")
        if f.minimum is not None and value < f.minimum:
            raise bad(f.name, f"must be at least {f.minimum}, not {value}")
        if f.maximum is not None and value > f.maximum:
            raise bad(f.name, f"must be at most {f.maximum}, not {value}")
        return value
    if f.type is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise bad(f.name, f"must be a number, not {_json_type(value)}")
        return float(value)
    if not isinstance(value, str):
        raise bad(f.name, f"must be a string, not {_json_type(value)}")
    return check_text(f.name, value, required=f.required, plain=f.plain_text)


def check_text(name: str, value: str, *, required: bool, plain: bool = True) -> str:
    if required and not value:
        raise bad(name, "must not be empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise bad(name, "is not valid Unicode text (lone surrogate)") from None
    if plain:
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise bad(name, "must not contain control characters")
        if len(value) > 256:
            raise bad(name, f"is {len(value)} characters long; at most 256")
    elif "\x00" in value:
        raise bad(name, "must not contain NUL characters")
    return value


ENV_FIELD_DOC = "environment name or id"
MAX_IDLE_SECONDS = 86_400


def idle_fields(absent: str) -> tuple[Field, Field]:
    """The binding's paused-tier windows (Registry Binding.idle_*_seconds)."""
    return (
        Field("idle_pause_seconds", int, description="seconds without a request (none in flight) before a min-0 "
              "binding's replicas are paused (memory kept, resumed in milliseconds); 0: the scheduler's default; "
              "absent: " + absent, minimum=0, maximum=MAX_IDLE_SECONDS),
        Field("idle_stop_seconds", int, description="seconds without a request before they are stopped (scaled to "
              "zero); 0: the scheduler's default; absent: " + absent, minimum=0, maximum=MAX_IDLE_SECONDS),
    )


DEPLOY = Body((
    Field("image", str, True, "the image reference to register (pulled by the scheduler when absent; a failed "
          "pull is an image_pull_error), or a content-addressed sha256: image id"),
    Field("environment_id", str, description="the environment to point at the new deployment (" + ENV_FIELD_DOC
          + "); absent: preview"),
    Field("min_replicas", int, description="replicas kept running; 0 is a real minimum (scale to zero); absent: 1",
          minimum=0, maximum=MAX_REPLICAS),
    Field("max_replicas", int, description="replicas autoscaling may reach; absent: the larger of min_replicas "
          "and 3", minimum=0, maximum=MAX_REPLICAS),
    Field("port", int, description="the port the worker listens on ($PORT); absent: 8080", minimum=0,
          maximum=65535),
    Field("health_path", str, description="path of the readiness check; absent: /"),
    Field("confirm", bool, description="required to move a protected environment (production)", default=False),
    Field("reason", str, description="recorded in the history"),
    Field("expected_sequence", int, description="compare-and-swap: the environment's current sequence",
          minimum=0),
    *idle_fields("0"),
))
PROMOTE = Body((
    Field("source_deployment_id", str, True, "the deployment to promote"),
    Field("target_environment_id", str, True, "the environment to point at it (" + ENV_FIELD_DOC + ")"),
    Field("min_replicas", int, description="replica bounds of the binding in the target environment; 0 is a "
          "real minimum (scale to zero); absent: the deployment's bounds there, else min 1 and max the larger of "
          "min and 3",
          minimum=0, maximum=MAX_REPLICAS),
    Field("max_replicas", int, minimum=0, maximum=MAX_REPLICAS),
    Field("scale_previous_to_zero", bool, description="scale the previously serving binding to zero", default=False),
    Field("confirm", bool, description="required to move a protected environment (production)", default=False),
    Field("reason", str, description="recorded in the history; required with skip_gate"),
    Field("expected_sequence", int, description="compare-and-swap: the environment's current sequence",
          minimum=0),
    Field("skip_gate", bool, description="promote into a gated environment without a passing experiment run "
          "(needs a reason, recorded in the history); without it a gated promotion lacking one is 412 naming "
          "the gate and the run", default=False),
    *idle_fields("what the binding has there (a new one: 0)"),
))
ROLLBACK = Body((
    Field("environment_id", str, True, ENV_FIELD_DOC),
    Field("deployment_id", str, description="roll back to this deployment (must appear in the history); "
          "default: the previously serving one"),
    Field("confirm", bool, description="required to move a protected environment (production)", default=False),
    Field("reason", str, description="recorded in the history"),
    Field("expected_sequence", int, description="compare-and-swap: the environment's current sequence",
          minimum=0),
))
SCALE = Body((
    Field("by", int, description="replicas to add or remove", minimum=1, maximum=MAX_REPLICA_DELTA, default=1),
    Field("environment_id", str, description=ENV_FIELD_DOC + "; needed when the deployment has several bindings"),
))
SCALE_BOUNDS = Body((
    Field("min_replicas", int, True, "lowest replica count (0 allows scale to zero)", minimum=0, maximum=MAX_REPLICAS),
    Field("max_replicas", int, True, "highest replica count", minimum=1, maximum=MAX_REPLICAS),
    Field("environment_id", str, description=ENV_FIELD_DOC + "; needed when the deployment has several bindings"),
    *idle_fields("unchanged"),
))
CREATE_ENVIRONMENT = Body((
    Field("name", str, True, "lowercase letters, digits and dashes, starting with a letter"),
))
DELETE_ENVIRONMENT = Body((
    Field("force", bool, description="also delete an environment that points to a deployment, with its bindings "
          "and history (its replicas stop, routing to it ends); without it such an environment is refused (412)",
          default=False),
    Field("confirm", bool, description="required with force to delete a protected environment (production)",
          default=False),
))
EMPTY = Body(())
START_CANARY = Body((
    Field("deployment_id", str, True, "the candidate deployment"),
    Field("plan", str, True, "the steps as WEIGHT:DURATION,... (e.g. 10:5m,50:10m): weights increasing within "
          "1-99, durations as 30s, 5m, 1h; after the last step the environment is promoted to the candidate"),
    Field("max_error_rate_increase", float, description="abort when the candidate's 5xx rate exceeds the "
          "stable's by more (absent: 0.01)"),
    Field("max_latency_ratio", float, description="abort when the candidate's p99 exceeds the stable's times "
          "this (absent: 1.2)"),
    Field("min_requests", int, description="requests the candidate serves before it is judged (absent: 100)",
          minimum=1),
    Field("min_replicas", int, description="the candidate binding's bounds (as for promote)", minimum=0,
          maximum=MAX_REPLICAS),
    Field("max_replicas", int, minimum=0, maximum=MAX_REPLICAS),
    Field("confirm", bool, description="required for a protected environment (production)", default=False),
    Field("reason", str, description="recorded in the history"),
    Field("skip_gate", bool, description="as for promote", default=False),
    Field("expected_sequence", int, description="compare-and-swap: the environment's current sequence",
          minimum=0),
))
CANARY_ACTION = Body((
    Field("reason", str, description="recorded in the history"),
    Field("confirm", bool, description="promote-now into a protected environment (production)", default=False),
    Field("expected_sequence", int, description="compare-and-swap: the environment's current sequence",
          minimum=0),
))
SET_GATE = Body((
    Field("experiment", str, True, "the experiment whose run must pass"),
    Field("threshold", float, True, "the lowest passing rate, above 0 and at most 1"),
    Field("dataset_digest", str, description="sha256:... of the dataset the run must have used; absent: that of "
          "the project's newest run of the experiment"),
))
PUT_SECRET = Body((
    Field("name", str, True, "secret name (an environment variable name)"),
    Field("type", str, True, "api_key | password | token | certificate | generic"),
    Field("value", str, True, "the value; write-only, never returned. UTF-8 text without NUL, at most "
          f"{secret_limits.MAX_VALUE_BYTES} bytes ({secret_limits.MAX_VALUE_BYTES // 1024} KiB) of UTF-8 "
          "(413 beyond)", plain_text=False),
    Field("environment_id", str, description=ENV_FIELD_DOC + "; absent = project scope"),
))
ROLLBACK_SECRET = Body((
    Field("to_version", int, True, "the version whose value (and type) becomes a new version; not a deletion, "
          "not the current one", minimum=1, maximum=2**63 - 1),
    Field("environment_id", str, description=ENV_FIELD_DOC + "; absent = project scope"),
))


# --------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One API request after routing: the key, path parameters, query."""

    api_key: str
    params: dict[str, str]
    query: dict[str, str]
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names


ApiHandler = Callable[["RestApi", Call], Awaitable[PlatformResponse]]


@dataclass(frozen=True)
class Operation:
    method: str
    path: str  # below /api/v1, with {id} parameters
    handler: ApiHandler
    operation_id: str
    summary: str
    body: Body | None = None
    query: tuple[tuple[str, str], ...] = ()  # (name, description)
    response: str = ""  # schema name in openapi.py
    auth: bool = True
    stream: bool = False  # text/event-stream instead of JSON
    stream_optional: bool = False  # JSON, or text/event-stream when asked (?follow=true)

    @property
    def segments(self) -> list[str]:
        return [s for s in self.path.split("/") if s]


class Services:
    """gRPC stubs of the services the API translates to."""

    def __init__(self, registry: str, secrets: str, scheduler: str) -> None:
        self._channels = [channel(registry, "registry"), channel(secrets, "secrets"), channel(scheduler, "scheduler")]
        self.registry = registry_pb2_grpc.RegistryStub(self._channels[0])
        self.secrets = secrets_pb2_grpc.SecretsStub(self._channels[1])
        self.scheduler = scheduler_pb2_grpc.SchedulerStub(self._channels[2])

    async def close(self) -> None:
        for ch in self._channels:
            await ch.close()


class RestApi:
    def __init__(
        self,
        services: Services,
        state: RoutingState,
        *,
        deadline: float = 10.0,
        routing_wait: float = 5.0,
        read_retry_within: float = 3.0,
        workers: SharedState | None = None,
        routers: Callable[[float], Awaitable[Any]] | None = None,
        router_name: str = "",
    ) -> None:
        """``workers``: with several router processes on one port, what they
        share (a pointer move is "routed" once every one of them routes by it).
        ``routers``: asks the scheduler which router processes are alive and
        the revision each routes by (``SchedulerInternal.ListRouters``, given
        a timeout); a move is "routed" once every live router instance routes
        by it. ``router_name``: this router instance, as it reports itself."""
        self.services = services
        self.state = state
        self.workers = workers
        self.routers = routers
        self.router_name = router_name
        self._peers_seen = False  # another router instance has reported to the scheduler
        self.deadline = deadline
        self.routing_wait = routing_wait
        self.read_retry_within = read_retry_within

    # -- dispatch ------------------------------------------------------------
    async def handle(self, request: PlatformRequest) -> PlatformResponse:
        try:
            return await self._dispatch(request)
        except ApiError as exc:
            return exc.response()

    async def _dispatch(self, request: PlatformRequest) -> PlatformResponse:
        rest = request.path[len(PREFIX):]
        raw_segments = [s for s in rest.split("/") if s]
        try:
            segments = [urllib.parse.unquote(s, errors="strict") for s in raw_segments]
        except UnicodeDecodeError:
            raise bad("path", "is not valid percent-encoded UTF-8") from None
        method = "GET" if request.method == "HEAD" else request.method
        allowed: list[str] = []
        for op in OPERATIONS:
            params = _match(op.segments, segments)
            if params is None:
                continue
            if op.method != method:
                allowed.append(op.method)
                continue
            for name, value in params.items():
                check_text(name, value, required=True)
            api_key = ""
            if op.auth:
                api_key = request.headers.get("x-api-key", "").strip()
                if not api_key:
                    raise ApiError(401, "unauthenticated", "no API key: send it in the X-API-KEY header")
                if not api_key.isascii() or not api_key.isprintable():
                    raise ApiError(401, "unauthenticated", "the API key is not valid (mistyped or revoked)")
            try:
                query = dict(urllib.parse.parse_qsl(request.query, keep_blank_values=True, errors="strict"))
            except UnicodeDecodeError:
                raise bad("query", "is not valid percent-encoded UTF-8") from None
            for name, _ in op.query:
                if name in query:
                    check_text(name, query[name], required=False)
            if len(request.body) > MAX_API_BODY_BYTES:
                raise ApiError(413, "body_too_large", f"the request body is {len(request.body)} bytes; this API "
                               f"accepts at most {MAX_API_BODY_BYTES} bytes")
            return await op.handler(self, Call(api_key, params, query, request.body, request.headers))
        if allowed:
            allowed = sorted(set(allowed))
            return error_response(405, "method_not_allowed", f"{request.path} accepts {', '.join(allowed)}",
                                  [("Allow", ", ".join(allowed))])
        return error_response(404, "not_found", f"no API endpoint {request.method} {request.path}; the API is "
                               f"described at {PREFIX}/openapi.json")

    # -- calling the services --------------------------------------------------
    async def rpc(self, service: str, method: Callable[..., Any], message: Message, key: str, *,
                  retry: bool = False) -> Any:
        """One call carrying the caller's key; reads (``retry``) are retried
        while the service is UNAVAILABLE, for a few seconds at most."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + (self.read_retry_within if retry else 0)
        delay = 0.05
        while True:
            try:
                return await method(message, metadata=(("x-api-key", key),), timeout=self.deadline)
            except grpc.aio.AioRpcError as exc:
                if retry and exc.code() == grpc.StatusCode.UNAVAILABLE and loop.time() + delay < give_up:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.5)
                    continue
                raise ApiError.from_rpc(exc, service) from None

    # -- pointer moves ---------------------------------------------------------
    #
    # A move is sent under compare-and-swap on the environment's sequence
    # (the caller's expected_sequence, else the one read just before), so it
    # can be sent again when a registry instance dies with the call in flight
    # or answers past the deadline (did it commit?): the history then says
    # whether the entry after that sequence is this move (answered as its
    # success) or not. Until the environment has moved past that sequence
    # the move is sent again only under it (a late commit of the first send
    # and the second cannot both win); 409 when the caller fixed the
    # sequence and another move took it. A move without expected_sequence
    # that loses the swap to a concurrent move is re-read and sent again, as
    # a plain move would have won after it.

    async def _environment(self, ref: str, key: str) -> Any:
        token = ""
        for _ in range(1000):
            answer = await self.rpc("registry", self.services.registry.ListEnvironments,
                                    registry_pb2.ListEnvironmentsRequest(page_size=1000, page_token=token), key,
                                    retry=True)
            for env in answer.environments:
                if ref in (env.id, env.name):
                    return env
            token = answer.next_page_token
            if not token:
                break
        return None  # the registry names what is wrong with the reference in the move's own answer

    async def _entry(self, environment_id: str, sequence: int, key: str) -> Any:
        token = ""
        for _ in range(100_000):
            answer = await self.rpc("registry", self.services.registry.ListHistory,
                                    registry_pb2.ListHistoryRequest(environment=environment_id, page_size=1000,
                                                                    page_token=token), key, retry=True)
            for entry in answer.entries:
                if entry.sequence == sequence:
                    return entry
            token = answer.next_page_token
            if not token:
                break
        return None

    async def move(self, method: Callable[..., Any], request: Any, ref: str, key: str, *, kind: str,
                   deployment_id: str) -> PlatformResponse:
        fixed = request.HasField("expected_sequence")
        started = asyncio.get_running_loop().time()
        give_up = started + self.deadline + self.read_retry_within
        sent_unanswered: list[int] = []  # sequences a send went out under and no answer came back
        pinned = False  # such a send may still commit: send again only under its sequence
        for attempt in range(MOVE_ATTEMPTS):
            if not fixed and not pinned:
                current = await self._environment(ref, key)
                if current is None:  # no such environment: the registry says so
                    return await self.moved(await self.rpc("registry", method, request, key))
                request.expected_sequence = current.sequence
            base = request.expected_sequence
            try:
                response = await method(request, metadata=(("x-api-key", key),), timeout=self.deadline)
                return await self.moved(response)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                last = attempt == MOVE_ATTEMPTS - 1 or asyncio.get_running_loop().time() > give_up
                ambiguous = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                if ambiguous:
                    sent_unanswered.append(base)
                    pinned = True
                if not sent_unanswered:
                    if code == grpc.StatusCode.ABORTED and not fixed and not last:
                        continue  # a concurrent move won the swap: read the new sequence, move again
                    raise ApiError.from_rpc(exc, "registry") from None
                # A send went out and its answer did not come back (an instance died, or was slow past the
                # deadline and may still commit it): is the entry after one of those sequences this move? (A
                # later send may then be refused for it: ABORTED, or a precondition such as "already serves".)
                env = await self._environment(ref, key)
                if env is None:
                    raise ApiError.from_rpc(exc, "registry") from None
                for sent in sorted(set(sent_unanswered)):
                    entry = await self._entry(env.id, sent + 1, key) if env.sequence > sent else None
                    if entry is not None and entry_json(entry)["kind"] == kind and deployment_id in ("", entry.deployment_id):
                        log.info("move_settled_after_retry", extra={"environment": env.id, "sequence": sent + 1})
                        return await self.moved(registry_pb2.PointerMoveResponse(environment=env, entry=entry))
                if env.sequence > max(sent_unanswered):
                    pinned = False  # past every unanswered send's sequence: none of them can commit any more
                if not ambiguous:  # the registry answered this send, and not for an earlier one of this move
                    if code == grpc.StatusCode.ABORTED and not fixed and not last:
                        continue  # another move won the swap: read the new sequence, move again
                    raise ApiError.from_rpc(exc, "registry") from None
                if env.sequence > base and fixed:
                    raise ApiError(409, "aborted", f"environment {ref!r} moved on to sequence {env.sequence} "
                                   f"(another move), not from {base}") from None
                if last:
                    raise ApiError.from_rpc(exc, "registry") from None
                await asyncio.sleep(min(0.05 * 2**attempt, 0.5))
        raise ApiError(409, "aborted", f"environment {ref!r} kept moving; retry")  # pragma: no cover

    async def moved(self, response: registry_pb2.PointerMoveResponse) -> PlatformResponse:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.routing_wait
        routed = await self.state.wait_for_sequence(
            response.environment.id, response.entry.sequence, self.routing_wait
        )
        if routed and self.workers is not None:
            routed = await self.workers.wait_for_revision(self.state.revision, max(0.0, deadline - loop.time()))
        lagging: list[dict[str, Any]] = []
        if routed and self.routers is not None:
            lagging = await self._lagging_routers(self.state.revision, deadline)
            routed = not lagging
        if not routed:
            log.warning("routing_lagging", extra={"environment": response.environment.id,
                                                  "sequence": response.entry.sequence,
                                                  "lagging": [r["router"] for r in lagging]})
        body: dict[str, Any] = {"environment": environment_json(response.environment),
                                "entry": entry_json(response.entry), "routed": routed}
        if lagging:
            body["lagging"] = lagging
        return json_response(200, body)

    async def _lagging_routers(self, revision: int, deadline: float) -> list[dict[str, Any]]:
        """The other router instances that do not route by ``revision`` yet,
        waiting for them until ``deadline``: [] once every live router (as
        the scheduler heard from them) does. Alone (no other router ever
        heard of), a scheduler that cannot be asked changes nothing."""
        assert self.routers is not None
        loop = asyncio.get_running_loop()
        while True:
            remaining = deadline - loop.time()
            try:
                answer = await self.routers(max(0.05, min(1.0, remaining)))
            except grpc.aio.AioRpcError as exc:
                if not self._peers_seen:
                    return []
                if remaining <= 0:
                    return [{"router": "*", "revision": 0,
                             "reason": f"the scheduler, which tracks the routers, did not answer ({exc.code().name})"}]
                await asyncio.sleep(min(0.1, max(0.0, remaining)))
                continue
            behind: dict[str, int] = {}
            for process in answer.routers:
                if process.router != self.router_name:
                    self._peers_seen = True
                if process.loaded and process.revision < revision:
                    behind[process.router] = min(behind.get(process.router, revision), process.revision)
            # A scheduler listening for less than the live window may not have heard from every router
            # yet; that matters only where another router instance has ever been seen.
            complete = answer.listening_seconds >= answer.live_window_seconds or not self._peers_seen
            if not behind and complete:
                return []
            if remaining <= 0:
                lagging = [{"router": r, "revision": rev, "reason": f"routes by revision {rev}, not {revision} yet"}
                           for r, rev in sorted(behind.items())]
                if not complete and self._peers_seen:
                    lagging.append({"router": "*", "revision": 0, "reason": "the scheduler took over "
                                    f"{answer.listening_seconds:.1f} s ago and may not have heard from every router"})
                return lagging
            await asyncio.sleep(min(ROUTERS_POLL, max(0.0, remaining)))

    # -- the endpoints ---------------------------------------------------------
    async def openapi(self, call: Call) -> PlatformResponse:
        from services.router.openapi import document

        return json_response(200, document())

    async def deploy(self, call: Call) -> PlatformResponse:
        """Registers a deployment of an image reference and points an
        environment at it: Registry.Deploy, with its validation and errors.
        Sent once (a lost answer is not retried: a second call would register
        a second deployment)."""
        b = DEPLOY.parse(call.body)
        request = registry_pb2.DeployRequest(
            image=b["image"], environment=b["environment_id"] or "", confirm=b["confirm"], reason=b["reason"] or "",
            min_replicas=b["min_replicas"], max_replicas=b["max_replicas"],  # None: unset, the registry's default
            config=common_pb2.WorkerConfig(port=b["port"] or 0, health_path=b["health_path"] or ""),
            idle_pause_seconds=b["idle_pause_seconds"], idle_stop_seconds=b["idle_stop_seconds"],
        )
        if b["expected_sequence"] is not None:
            request.expected_sequence = b["expected_sequence"]
        deployed = await self.rpc("registry", self.services.registry.Deploy, request, call.api_key)
        moved = await self.moved(registry_pb2.PointerMoveResponse(environment=deployed.environment,
                                                                  entry=deployed.entry))
        body = json.loads(moved.body)
        return json_response(moved.status, {"deployment": deployment_json(deployed.deployment), **body})

    async def watch(self, call: Call) -> PlatformResponse:
        """The project's changes as server-sent events, from
        Registry.WatchEnvironments: first the current state (or, resuming,
        the changes after the revision given), a ``snapshot_complete`` event,
        then each change as it commits. ``id:`` (the registry revision) is set
        on the marker and every later event, so a client reconnecting with
        ``Last-Event-ID`` (which wins over ``?since_revision=``) misses
        nothing and gets nothing twice."""
        since = 0
        for name, raw in (("since_revision", call.query.get("since_revision", "")),
                          ("Last-Event-ID", call.headers.get("last-event-id", ""))):
            raw = raw.strip()
            if not raw:
                continue
            if not raw.isdigit() or len(raw) > 18:
                raise bad(name, f"must be a registry revision (a non-negative integer), not {raw[:40]!r}")
            since = int(raw)  # Last-Event-ID, read second, wins
        stream = self.services.registry.WatchEnvironments(
            registry_pb2.WatchEnvironmentsRequest(since_revision=since), metadata=(("x-api-key", call.api_key),),
        )
        try:
            first = await asyncio.wait_for(stream.read(), self.deadline)
        except grpc.aio.AioRpcError as exc:
            raise ApiError.from_rpc(exc, "registry") from None
        except TimeoutError:
            stream.cancel()
            raise ApiError(503, "unavailable", "the registry did not start the watch in time; retry") from None
        if first is grpc.aio.EOF:
            raise ApiError(503, "unavailable", "the registry ended the watch at once; retry")
        headers = [("Content-Type", "text/event-stream; charset=utf-8"), ("Cache-Control", "no-store"),
                   ("X-Accel-Buffering", "no")]
        return PlatformResponse(200, headers, stream=self._events(stream, first))

    async def _events(self, stream: Any, first: registry_pb2.EnvironmentEvent) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        ends = loop.time() + WATCH_MAX_SECONDS
        queue: asyncio.Queue[registry_pb2.EnvironmentEvent | None] = asyncio.Queue(maxsize=1000)

        async def pump() -> None:
            try:
                while True:  # read(), as for the first event (async-for cannot follow read())
                    event = await stream.read()
                    if event is grpc.aio.EOF:
                        break
                    await queue.put(event)
            except grpc.aio.AioRpcError as exc:
                log.info("watch_stream_ended", extra={"code": exc.code().name})
            finally:
                await queue.put(None)

        reader = asyncio.create_task(pump())
        live = False  # ids only from the snapshot_complete marker on (see watch)
        try:
            event: registry_pb2.EnvironmentEvent | None = first
            while event is not None:
                live = live or event.snapshot_complete
                yield sse_event(event, with_id=live)
                while True:
                    remaining = ends - loop.time()
                    if remaining <= 0:
                        return
                    try:
                        async with asyncio.timeout(min(WATCH_HEARTBEAT_SECONDS, remaining)):
                            event = await queue.get()
                        break
                    except TimeoutError:
                        yield b": keep-alive\n\n"
        finally:
            reader.cancel()
            stream.cancel()

    async def promote(self, call: Call) -> PlatformResponse:
        b = PROMOTE.parse(call.body)
        request = registry_pb2.PromoteRequest(
            deployment_id=b["source_deployment_id"], target_environment=b["target_environment_id"],
            min_replicas=b["min_replicas"], max_replicas=b["max_replicas"],  # None: unset, the registry's default
            scale_previous_to_zero=b["scale_previous_to_zero"], confirm=b["confirm"], reason=b["reason"] or "",
            skip_gate=b["skip_gate"],
            idle_pause_seconds=b["idle_pause_seconds"], idle_stop_seconds=b["idle_stop_seconds"],
        )
        if b["expected_sequence"] is not None:
            request.expected_sequence = b["expected_sequence"]
        return await self.move(self.services.registry.Promote, request, b["target_environment_id"], call.api_key,
                               kind="promote", deployment_id=b["source_deployment_id"])

    async def rollback(self, call: Call) -> PlatformResponse:
        b = ROLLBACK.parse(call.body)
        request = registry_pb2.RollbackRequest(
            environment=b["environment_id"], to_deployment_id=b["deployment_id"] or "", confirm=b["confirm"],
            reason=b["reason"] or "",
        )
        if b["expected_sequence"] is not None:
            request.expected_sequence = b["expected_sequence"]
        return await self.move(self.services.registry.Rollback, request, b["environment_id"], call.api_key,
                               kind="rollback", deployment_id=b["deployment_id"] or "")

    async def _adjust(self, call: Call, sign: int) -> PlatformResponse:
        b = SCALE.parse(call.body)
        request = registry_pb2.AdjustReplicasRequest(
            deployment_id=call.params["id"], environment=b["environment_id"] or "", delta=sign * b["by"]
        )
        binding = await self.rpc("registry", self.services.registry.AdjustReplicas, request, call.api_key)
        return json_response(200, {"binding": binding_json(binding)})

    async def scale(self, call: Call) -> PlatformResponse:
        b = SCALE_BOUNDS.parse(call.body)
        request = registry_pb2.ScaleBindingRequest(
            deployment_id=call.params["id"], environment=b["environment_id"] or "",
            min_replicas=b["min_replicas"], max_replicas=b["max_replicas"],
            idle_pause_seconds=b["idle_pause_seconds"], idle_stop_seconds=b["idle_stop_seconds"],
        )
        binding = await self.rpc("registry", self.services.registry.ScaleBinding, request, call.api_key)
        return json_response(200, {"binding": binding_json(binding)})

    async def create_environment(self, call: Call) -> PlatformResponse:
        b = CREATE_ENVIRONMENT.parse(call.body)
        request = registry_pb2.CreateEnvironmentRequest(name=b["name"])
        e = await self.rpc("registry", self.services.registry.CreateEnvironment, request, call.api_key)
        return json_response(200, {"environment": environment_json(e)})

    async def delete_environment(self, call: Call) -> PlatformResponse:
        b = DELETE_ENVIRONMENT.parse(call.body)
        request = registry_pb2.DeleteEnvironmentRequest(
            environment=call.params["id"], force=bool(b["force"]), confirm=bool(b["confirm"])
        )
        found = await self.rpc("registry", self.services.registry.DeleteEnvironment, request, call.api_key)
        return json_response(200, {"environment": environment_json(found.environment)})

    async def scale_up(self, call: Call) -> PlatformResponse:
        return await self._adjust(call, +1)

    async def scale_down(self, call: Call) -> PlatformResponse:
        return await self._adjust(call, -1)

    async def terminate(self, call: Call) -> PlatformResponse:
        EMPTY.parse(call.body)
        request = registry_pb2.TerminateDeploymentRequest(deployment_id=call.params["id"])
        d = await self.rpc("registry", self.services.registry.TerminateDeployment, request, call.api_key)
        return json_response(200, {"deployment": deployment_json(d)})

    async def start(self, call: Call) -> PlatformResponse:
        EMPTY.parse(call.body)
        request = registry_pb2.StartDeploymentRequest(deployment_id=call.params["id"])
        d = await self.rpc("registry", self.services.registry.StartDeployment, request, call.api_key)
        return json_response(200, {"deployment": deployment_json(d)})

    async def list_deployments(self, call: Call) -> PlatformResponse:
        request = registry_pb2.ListDeploymentsRequest(environment=call.query.get("environment_id", ""), **page(call))
        found = await self.rpc("registry", self.services.registry.ListDeployments, request, call.api_key, retry=True)
        return json_response(200, {"deployments": [deployment_json(d) for d in found.deployments],
                                   "next_page_token": found.next_page_token})

    async def get_deployment(self, call: Call) -> PlatformResponse:
        request = registry_pb2.GetDeploymentRequest(deployment_id=call.params["id"])
        d = await self.rpc("registry", self.services.registry.GetDeployment, request, call.api_key, retry=True)
        return json_response(200, deployment_json(d))

    async def deployment_status(self, call: Call) -> PlatformResponse:
        request = scheduler_pb2.GetDeploymentStatusRequest(
            deployment_id=call.params["id"], environment=call.query.get("environment_id", "")
        )
        s = await self.rpc("scheduler", self.services.scheduler.GetDeploymentStatus, request, call.api_key, retry=True)
        return json_response(200, status_json(s))

    async def deployment_errors(self, call: Call) -> PlatformResponse:
        request = scheduler_pb2.ListDeploymentErrorsRequest(deployment_id=call.params["id"], **page(call))
        found = await self.rpc("scheduler", self.services.scheduler.ListDeploymentErrors, request, call.api_key,
                               retry=True)
        return json_response(200, {"deployment_id": call.params["id"], "errors": [error_json(e) for e in found.errors],
                                   "next_page_token": found.next_page_token})

    # -- replica logs (issue 16) ------------------------------------------------
    async def deployment_logs(self, call: Call) -> PlatformResponse:
        """Scheduler.StreamDeploymentLogs: the lines as one JSON answer, or
        with ``follow=true`` as server-sent events (``event: line``, ``data:``
        a line's JSON), a heartbeat comment every 15 s, ending after an hour.
        A client reading too slowly holds the scheduler's readers back (gRPC
        flow control), never its memory, and the proxy drops it."""
        q = call.query
        request = scheduler_pb2.StreamDeploymentLogsRequest(
            deployment_id=call.params["id"], environment=q.get("environment_id", ""), replica=q.get("replica", ""),
        )
        tail = q.get("tail", "").strip()
        if tail:
            if not tail.isdigit() or len(tail) > 6:
                raise bad("tail", f"must be a whole number from 0 to 10000, not {tail[:40]!r}")
            request.tail = int(tail)  # above 10000: the scheduler's INVALID_ARGUMENT names it
        since = q.get("since", "").strip()
        if since:
            request.since.FromDatetime(_log_since(since))
        follow = q.get("follow", "").strip().lower()
        if follow not in ("", "true", "false", "1", "0"):
            raise bad("follow", f"must be true or false, not {follow[:40]!r}")
        request.follow = follow in ("true", "1")
        stream = self.services.scheduler.StreamDeploymentLogs(
            request, metadata=(("x-api-key", call.api_key),),
            timeout=None if request.follow else self.deadline * 6,
        )
        try:
            started = await asyncio.wait_for(stream.initial_metadata(), self.deadline)
            if not any(k == "berth-logs-started" for k, _ in (started or ())):
                await stream.read()  # refused: raises the scheduler's error
                raise ApiError(503, "unavailable", "the scheduler ended the logs at once; retry")
            if not request.follow:
                lines = []
                async for line in stream:
                    lines.append(log_line_json(line))
                return json_response(200, {"deployment_id": call.params["id"], "lines": lines})
        except grpc.aio.AioRpcError as exc:
            raise ApiError.from_rpc(exc, "scheduler") from None
        except TimeoutError:
            stream.cancel()
            raise ApiError(503, "unavailable", "the scheduler did not start the logs in time; retry") from None
        headers = [("Content-Type", "text/event-stream; charset=utf-8"), ("Cache-Control", "no-store"),
                   ("X-Accel-Buffering", "no")]
        return PlatformResponse(200, headers, stream=self._log_events(stream))

    async def _log_events(self, stream: Any) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        ends = loop.time() + WATCH_MAX_SECONDS
        try:
            while True:
                remaining = ends - loop.time()
                if remaining <= 0:
                    return
                try:
                    async with asyncio.timeout(min(WATCH_HEARTBEAT_SECONDS, remaining)):
                        line = await stream.read()
                except TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                if line is grpc.aio.EOF:
                    return
                yield b"event: line\ndata: " + json.dumps(log_line_json(line)).encode() + b"\n\n"
        except grpc.aio.AioRpcError as exc:
            log.info("logs_stream_ended", extra={"code": exc.code().name})
        finally:
            stream.cancel()

    async def list_environments(self, call: Call) -> PlatformResponse:
        found = await self.rpc("registry", self.services.registry.ListEnvironments,
                               registry_pb2.ListEnvironmentsRequest(**page(call)), call.api_key, retry=True)
        return json_response(200, {"environments": [environment_json(e) | {"fallback": self.fallback(e.id)}
                                                    for e in found.environments],
                                   "next_page_token": found.next_page_token})

    def fallback(self, environment_id: str) -> dict[str, str] | None:
        """Whether this router serves the environment by its previous
        deployment because the current one failed (the proxy's own rule,
        ``RoutingTable.resolve``): which deployment, and since when."""
        env = self.state.table.environments.get(environment_id)
        if env is None or not env.deployment_id:
            return None
        try:
            route = self.state.table.resolve(env.project_id, env.id, "", self.state.endpoints)
        except RouteError:
            return None
        if not route.fallback:
            return None
        since = self.state.endpoints.failed_since((env.id, env.deployment_id))
        stamp = "" if since is None else datetime.datetime.fromtimestamp(since, datetime.UTC).isoformat(
            timespec="milliseconds").replace("+00:00", "Z")
        return {"deployment_id": route.deployment_id, "since": stamp}

    # ---- canaries (issue 20) ----

    @staticmethod
    def _canary_json(resp: registry_pb2.CanaryResponse) -> dict[str, Any]:
        e = resp.environment
        out: dict[str, Any] = {"environment": environment_json(e),
                               "canary": canary_json(e.canary) if e.HasField("canary") else None}
        if resp.HasField("entry"):
            out["entry"] = entry_json(resp.entry)
        return out

    async def get_canary(self, call: Call) -> PlatformResponse:
        request = registry_pb2.GetCanaryRequest(environment=call.params["id"])
        found = await self.rpc("registry", self.services.registry.GetCanary, request, call.api_key, retry=True)
        return json_response(200, self._canary_json(found))

    async def start_canary(self, call: Call) -> PlatformResponse:
        b = START_CANARY.parse(call.body)
        try:
            steps = parse_canary_plan(b["plan"])
        except BerthInvalidArgument as exc:
            raise bad("plan", exc.message) from None
        request = registry_pb2.StartCanaryRequest(
            environment=call.params["id"], deployment_id=b["deployment_id"],
            steps=[common_pb2.Canary.Step(weight=w, bake_seconds=d) for w, d in steps],
            thresholds=common_pb2.Canary.Thresholds(
                max_error_rate_increase=b["max_error_rate_increase"] or 0,
                max_latency_ratio=b["max_latency_ratio"] or 0, min_requests=b["min_requests"] or 0),
            min_replicas=b["min_replicas"], max_replicas=b["max_replicas"], confirm=b["confirm"],
            reason=b["reason"] or "", skip_gate=b["skip_gate"],
        )
        if b["expected_sequence"] is not None:
            request.expected_sequence = b["expected_sequence"]
        started = await self.rpc("registry", self.services.registry.StartCanary, request, call.api_key)
        return json_response(200, self._canary_json(started))

    async def _canary_action(self, call: Call, method: str, request_type: Any) -> PlatformResponse:
        b = CANARY_ACTION.parse(call.body)
        fields: dict[str, Any] = {"environment": call.params["id"], "reason": b["reason"] or ""}
        if method == "PromoteCanaryNow":
            fields["confirm"] = b["confirm"]
        request = request_type(**fields)
        if b["expected_sequence"] is not None:
            request.expected_sequence = b["expected_sequence"]
        done = await self.rpc("registry", getattr(self.services.registry, method), request, call.api_key)
        return json_response(200, self._canary_json(done))

    async def pause_canary(self, call: Call) -> PlatformResponse:
        return await self._canary_action(call, "PauseCanary", registry_pb2.PauseCanaryRequest)

    async def resume_canary(self, call: Call) -> PlatformResponse:
        return await self._canary_action(call, "ResumeCanary", registry_pb2.ResumeCanaryRequest)

    async def abort_canary(self, call: Call) -> PlatformResponse:
        return await self._canary_action(call, "AbortCanary", registry_pb2.AbortCanaryRequest)

    async def promote_canary_now(self, call: Call) -> PlatformResponse:
        return await self._canary_action(call, "PromoteCanaryNow", registry_pb2.PromoteCanaryNowRequest)

    async def promotions(self, call: Call) -> PlatformResponse:
        request = registry_pb2.ListHistoryRequest(environment=call.params["id"], **page(call))
        found = await self.rpc("registry", self.services.registry.ListHistory, request, call.api_key, retry=True)
        return json_response(200, {"environment": call.params["id"], "entries": [entry_json(h) for h in found.entries],
                                   "next_page_token": found.next_page_token})

    async def list_experiment_runs(self, call: Call) -> PlatformResponse:
        request = registry_pb2.ListExperimentRunsRequest(
            deployment_id=call.query.get("deployment_id", ""), name=call.query.get("name", ""), **page(call))
        found = await self.rpc("registry", self.services.registry.ListExperimentRuns, request, call.api_key,
                               retry=True)
        return json_response(200, {"runs": [run_json(r) for r in found.runs],
                                   "next_page_token": found.next_page_token})

    async def get_experiment_run(self, call: Call) -> PlatformResponse:
        request = registry_pb2.GetExperimentRunRequest(run_id=call.params["id"])
        r = await self.rpc("registry", self.services.registry.GetExperimentRun, request, call.api_key, retry=True)
        return json_response(200, run_json(r))

    async def list_gates(self, call: Call) -> PlatformResponse:
        found = await self.rpc("registry", self.services.registry.ListEnvironmentGates,
                               registry_pb2.ListEnvironmentGatesRequest(), call.api_key, retry=True)
        return json_response(200, {"gates": [gate_json(g) for g in found.gates]})

    async def set_gate(self, call: Call) -> PlatformResponse:
        b = SET_GATE.parse(call.body)
        request = registry_pb2.SetEnvironmentGateRequest(
            environment=call.params["id"], experiment=b["experiment"], threshold=b["threshold"],
            dataset_digest=b["dataset_digest"] or "")
        g = await self.rpc("registry", self.services.registry.SetEnvironmentGate, request, call.api_key)
        return json_response(200, {"gate": gate_json(g)})

    async def clear_gate(self, call: Call) -> PlatformResponse:
        EMPTY.parse(call.body)
        request = registry_pb2.ClearEnvironmentGateRequest(environment=call.params["id"])
        found = await self.rpc("registry", self.services.registry.ClearEnvironmentGate, request, call.api_key)
        return json_response(200, {"environment": call.params["id"], "cleared": found.cleared})

    async def list_secrets(self, call: Call) -> PlatformResponse:
        request = secrets_pb2.ListSecretsRequest(environment=call.query.get("environment_id", ""), **page(call))
        found = await self.rpc("secrets", self.services.secrets.ListSecrets, request, call.api_key, retry=True)
        return json_response(200, {"secrets": [secret_json(s) for s in found.secrets],
                                   "next_page_token": found.next_page_token})

    async def put_secret(self, call: Call) -> PlatformResponse:
        b = PUT_SECRET.parse(call.body)
        # The secrets service checks the same rules; answering here gives a
        # value too large its own status (413) rather than a 400.
        problem = secret_limits.value_content_problem(b["value"])
        if problem:
            raise bad("value", problem)
        problem = secret_limits.value_size_problem(b["value"])
        if problem:
            raise ApiError(413, "value_too_large", f"value: {problem}")
        request = secrets_pb2.SetSecretRequest(
            name=b["name"], type=b["type"], value=b["value"], environment=b["environment_id"] or ""
        )
        info = await self.rpc("secrets", self.services.secrets.SetSecret, request, call.api_key)
        return json_response(200, {"secret": secret_json(info)})

    async def secret_versions(self, call: Call) -> PlatformResponse:
        request = secrets_pb2.ListSecretVersionsRequest(
            name=call.params["name"], environment=call.query.get("environment_id", ""), **page(call)
        )
        found = await self.rpc("secrets", self.services.secrets.ListSecretVersions, request, call.api_key, retry=True)
        return json_response(200, {"name": call.params["name"], "versions": [secret_json(v) for v in found.versions],
                                   "next_page_token": found.next_page_token})

    async def rollback_secret(self, call: Call) -> PlatformResponse:
        b = ROLLBACK_SECRET.parse(call.body)
        request = secrets_pb2.RollbackSecretRequest(
            name=call.params["name"], environment=b["environment_id"] or "", to_version=b["to_version"]
        )
        info = await self.rpc("secrets", self.services.secrets.RollbackSecret, request, call.api_key)
        return json_response(200, {"secret": secret_json(info)})


def _log_since(value: str) -> datetime.datetime:
    """``since`` of the logs: an RFC 3339 time, or a duration back from now
    (``90s``, ``10m``, ``2h``, ``1d``)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if value[-1:].lower() in units and value[:-1].isdigit() and len(value) < 12:
        back = datetime.timedelta(seconds=int(value[:-1]) * units[value[-1:].lower()])
        return datetime.datetime.now(datetime.UTC) - back
    try:
        when = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise bad("since", f"must be an RFC 3339 time or a duration such as 10m, not {value[:40]!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=datetime.UTC)


def _match(template: list[str], segments: list[str]) -> dict[str, str] | None:
    if len(template) != len(segments):
        return None
    params: dict[str, str] = {}
    for t, s in zip(template, segments, strict=True):
        if t.startswith("{"):
            params[t[1:-1]] = s
        elif t != s:
            return None
    return params


ENVIRONMENT_QUERY = (("environment_id", "only what concerns this environment (" + ENV_FIELD_DOC + ")"),)
PAGE_QUERY = (
    ("page_size", "items per page: 0 or absent means 100, at most 1000"),
    ("page_token", "next_page_token of the previous page (absent for the first)"),
)
OPERATIONS: tuple[Operation, ...] = (
    Operation("GET", "/openapi.json", RestApi.openapi, "getOpenApi", "This document", auth=False),
    Operation("GET", "/watch", RestApi.watch, "watch",
              "The project's changes as server-sent events (pointer moves, environments, bindings), resumable",
              query=(("since_revision", "resume after this registry revision (the id of the last event applied); "
                      "absent or 0: the current state first. A Last-Event-ID header wins over it"),),
              response="EventStream", stream=True),
    Operation("POST", "/deployments", RestApi.deploy, "deploy",
              "Register a deployment of an image reference and point an environment at it", DEPLOY,
              response="Deployed"),
    Operation("POST", "/deployments/promote", RestApi.promote, "promote",
              "Point an environment at a deployment", PROMOTE, response="PointerMove"),
    Operation("POST", "/deployments/rollback", RestApi.rollback, "rollback",
              "Point an environment back at its previously serving deployment", ROLLBACK, response="PointerMove"),
    Operation("POST", "/deployments/{id}/scale-up", RestApi.scale_up, "scaleUp",
              "Raise a binding's minimum replicas (the maximum widens when needed)", SCALE,
              response="BindingResult"),
    Operation("POST", "/deployments/{id}/scale-down", RestApi.scale_down, "scaleDown",
              "Lower a binding's minimum replicas (down to zero)", SCALE, response="BindingResult"),
    Operation("POST", "/deployments/{id}/scale", RestApi.scale, "scale",
              "Set a binding's replica bounds", SCALE_BOUNDS, response="BindingResult"),
    Operation("POST", "/deployments/{id}/terminate", RestApi.terminate, "terminate",
              "Stop every replica of the deployment; the record and image stay", EMPTY,
              response="DeploymentResult"),
    Operation("POST", "/deployments/{id}/start", RestApi.start, "start",
              "Bring a terminated deployment's bindings back to their bounds", EMPTY, response="DeploymentResult"),
    Operation("GET", "/deployments", RestApi.list_deployments, "listDeployments",
              "Deployments of the project, newest first, one page at a time",
              query=ENVIRONMENT_QUERY + PAGE_QUERY, response="DeploymentList"),
    Operation("GET", "/deployments/{id}", RestApi.get_deployment, "getDeployment", "One deployment",
              response="Deployment"),
    Operation("GET", "/deployments/{id}/status", RestApi.deployment_status, "getDeploymentStatus",
              "Bindings and replicas of a deployment", query=ENVIRONMENT_QUERY, response="DeploymentStatus"),
    Operation("GET", "/deployments/{id}/errors", RestApi.deployment_errors, "listDeploymentErrors",
              "Folded scheduling, pull, crash and health errors, most recently seen first, one page at a time",
              query=PAGE_QUERY, response="DeploymentErrors"),
    Operation("GET", "/deployments/{id}/logs", RestApi.deployment_logs, "getDeploymentLogs",
              "Lines the deployment's replicas printed, merged in time order; with follow=true, server-sent "
              "events as they are printed (replicas started later join)",
              query=(("environment_id", "only this environment's replicas (name or id)"),
                     ("replica", "only this replica: its id (or a prefix of at least 4), container name or index"),
                     ("since", "only lines from this time on: RFC 3339, or a duration back from now (10m, 2h, 1d)"),
                     ("tail", "only the last N lines (0 to 10000; absent: all, at most the last 10000)"),
                     ("follow", "true: keep the stream open as server-sent events (event `line`)")),
              response="LogLines", stream_optional=True),
    Operation("GET", "/environments", RestApi.list_environments, "listEnvironments",
              "Environments of the project, oldest first, one page at a time", query=PAGE_QUERY,
              response="EnvironmentList"),
    Operation("POST", "/environments", RestApi.create_environment, "createEnvironment",
              "Create an environment", CREATE_ENVIRONMENT, response="EnvironmentResult"),
    Operation("DELETE", "/environments/{id}", RestApi.delete_environment, "deleteEnvironment",
              "Delete an environment (with force, also one that points somewhere, with its bindings and history)",
              DELETE_ENVIRONMENT, response="EnvironmentResult"),
    Operation("GET", "/environments/{id}/promotions", RestApi.promotions, "listPromotions",
              "Promotion history of an environment (" + ENV_FIELD_DOC + "), oldest first, one page at a time",
              query=PAGE_QUERY, response="History"),
    Operation("GET", "/environments/{id}/canary", RestApi.get_canary, "getCanary",
              "An environment's canary (null when it has none since its last pointer move): weights, step, "
              "thresholds, last analysis", response="CanaryResult"),
    Operation("POST", "/environments/{id}/canary", RestApi.start_canary, "startCanary",
              "Start a canary of a deployment into the environment: the candidate takes each step's weight of new "
              "requests for its bake time while the scheduler's analysis passes, then the environment is promoted "
              "to it; a failing analysis sets it to 0% at once", START_CANARY, response="CanaryResult"),
    Operation("POST", "/environments/{id}/canary/pause", RestApi.pause_canary, "pauseCanary",
              "Hold a running canary at its weight", CANARY_ACTION, response="CanaryResult"),
    Operation("POST", "/environments/{id}/canary/resume", RestApi.resume_canary, "resumeCanary",
              "Resume a paused canary (its step bakes again from now)", CANARY_ACTION, response="CanaryResult"),
    Operation("POST", "/environments/{id}/canary/abort", RestApi.abort_canary, "abortCanary",
              "End a canary with the candidate at 0%", CANARY_ACTION, response="CanaryResult"),
    Operation("POST", "/environments/{id}/canary/promote-now", RestApi.promote_canary_now, "promoteCanaryNow",
              "End a canary at once by promoting the candidate (100%)", CANARY_ACTION, response="CanaryResult"),
    Operation("GET", "/experiments/runs", RestApi.list_experiment_runs, "listExperimentRuns",
              "Experiment runs of the project, newest first, one page at a time (without per-case results)",
              query=(("deployment_id", "only runs of this deployment"), ("name", "only runs of this experiment"))
              + PAGE_QUERY, response="ExperimentRunList"),
    Operation("GET", "/experiments/runs/{id}", RestApi.get_experiment_run, "getExperimentRun",
              "One experiment run with its per-case results", response="ExperimentRun"),
    Operation("GET", "/gates", RestApi.list_gates, "listGates",
              "The gates of the project's environments (promotions into them need a passing run)",
              response="GateList"),
    Operation("PUT", "/environments/{id}/gate", RestApi.set_gate, "setGate",
              "Make promotions into an environment need a passing experiment run (replaces its gate); rollback "
              "is not gated, a deploy straight into a gated environment is refused (412)", SET_GATE,
              response="GateResult"),
    Operation("DELETE", "/environments/{id}/gate", RestApi.clear_gate, "clearGate",
              "Remove an environment's gate", EMPTY, response="GateCleared"),
    Operation("GET", "/secrets", RestApi.list_secrets, "listSecrets",
              "Secrets (never their values) by name, one page at a time; with environment_id, what that "
              "environment resolves",
              query=ENVIRONMENT_QUERY + PAGE_QUERY, response="SecretList"),
    Operation("PUT", "/secrets", RestApi.put_secret, "putSecret", "Set a secret (a new version)", PUT_SECRET,
              response="SecretResult"),
    Operation("GET", "/secrets/{name}/versions", RestApi.secret_versions, "listSecretVersions",
              "Every version of a secret in one scope (never the values), oldest first, one page at a time",
              query=(("environment_id", "the environment's own secret (" + ENV_FIELD_DOC + "); absent = project "
                      "scope"),) + PAGE_QUERY, response="SecretVersions"),
    Operation("POST", "/secrets/{name}/rollback", RestApi.rollback_secret, "rollbackSecret",
              "Restore an earlier version's value as a new version", ROLLBACK_SECRET, response="SecretResult"),
)
