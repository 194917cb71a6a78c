"""Pure builders: a binding (plus its resolved image id and secrets) becomes
the container's environment, labels, name and spec hash."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from berth.v1 import common_pb2

from . import docker_adapter as da

DEFAULT_PORT = 8080
PORT_LABEL = "berth.port"
HEALTH_PATH_LABEL = "berth.health-path"


@dataclass(frozen=True)
class SecretValue:
    name: str
    value: str = field(repr=False)
    version: int = 0


@dataclass(frozen=True)
class ResolvedSpec:
    """What every replica of one binding runs. ``environment`` holds secret
    values: it is never logged (repr hides it)."""

    binding: common_pb2.Binding = field(repr=False)
    image_id: str
    port: int
    health_path: str
    spec_hash: str
    environment: Mapping[str, str] = field(repr=False)
    secret_values: tuple[str, ...] = field(repr=False, default=())


def port_of(config: common_pb2.WorkerConfig) -> int:
    return config.port or DEFAULT_PORT


def health_path_of(config: common_pb2.WorkerConfig) -> str:
    path = config.health_path or "/"
    return path if path.startswith("/") else "/" + path


def spec_hash(image_id: str, config: common_pb2.WorkerConfig, secrets: Sequence[SecretValue]) -> str:
    """sha256 over the image id, the worker config (plain variables included)
    and the secrets' names and versions — never their values."""
    document = {
        "image_id": image_id,
        "port": port_of(config),
        "command": list(config.command),
        "health_path": health_path_of(config),
        "variables": dict(sorted(config.variables.items())),
        "memory_bytes": config.resources.memory_bytes,
        "cpus": config.resources.cpus,
        "secrets": sorted([s.name, s.version] for s in secrets),
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def resolve(binding: common_pb2.Binding, image_id: str, secrets: Sequence[SecretValue]) -> ResolvedSpec:
    config = binding.deployment.config
    port = port_of(config)
    environment: dict[str, str] = dict(config.variables)
    environment.update({s.name: s.value for s in secrets})
    environment.update(
        {
            "PORT": str(port),
            "BERTH_PROJECT": binding.project_name,
            "BERTH_ENVIRONMENT": binding.environment_name,
            "BERTH_DEPLOYMENT_ID": binding.deployment.id,
        }
    )
    return ResolvedSpec(
        binding=binding,
        image_id=image_id,
        port=port,
        health_path=health_path_of(config),
        spec_hash=spec_hash(image_id, config, secrets),
        environment=environment,
        secret_values=tuple(s.value for s in secrets),
    )


def container_name(instance: str, environment_id: str, deployment_id: str, index: int, generation: int) -> str:
    base = f"berth-{instance}-{environment_id}-{deployment_id}-{index}"
    return base if generation == 0 else f"{base}-g{generation}"


MIN_MEMORY_BYTES = 6 * 1024 * 1024  # the engine refuses less


def invalid_config(config: common_pb2.WorkerConfig, host: da.HostResources | None) -> str | None:
    """Why this worker config cannot be scheduled here, or None. Pure."""
    if config.port and not 0 < config.port < 65536:
        return f"port {config.port} is not a TCP port (1-65535)"
    resources = config.resources
    if resources.memory_bytes < 0:
        return f"memory limit {resources.memory_bytes} is negative"
    if resources.cpus < 0:
        return f"cpus {resources.cpus:g} is negative"
    if 0 < resources.memory_bytes < MIN_MEMORY_BYTES:
        return (
            f"memory limit {resources.memory_bytes} bytes is below the engine's minimum of "
            f"{MIN_MEMORY_BYTES} bytes (6 MiB)"
        )
    if host is not None:
        if host.memory_bytes and resources.memory_bytes > host.memory_bytes:
            return (
                f"memory limit {resources.memory_bytes} bytes exceeds this host's memory "
                f"({host.memory_bytes} bytes)"
            )
        if host.cpus and resources.cpus > host.cpus:
            return f"cpus {resources.cpus:g} exceeds this host's {host.cpus} CPUs"
    return None


def run_spec(
    instance: str, spec: ResolvedSpec, index: int, generation: int, *, restarts: int = 0, crashes: int = 0
) -> da.RunSpec:
    b = spec.binding
    resources = b.deployment.config.resources
    labels = {
        da.MANAGED_LABEL: "true",
        da.INSTANCE_LABEL: instance,
        da.PROJECT_LABEL: b.project_id,
        da.ENVIRONMENT_LABEL: b.environment_id,
        da.DEPLOYMENT_LABEL: b.deployment.id,
        da.REPLICA_LABEL: str(index),
        da.GENERATION_LABEL: str(generation),
        da.SPEC_HASH_LABEL: spec.spec_hash,
        da.RESTARTS_LABEL: str(restarts),
        da.CRASHES_LABEL: str(crashes),
        PORT_LABEL: str(spec.port),
        HEALTH_PATH_LABEL: spec.health_path,
    }
    return da.RunSpec(
        name=container_name(instance, b.environment_id, b.deployment.id, index, generation),
        image_id=spec.image_id,
        environment=spec.environment,
        labels=labels,
        command=tuple(b.deployment.config.command),
        mem_limit=int(resources.memory_bytes),
        nano_cpus=int(resources.cpus * 1e9) if resources.cpus > 0 else 0,
    )
