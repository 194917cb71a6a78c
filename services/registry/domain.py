"""Pure rules of the registry: validation, identifiers and pointer moves.

Nothing here touches storage or gRPC; the service layer calls these with plain
values and persists what they decide.
"""
from __future__ import annotations

import math
import re
import secrets as _secrets
from dataclasses import dataclass, field
from enum import StrEnum

from berth.errors import FailedPrecondition, InvalidArgument

DEFAULT_ENVIRONMENTS = ("preview", "staging", "production")
PROTECTED_ENVIRONMENTS = frozenset({"production"})
DEFAULT_DEPLOY_ENVIRONMENT = "preview"
DEFAULT_MIN_REPLICAS = 1
DEFAULT_MAX_REPLICAS = 3
MAX_REPLICAS_LIMIT = 100
DEFAULT_PORT = 8080
MIN_MEMORY_BYTES = 6 * 1024 * 1024  # the engine refuses smaller limits
MAX_REASON_LENGTH = 500
MAX_REPLICA_DELTA = MAX_REPLICAS_LIMIT
MAX_CPUS = 1024.0
MAX_MEMORY_BYTES = 1 << 50  # 1 PiB: anything above is a typo
MAX_REFERENCE_LENGTH = 80
API_KEY_ID_PREFIX = "key_"

PROJECT_ID_PREFIX = "prj_"
ENVIRONMENT_ID_PREFIX = "env_"
DEPLOYMENT_ID_PREFIX = "dep_"

# Names appear in host names ({environment}.{project}.{domain}), so they are
# DNS labels: lowercase letters, digits and dashes, starting with a letter.
NAME_PATTERN = re.compile(r"^[a-z](?:[a-z0-9-]{0,38}[a-z0-9])?$")
# What a reference to a project, environment, deployment or key (a name or an
# id) may look like at all; anything else cannot exist and is a caller error.
REFERENCE_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")
ENV_VAR_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
RESERVED_VARIABLE_PREFIX = "BERTH_"
RESERVED_VARIABLES = frozenset({"PORT"})

