"""Where the local platform keeps its files, and how the CLI finds it.

``berth up`` writes ``platform.json`` (addresses) and the admin key into the
data directory; the CLI on the same machine reads them from there. Every
process of the platform is recorded in ``run/<name>.pid`` (pid, start time,
what its command line names) so that ``berth down`` and the next ``berth up``
can stop whatever a killed ``berth up`` left, and never signal another
process that reused a pid. This module also tells what holds a local TCP
port (``/proc/net/tcp`` and ``/proc/*/fd``)."""
from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import pathlib
import secrets
import signal
import socket
import time
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from berth.client import Endpoints
from berth.errors import InvalidArgument

PLATFORM_FILE = "platform.json"
ADMIN_KEY_FILE = "admin.key"
SERVICE_TOKEN_FILE = "service.token"
INSTANCE_FILE = "instance"
PROJECT_FILE = "berth.toml"
RUN_DIR = "run"
OWNER_ENV = "BERTH_OWNER"  # "pid:start time" of the berth up whose platform a process belongs to


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


# ---------------------------------------------------------------- processes


def process_start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot; with the pid, an
    identity no later process shares), or None if it is gone or a zombie."""
    try:
        text = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = text.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def process_cmdline(pid: int) -> list[str]:
    try:
        raw = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def owner_token(pid: int | None = None) -> str:
    """``pid:start time`` of this (or ``pid``'s) process, for ``OWNER_ENV``."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}:{process_start_time(pid)}"


def owner_alive(token: str) -> bool:
    """Whether the process named by an ``owner_token`` still runs (the same
    process, not a later one with its pid)."""
    try:
        pid_text, start_text = token.split(":", 1)
        return str(process_start_time(int(pid_text))) == start_text
    except ValueError:
        return False


@dataclass(frozen=True)
class ProcessRecord:
    """A process of the platform as recorded in ``run/<name>.pid``."""

    path: pathlib.Path
    name: str
    pid: int
    start_time: int
    marker: str  # a word its command line contains ("services.router")

    def running(self) -> bool:
        """Still this very process (same start time, command line naming
        ``marker``), not a later one that reused the pid."""
        if process_start_time(self.pid) != self.start_time:
            return False
        return any(self.marker in part for part in process_cmdline(self.pid))


def record_process(run_dir: pathlib.Path, name: str, pid: int, marker: str) -> pathlib.Path | None:
    """Writes ``run/<name>.pid``; None if the process is already gone."""
    start = process_start_time(pid)
    if start is None:
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / f"{name}.pid"
    partial = run_dir / f".{name}.pid.partial"
    partial.write_text(json.dumps({"pid": pid, "start_time": start, "marker": marker}))
    os.replace(partial, path)
    return path


def recorded_processes(run_dir: pathlib.Path) -> list[ProcessRecord]:
    records = []
    for path in sorted(run_dir.glob("*.pid")) if run_dir.is_dir() else []:
        try:
            data = json.loads(path.read_text())
            records.append(ProcessRecord(path, path.stem, int(data["pid"]), int(data["start_time"]),
                                         str(data["marker"])))
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)  # half-written or foreign: nothing to act on
    return records


def stop_processes(records: Iterable[ProcessRecord], timeout: float = 15.0) -> list[ProcessRecord]:
    """SIGTERMs each recorded process that still is what was recorded, waits
    up to ``timeout`` seconds, SIGKILLs what is left; removes the records.
    Returns the processes that were running."""
    running = [r for r in records if r.running()]
    for record in records:
        if record not in running:
            record.path.unlink(missing_ok=True)
    for record in running:
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    left = list(running)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [r for r in left if r.running()]
    for record in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [r for r in left if r.running()]
    for record in running:
        record.path.unlink(missing_ok=True)
    return running


# ---------------------------------------------------------------- ports


@dataclass(frozen=True)
class Listener:
    address: str
    port: int
    inode: int


def _hex_address(text: str) -> str:
    raw = bytes.fromhex(text)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    # /proc/net/tcp6: four 32-bit words, each in host (little-endian) order
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


def listeners(port: int) -> list[Listener]:
    """TCP sockets listening on ``port`` (any address) in this network namespace."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = pathlib.Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != "0A":  # 0A: LISTEN
                continue
            address, port_hex = fields[1].rsplit(":", 1)
            if int(port_hex, 16) == port:
                found.append(Listener(_hex_address(address), port, int(fields[9])))
    return found


def _same_address(a: str, b: str) -> bool:
    """Whether two local addresses collide for binding (equal, or either is
    the wildcard; an IPv4-mapped IPv6 address is its IPv4 address)."""
    def norm(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        ip = ipaddress.ip_address(text)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        return ip
    try:
        x, y = norm(a), norm(b)
    except ValueError:
        return True
    return x == y or x.is_unspecified or y.is_unspecified


def listeners_on(host: str, port: int) -> list[Listener]:
    """Listeners a bind of ``host:port`` would collide with."""
    try:
        address = socket.gethostbyname(host) if ":" not in host else host
    except OSError:
        address = host
    return [listener for listener in listeners(port) if _same_address(listener.address, address)]


def socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets a process holds (empty if not ours to see)."""
    inodes: set[int] = set()
    try:
        entries = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for entry in entries:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{entry}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def socket_holders(inodes: set[int]) -> dict[int, list[int]]:
    """inode -> pids holding it, over the processes this user may inspect."""
    holders: dict[int, list[int]] = {}
    if not inodes:
        return holders
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            for inode in socket_inodes(int(entry)) & inodes:
                holders.setdefault(inode, []).append(int(entry))
    return holders


def describe_port_holder(host: str, port: int, ignore_inodes: set[int] | None = None) -> str | None:
    """"pid 123 (nginx: master process)" for what listens where ``host:port``
    would bind, "a process of another user" if it cannot be seen, or None
    when nothing does."""
    found = [listener for listener in listeners_on(host, port) if listener.inode not in (ignore_inodes or set())]
    if not found:
        return None
    holders = socket_holders({listener.inode for listener in found})
    pids = sorted({pid for listener in found for pid in holders.get(listener.inode, [])})
    where = ", ".join(sorted({f"[{listener.address}]:{port}" if ":" in listener.address else
                              f"{listener.address}:{port}" for listener in found}))
    if not pids:
        return f"a process this user cannot inspect (another user's, or in another container) listens on {where}"
    described = []
    for pid in pids[:3]:
        command = " ".join(process_cmdline(pid))
        described.append(f"pid {pid} ({command[:120]})" if command else f"pid {pid}")
    return ", ".join(described) + f" listening on {where}"


# ---------------------------------------------------------------- project file


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
