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
