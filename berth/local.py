"""Where the local platform keeps its files, and how the CLI finds it.

``berth up`` writes ``platform.json`` (addresses) and the admin key into the
data directory; the CLI on the same machine reads them from there."""
from __future__ import annotations

import json
import os
import pathlib
import secrets
import tomllib
from dataclasses import dataclass, field
from typing import Any

from berth.client import Endpoints
from berth.errors import InvalidArgument

PLATFORM_FILE = "platform.json"
ADMIN_KEY_FILE = "admin.key"
SERVICE_TOKEN_FILE = "service.token"
INSTANCE_FILE = "instance"
PROJECT_FILE = "berth.toml"


def data_dir(explicit: str | os.PathLike[str] | None = None) -> pathlib.Path:
    raw = explicit or os.environ.get("BERTH_DATA_DIR") or os.path.expanduser("~/.local/share/berth")
    return pathlib.Path(raw).expanduser().resolve()


def private_file(path: pathlib.Path, make: Any) -> str:
    """Reads a secret file, creating it with 0600 permissions first if absent."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = make()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)
    return value


def new_instance_id() -> str:
    return secrets.token_hex(4)


def endpoints(directory: pathlib.Path | None = None) -> Endpoints:
    """Addresses from the environment, else from the running platform's
    ``platform.json``, else the defaults."""
    recorded: dict[str, str] = {}
    path = (directory or data_dir()) / PLATFORM_FILE
    if path.exists():
        try:
            recorded = json.loads(path.read_text())
        except (OSError, ValueError):
            recorded = {}
    return Endpoints(
        registry=os.environ.get("BERTH_REGISTRY_ADDR") or recorded.get("registry") or "127.0.0.1:50051",
        secrets=os.environ.get("BERTH_SECRETS_ADDR") or recorded.get("secrets") or "127.0.0.1:50052",
        scheduler=os.environ.get("BERTH_SCHEDULER_ADDR") or recorded.get("scheduler") or "127.0.0.1:50053",
    )


def router_url(directory: pathlib.Path | None = None) -> str:
    path = (directory or data_dir()) / PLATFORM_FILE
    if path.exists():
        try:
            return json.loads(path.read_text()).get("router", "http://127.0.0.1:8080")
        except (OSError, ValueError):
            pass
    return "http://127.0.0.1:8080"


def admin_key(directory: pathlib.Path | None = None) -> str:
    if os.environ.get("BERTH_ADMIN_KEY"):
        return os.environ["BERTH_ADMIN_KEY"]
    path = (directory or data_dir()) / ADMIN_KEY_FILE
    return path.read_text().strip() if path.exists() else ""


@dataclass
class ProjectFile:
    """``berth.toml``: what to deploy and how to run it."""

    path: pathlib.Path | None = None
    project: str = ""
    dockerfile: str = "Dockerfile"
    port: int = 0
    health_path: str = ""
    command: list[str] = field(default_factory=list)
    variables: dict[str, str] = field(default_factory=dict)
    memory_bytes: int = 0
    cpus: float = 0.0


def find_project_file(start: pathlib.Path) -> pathlib.Path | None:
    for directory in (start, *start.parents):
        candidate = directory / PROJECT_FILE
        if candidate.is_file():
            return candidate
    return None


def load_project_file(start: pathlib.Path) -> ProjectFile:
    path = find_project_file(start)
    if path is None:
        return ProjectFile()
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"{path} is not valid TOML: {exc}") from None
    worker = data.get("worker", {})
    resources = worker.get("resources", {})
    try:
        return ProjectFile(
            path=path,
            project=str(data.get("project", "")),
            dockerfile=str(worker.get("dockerfile", "Dockerfile")),
            port=int(worker.get("port", 0)),
            health_path=str(worker.get("health_path", "")),
            command=[str(c) for c in worker.get("command", [])],
            variables={str(k): str(v) for k, v in data.get("variables", {}).items()},
            memory_bytes=parse_memory(str(resources.get("memory", "0"))),
            cpus=float(resources.get("cpus", 0)),
        )
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"{path}: {exc}") from None


def parse_memory(text: str) -> int:
    """'256m', '1g', '512Mi' or a byte count."""
    text = text.strip().lower().removesuffix("b").removesuffix("i")
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text or 0)


def write_project_file(
    directory: pathlib.Path,
    *,
    project: str,
    dockerfile: str,
    port: int,
    health_path: str,
    memory: str,
    cpus: float,
    variables: tuple[str, ...],
    force: bool,
) -> pathlib.Path:
    """Writes ``berth.toml`` (refuses to overwrite unless ``force``)."""
    path = directory / PROJECT_FILE
    if path.exists() and not force:
        raise InvalidArgument(f"{path} already exists", hint="pass --force to overwrite it")
    pairs = []
    for item in variables:
        if "=" not in item:
            raise InvalidArgument(f"--var {item!r} must look like KEY=VALUE")
        pairs.append(item.split("=", 1))
    if memory:
        parse_memory(memory)  # fail early on a typo
    lines = [
        "# Berth project file: what to build and how to run it (see README).",
        f"project = {json.dumps(project)}",
        "",
        "[worker]",
        f"dockerfile = {json.dumps(dockerfile)}",
        f"port = {int(port)}",
        f"health_path = {json.dumps(health_path)}",
        "",
        "[worker.resources]",
        f"memory = {json.dumps(memory or '0')}",
        f"cpus = {float(cpus)}",
        "",
        "[variables]",
        *(f"{key} = {json.dumps(value)}" for key, value in pairs),
        "",
    ]
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path