# Docker's reference grammar: [domain[:port]/]path[:tag][@digest], or a bare
# content-addressed image id.
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*(?::[0-9]+)?"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_NAME = rf"(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
IMAGE_REFERENCE_PATTERN = re.compile(rf"^{_NAME}(?::{_TAG})?(?:@{_DIGEST})?$")
IMAGE_ID_PATTERN = re.compile(r"^sha256:[0-9a-f]{64}$")
MAX_IMAGE_REFERENCE_LENGTH = 255


class MoveKind(StrEnum):
    DEPLOY = "deploy"
    PROMOTE = "promote"
    ROLLBACK = "rollback"
    CANARY = "canary"  # a canary's weight changed; the pointer stays (services/registry/canary.py)


class Lifecycle(StrEnum):
    ACTIVE = "active"
    TERMINATED = "terminated"


def new_id(prefix: str) -> str:
    # 60 random bits in lowercase base32-ish hex: short enough to type, unique
    # enough for a control plane.
    return prefix + _secrets.token_hex(6)


def validate_name(value: str, *, field_name: str, field: str = "name") -> str:
    """``field_name`` says it in words, ``field`` is the request field."""
    if not value:
        raise InvalidArgument(f"{field_name} is required", field=field)
    if len(value) > 40:
        raise InvalidArgument(f"{field_name} is {len(value)} characters long; at most 40 are allowed", field=field)
    if not NAME_PATTERN.match(value):
        raise InvalidArgument(
            f"{field_name} {value!r} is not valid: use lowercase letters, digits and dashes, "
            "starting with a letter and not ending with a dash",
            field=field,
        )
    return value


def validate_reference(value: str, *, field_name: str, what: str) -> str:
    """Syntax check of a name-or-id used to look something up: an unknown one
    is NOT_FOUND later, an impossible one is INVALID_ARGUMENT now."""
    if not value:
        raise InvalidArgument(f"{field_name} is required: give the {what}'s name or id", field=field_name)
    if len(value) > MAX_REFERENCE_LENGTH:
        raise InvalidArgument(
            f"{field_name} is {len(value)} characters long; at most {MAX_REFERENCE_LENGTH} are allowed",
            field=field_name, reason="INVALID_ID",
        )
    if not REFERENCE_PATTERN.match(value):
        raise InvalidArgument(
            f"{field_name} {value!r} is not a valid {what} name or id "
            "(letters, digits, '-', '_' and '.' only)",
            field=field_name, reason="INVALID_ID",
        )
    return value


def _check_text(value: str, *, field_name: str, field: str = "") -> None:
    field = field or field_name
    if "\x00" in value:
        raise InvalidArgument(f"{field_name} must not contain NUL characters", field=field)


def validate_image(image: str, image_id: str) -> None:
    if not image:
        raise InvalidArgument("image is required: give an image reference such as 'registry.example/app:1.2'", field="image")
    if len(image) > MAX_IMAGE_REFERENCE_LENGTH:
        raise InvalidArgument(f"image reference is longer than {MAX_IMAGE_REFERENCE_LENGTH} characters")
    if not (IMAGE_REFERENCE_PATTERN.match(image) or IMAGE_ID_PATTERN.match(image)):
        raise InvalidArgument(
            f"image {image!r} is not a valid image reference "
            "(expected [registry/]name[:tag][@sha256:digest], lowercase name)"
        )
    if image_id and not IMAGE_ID_PATTERN.match(image_id):
        raise InvalidArgument(f"image_id {image_id!r} must be a content-addressed id 'sha256:<64 hex digits>'")


@dataclass(frozen=True)
class Resources:
    memory_bytes: int = 0
    cpus: float = 0.0


@dataclass(frozen=True)
class WorkerConfig:
    port: int = DEFAULT_PORT
    command: tuple[str, ...] = ()
    health_path: str = "/"
    variables: dict[str, str] = field(default_factory=dict)
    resources: Resources = Resources()

    def to_json(self) -> dict:
        return {
            "port": self.port,
            "command": list(self.command),
            "health_path": self.health_path,
            "variables": dict(sorted(self.variables.items())),
            "resources": {"memory_bytes": self.resources.memory_bytes, "cpus": self.resources.cpus},
        }

    @classmethod
    def from_json(cls, data: dict) -> WorkerConfig:
        res = data.get("resources") or {}
        return cls(
            port=int(data.get("port") or DEFAULT_PORT),
            command=tuple(data.get("command") or ()),
            health_path=data.get("health_path") or "/",
            variables=dict(data.get("variables") or {}),
            resources=Resources(memory_bytes=int(res.get("memory_bytes") or 0), cpus=float(res.get("cpus") or 0.0)),
        )


def validate_config(config: WorkerConfig) -> WorkerConfig:
    """Returns the config with defaults filled in, or raises naming the field."""
    port = config.port or DEFAULT_PORT
    if not 1 <= port <= 65535:
        raise InvalidArgument(f"config.port {port} is out of range 1-65535")
    health_path = config.health_path or "/"
    if (
        not health_path.startswith("/")
        or any(c.isspace() or not c.isprintable() for c in health_path)
        or len(health_path) > 1024
    ):
        raise InvalidArgument(f"config.health_path {health_path!r} must be an absolute URL path such as '/healthz'")
    for name in config.variables:
        if not ENV_VAR_PATTERN.match(name):
            raise InvalidArgument(f"config.variables: {name!r} is not a valid environment variable name")
        if name in RESERVED_VARIABLES or name.startswith(RESERVED_VARIABLE_PREFIX):
            raise InvalidArgument(f"config.variables: {name!r} is set by Berth itself and cannot be overridden")
    for name, value in config.variables.items():
        if len(value) > 32768:
            raise InvalidArgument(f"config.variables: the value of {name!r} is longer than 32768 characters")
        _check_text(value, field_name=f"config.variables[{name!r}]", field="config.variables")
    if len(config.variables) > 1000:
        raise InvalidArgument("config.variables has more than 1000 entries")
    if len(config.command) > 256 or any(len(part) > 4096 for part in config.command):
        raise InvalidArgument("config.command is too long (at most 256 parts of 4096 characters)")
    for part in config.command:
        _check_text(part, field_name="config.command")
    resources = config.resources
    if not math.isfinite(resources.cpus):
        raise InvalidArgument("config.resources.cpus must be a finite number")
    if resources.memory_bytes < 0 or resources.cpus < 0:
        raise InvalidArgument(
            "config.resources must not be negative",
            field="config.resources.cpus" if resources.cpus < 0 else "config.resources.memory_bytes",
        )
    if resources.cpus > MAX_CPUS:
        raise InvalidArgument(f"config.resources.cpus {resources.cpus} is above the limit of {MAX_CPUS:g}")
    if resources.memory_bytes > MAX_MEMORY_BYTES:
        raise InvalidArgument(f"config.resources.memory_bytes {resources.memory_bytes} is above the limit of 1 PiB")
    if 0 < resources.memory_bytes < MIN_MEMORY_BYTES:
        raise InvalidArgument(f"config.resources.memory_bytes must be at least {MIN_MEMORY_BYTES} (6 MiB) or 0")
    return WorkerConfig(
        port=port,
        command=tuple(config.command),
        health_path=health_path,
        variables=dict(config.variables),
        resources=resources,
    )


@dataclass(frozen=True)
class ReplicaBounds:
    min_replicas: int
    max_replicas: int


def resolve_bounds(
    requested_min: int | None, requested_max: int | None, *, fallback: ReplicaBounds | None = None
) -> ReplicaBounds:
    """Bounds for a binding (Deploy, Promote). A bound given is taken as
    given (0 is a real minimum); ``None`` means not given: the fallback's (an
    existing binding's bounds), else the defaults, the minimum 1 and the
    maximum the larger of the minimum and 3. An unset minimum never passes a
    given maximum."""
    for name, value in (("min_replicas", requested_min), ("max_replicas", requested_max)):
        if value is not None and value < 0:
            raise InvalidArgument(f"{name} {value} must not be negative", field=name)
    base = fallback or ReplicaBounds(DEFAULT_MIN_REPLICAS, DEFAULT_MAX_REPLICAS)
    if requested_min is not None:
        minimum = requested_min
    elif requested_max is not None:
        minimum = min(base.min_replicas, requested_max)
    else:
        minimum = base.min_replicas
    maximum = requested_max if requested_max is not None else max(base.max_replicas, minimum)
    return _checked(minimum, maximum)


def _checked(minimum: int, maximum: int) -> ReplicaBounds:
    if maximum < 1:
        raise InvalidArgument(f"max_replicas {maximum} must be at least 1", field="max_replicas")
    if maximum > MAX_REPLICAS_LIMIT:
        raise InvalidArgument(f"max_replicas {maximum} is above the limit of {MAX_REPLICAS_LIMIT}", field="max_replicas")
    if minimum > maximum:
        raise InvalidArgument(f"min_replicas {minimum} is greater than max_replicas {maximum}", field="min_replicas")
    return ReplicaBounds(minimum, maximum)


def validate_scale(min_replicas: int | None, max_replicas: int | None, current: ReplicaBounds) -> ReplicaBounds:
    """New bounds of an existing binding (ScaleBinding): a bound given is
    taken as given (0 is a real minimum), one not given (``None``) stays as
    it is; at least one must be given."""
    if min_replicas is None and max_replicas is None:
        raise InvalidArgument("min_replicas or max_replicas is required (both unset changes nothing)",
                              field="min_replicas")
    if min_replicas is not None and min_replicas < 0:
        raise InvalidArgument(f"min_replicas {min_replicas} must not be negative", field="min_replicas")
    return _checked(current.min_replicas if min_replicas is None else min_replicas,
                    current.max_replicas if max_replicas is None else max_replicas)


# The longest idle window a binding may ask for (the paused tier).
MAX_IDLE_SECONDS = 86_400


@dataclass(frozen=True)
class IdleWindows:
    """A binding's paused tier in seconds (0 = the scheduler's default);
    ``None``: not given, the binding keeps what it has."""

    pause: int | None = None
    stop: int | None = None


NO_IDLE_CHANGE = IdleWindows()


def validate_idle(pause: int | None, stop: int | None) -> IdleWindows:
    """The idle windows given with a Deploy, Promote or ScaleBinding: each
    0 (the scheduler's default) to ``MAX_IDLE_SECONDS``."""
    for name, value in (("idle_pause_seconds", pause), ("idle_stop_seconds", stop)):
        if value is not None and not 0 <= value <= MAX_IDLE_SECONDS:
            raise InvalidArgument(
                f"{name} {value} is out of range: 0 (the scheduler's default) to {MAX_IDLE_SECONDS} seconds",
                field=name,
            )
    return IdleWindows(pause, stop)


def adjust_bounds(current: ReplicaBounds, delta: int) -> ReplicaBounds:
    """scale-up (+N) / scale-down (-N): min moves by delta, floored at 0; max
    widens when min would pass it."""
    if delta == 0:
        raise InvalidArgument("delta must not be 0: use +N to scale up or -N to scale down")
    if abs(delta) > MAX_REPLICA_DELTA:
        raise InvalidArgument(f"delta {delta} is out of range: at most {MAX_REPLICA_DELTA} replicas at once")
    minimum = max(0, current.min_replicas + delta)
    if minimum > MAX_REPLICAS_LIMIT:
        raise InvalidArgument(
            f"scaling up by {delta} would take min_replicas to {minimum}, above the limit of {MAX_REPLICAS_LIMIT}",
            field="delta",
        )
    return ReplicaBounds(minimum, max(current.max_replicas, minimum, 1))


def start_bounds(current: ReplicaBounds, *, serving: bool) -> ReplicaBounds:
    """Bounds a binding gets back when its deployment is started again: its
    own, except that the serving binding runs at least one replica."""
    if serving and current.min_replicas < 1:
        return ReplicaBounds(1, max(current.max_replicas, 1))
    return current


def validate_reason(reason: str) -> str:
    if len(reason) > MAX_REASON_LENGTH:
        raise InvalidArgument(f"reason is longer than {MAX_REASON_LENGTH} characters")
    _check_text(reason, field_name="reason")
    return reason


def check_protected(environment_name: str, protected: bool, confirm: bool) -> None:
    if protected and not confirm:
        raise FailedPrecondition(
            f"environment {environment_name!r} is protected: moving its pointer needs confirmation",
            hint="pass --yes (CLI) or \"confirm\": true (API)",
            reason="PROTECTED_ENVIRONMENT", field="confirm", resource_name=environment_name,
            metadata={"environment": environment_name},
        )


def check_expected_sequence(environment_name: str, current: int, expected: int | None) -> None:
    """``expected`` None means the caller asked for no check; 0 means it
    expects an empty history."""
    from berth.errors import Aborted

    if expected is not None and expected != current:
        raise Aborted(
            f"environment {environment_name!r} moved meanwhile: expected sequence {expected}, it is at {current}",
            hint="re-read the history and retry",
            reason="SEQUENCE_CONFLICT",
            metadata={"environment": environment_name, "current_sequence": str(current),
                      "expected_sequence": str(expected)},
        )


# ---- experiments and gates ---------------------------------------------

EXPERIMENT_RUN_ID_PREFIX = "run_"
DATASET_DIGEST_PATTERN = re.compile(r"^sha256:[0-9a-f]{64}$")
MAX_EXPERIMENT_CASES = 10000
MAX_CASE_NAME_LENGTH = 200
MAX_CASE_REASON_LENGTH = 1000
MAX_CASE_LATENCY_MS = 24 * 3600 * 1000.0


@dataclass(frozen=True)
class CaseResult:
    name: str
    passed: bool
    status: int
    latency_ms: float
    reason: str = ""

    def to_json(self) -> dict:
        return {"name": self.name, "passed": self.passed, "status": self.status,
                "latency_ms": self.latency_ms, "reason": self.reason}


@dataclass(frozen=True)
class RunSummary:
    total: int
    passed: int
    pass_rate: float
    latency_p50_ms: float
    latency_p99_ms: float


@dataclass(frozen=True)
class Gate:
    environment: str
    experiment: str
    threshold: float
    dataset_digest: str


@dataclass(frozen=True)
class RunFacts:
    """What the gate looks at of a run."""

    id: str
    pass_rate: float


def validate_dataset_digest(value: str, *, field: str = "dataset_digest") -> str:
    if not DATASET_DIGEST_PATTERN.match(value):
        raise InvalidArgument(
            f"{field} {value[:80]!r} is not a dataset digest: expected 'sha256:' and 64 lowercase hex digits",
            field=field,
        )
    return value


def validate_threshold(value: float) -> float:
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise InvalidArgument(
            f"threshold {value} must be a pass rate above 0 and at most 1 (0.95 means 95% of the cases)",
            field="threshold",
        )
    return value


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def summarize_run(cases: list[CaseResult]) -> RunSummary:
    """Validates the cases of a run and computes what the registry records:
    the pass rate (passed / total) and the latency p50/p99 over all cases.
    Raises naming ``cases[i].field``."""
    if not cases:
        raise InvalidArgument("cases is empty: a run records at least one case", field="cases")
    if len(cases) > MAX_EXPERIMENT_CASES:
        raise InvalidArgument(f"cases has {len(cases)} entries; at most {MAX_EXPERIMENT_CASES} are allowed",
                              field="cases")
    for i, case in enumerate(cases):
        if not case.name or len(case.name) > MAX_CASE_NAME_LENGTH:
            raise InvalidArgument(f"cases[{i}].name must be 1 to {MAX_CASE_NAME_LENGTH} characters",
                                  field=f"cases[{i}].name")
        _check_text(case.name, field_name=f"cases[{i}].name")
        if len(case.reason) > MAX_CASE_REASON_LENGTH:
            raise InvalidArgument(f"cases[{i}].reason is longer than {MAX_CASE_REASON_LENGTH} characters",
                                  field=f"cases[{i}].reason")
        _check_text(case.reason, field_name=f"cases[{i}].reason")
        if not math.isfinite(case.latency_ms) or not 0 <= case.latency_ms <= MAX_CASE_LATENCY_MS:
            raise InvalidArgument(f"cases[{i}].latency_ms {case.latency_ms} must be between 0 and a day",
                                  field=f"cases[{i}].latency_ms")
        if not 0 <= case.status <= 999:
            raise InvalidArgument(f"cases[{i}].status {case.status} is not an HTTP status (0 for no answer)",
                                  field=f"cases[{i}].status")
    passed = sum(1 for c in cases if c.passed)
    latencies = [c.latency_ms for c in cases]
    return RunSummary(
        total=len(cases), passed=passed, pass_rate=passed / len(cases),
        latency_p50_ms=percentile(latencies, 50), latency_p99_ms=percentile(latencies, 99),
    )


def check_gate(gate: Gate, deployment_id: str, run: RunFacts | None) -> None:
    """A promotion into a gated environment needs ``run`` — the
    deployment's latest run of the gate's experiment on the gate's dataset
    digest — with a pass rate of at least the threshold. Raises
    FailedPrecondition GATE_NOT_PASSED naming the missing or failing run."""
    metadata = {"environment": gate.environment, "experiment": gate.experiment,
                "threshold": f"{gate.threshold:g}", "dataset_digest": gate.dataset_digest,
                "deployment_id": deployment_id}
    hint = (f"run it: berth experiments run --deployment {deployment_id} --name {gate.experiment} "
            "--dataset FILE (the gate's dataset), or pass --skip-gate --reason TEXT")
    if run is None:
        raise FailedPrecondition(
            f"environment {gate.environment!r} is gated on experiment {gate.experiment!r} "
            f"(pass rate >= {gate.threshold:g} on dataset {gate.dataset_digest[:19]}…), and deployment "
            f"{deployment_id} has no run of it on that dataset",
            hint=hint, reason="GATE_NOT_PASSED", resource_name=f"experiment/{gate.experiment}", metadata=metadata,
        )
    if run.pass_rate < gate.threshold:
        raise FailedPrecondition(
            f"environment {gate.environment!r} is gated on experiment {gate.experiment!r}: deployment "
            f"{deployment_id}'s latest run {run.id} passed {run.pass_rate:.2%}, below the threshold "
            f"{gate.threshold:.2%}",
            hint=hint, reason="GATE_NOT_PASSED", resource_name=f"experiment_run/{run.id}",
            metadata={**metadata, "run_id": run.id, "pass_rate": f"{run.pass_rate:g}"},
        )


def gate_skipped_reason(gate: Gate, reason: str) -> str:
    """The history entry's reason for a promotion that skipped a gate."""
    if not reason.strip():
        raise InvalidArgument("reason is required with skip_gate: say why the gate is skipped", field="reason")
    text = f"gate {gate.experiment} >= {gate.threshold:g} skipped: {reason}"
    return text[:MAX_REASON_LENGTH]
