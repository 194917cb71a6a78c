"""``berth up``: the whole platform on one machine, one process per service.

The supervisor starts registry, secrets, scheduler and router as child
processes, restarts one that dies (at once after a long run, with backoff
while it keeps dying), and stops them gracefully on SIGINT/SIGTERM.
Replicas are Docker containers and outlive it: the next ``berth up`` adopts
them.

``berth up`` owns what it starts, so nothing of a platform outlives it or
answers in its name:

- Children die with it, even when it is SIGKILLed: each starts through a
  tiny wrapper that sets PR_SET_PDEATHSIG (SIGTERM, a graceful stop; it
  survives the wrapper's exec of the service) and exits instead if
  ``berth up`` died before the wrapper got there (its parent changed).
- Every process of the platform is recorded in ``<data dir>/run/<name>.pid``
  (pid, start time, a word of its command line; the router's workers record
  themselves). ``berth down`` and the next ``berth up`` stop whatever is
  recorded and still is that very process, so even leftovers that escaped
  the parent-death signal go, and a pid reused by another process is never
  signalled.
- One ``berth up`` per data directory: it holds an flock on ``run/up.lock``
  for its lifetime (the kernel drops it when the process dies).
- Before starting anything it checks that nothing listens on its ports and
  exits naming the port and what holds it if something does (the router
  binds with SO_REUSEPORT and would otherwise share its port with another
  process of the same user; the gRPC services would crash-loop).
- A service counts as healthy only while its own child is alive and holds
  the listening socket of the service's port, so "Berth is up" is never
  said for a service another process answers for.
- The router runs as a supervisor with workers (``--supervise``): if the
  router supervisor dies alone, its workers keep serving as orphans until
  the supervisor started here in its place has taken over their sockets
  (``services/router/workers.py``); orphans whose ``berth up`` is gone
  (``BERTH_OWNER``) stop.

Logs: each service writes ``logs/<service>.log`` itself, rotated by size
(``BERTH_LOG_MAX_BYTES``, ``BERTH_LOG_BACKUPS``; ``services/common/logs.py``);
what it prints before its logging is set up (an import error, a bad flag)
goes to ``logs/<service>.stderr.log``, moved to ``.1`` at a start once past
1 MB.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from berth import local
from services.common.auth import ADMIN_KEY_PREFIX, SERVICE_TOKEN_PREFIX, new_key

SMALL_LOG_LIMIT = 1024 * 1024  # <service>.stderr.log and berth-up.log move to .1 past this at a start
STABLE_AFTER = 10.0  # a child that ran this long before dying is restarted at once
RESTART_BACKOFF_MAX = 30.0
SUPERVISE_INTERVAL = 0.1
LOCK_FILE = "up.lock"

# The child's first moments: die with berth up (PR_SET_PDEATHSIG = 1; kept
# across execve), or exit now if berth up is already gone, then become the
# service. ``python -S``: nothing but ctypes to import.
PDEATHSIG_WRAPPER = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(0)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


class PlatformError(RuntimeError):
    """``berth up`` cannot start (ports taken, already running)."""


class ConfigError(ValueError):
    """``berth up`` was asked for something it cannot run (exit code 2)."""


INSTANCE_PORT_STEP = 100  # instance i of a service listens on its port + 100·i
MAX_INSTANCES = 9


def rotate_small(path: pathlib.Path, limit: int = SMALL_LOG_LIMIT) -> None:
    """Moves ``path`` to ``path.1`` (replacing it) once it outgrew ``limit``."""
    try:
        if path.stat().st_size > limit:
            os.replace(path, path.with_name(path.name + ".1"))
    except FileNotFoundError:
        pass


@dataclass(frozen=True)
class PlatformConfig:
    data_dir: pathlib.Path
    host: str = "127.0.0.1"
    registry_port: int = 50051
    secrets_port: int = 50052
    scheduler_port: int = 50053
    router_port: int = 8080
    database_url: str = ""
    domain: str = "localhost"
    instances: int = 1

    def addr(self, port: int) -> str:
        return f"{self.host}:{port}"

    def port(self, base: int, index: int) -> int:
        """Instance ``index``'s port: the service's port + 100·index."""
        return base + INSTANCE_PORT_STEP * index

    def addrs(self, base: int) -> str:
        """Every instance of a service, as an address list."""
        return ",".join(self.addr(self.port(base, i)) for i in range(self.instances))

    def check(self) -> None:
        """Several instances share their state through PostgreSQL only."""
        if self.instances < 1:
            raise ConfigError(f"--instances must be at least 1, not {self.instances}")
        if self.instances > MAX_INSTANCES:
            raise ConfigError(f"--instances is at most {MAX_INSTANCES}, not {self.instances}")
        if self.instances > 1 and not self.database_url.startswith(("postgresql:", "postgresql+", "postgres:")):
            raise ConfigError(
                f"--instances {self.instances} needs a PostgreSQL database shared by the instances "
                "(--database-url postgresql://USER@HOST/DB); the embedded SQLite serves one instance"
            )


@dataclass
class Child:
    name: str
    args: list[str]  # ["services.<name>", flags...]
    env: dict[str, str]
    log_path: pathlib.Path
    run_dir: pathlib.Path
    host: str = "127.0.0.1"
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0
    restart_due: float | None = None  # when a dead child is to start again

    @property
    def stderr_path(self) -> pathlib.Path:
        return self.log_path.with_name(f"{self.name}.stderr.log")

    @property
    def pid_path(self) -> pathlib.Path:
        return self.run_dir / f"{self.name}.pid"

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        rotate_small(self.stderr_path)
        with open(self.stderr_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-S", "-c", PDEATHSIG_WRAPPER, str(os.getpid()), sys.executable, "-m", *self.args],
                env={**self.env, "BERTH_LOG_FILE": str(self.log_path)}, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.started_at = time.monotonic()
        local.record_process(self.run_dir, self.name, self.process.pid, self.args[0])

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def owns_port(self) -> bool:
        """Alive and holding a socket that listens on its port (not some
        other process answering there)."""
        if not self.alive():
            return False
        assert self.process is not None
        listening = {listener.inode for listener in local.listeners_on(self.host, self.port)}
        return bool(listening & local.socket_inodes(self.process.pid))

    def stop(self) -> None:
        if self.alive():
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self.pid_path.unlink(missing_ok=True)


class Platform:
    def __init__(self, config: PlatformConfig) -> None:
        config.check()
        self.config = config
        d = config.data_dir
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        (d / "logs").mkdir(exist_ok=True)
        self.run_dir = d / local.RUN_DIR
        self.run_dir.mkdir(exist_ok=True)
        self.admin_key = local.private_file(d / local.ADMIN_KEY_FILE, lambda: new_key(ADMIN_KEY_PREFIX))
        self.service_token = local.private_file(d / local.SERVICE_TOKEN_FILE, lambda: new_key(SERVICE_TOKEN_PREFIX))
        self.instance = local.private_file(d / local.INSTANCE_FILE, local.new_instance_id)
        self.owner = local.owner_token()
        self.children = self._children()
        self.leftovers: list[local.ProcessRecord] = []  # what a previous berth up left, stopped by start()
        self._lock_fd = -1
        self._started = False

    def _children(self) -> list[Child]:
        """One child per process: with ``instances`` N, N registries, secrets
        services and routers (instance i on each port + 100·i; the first
        keeps the plain name), and N schedulers, each with its own instance
        name: one leads, the others stand by (the lease in PostgreSQL)."""
        c = self.config
        base = {
            **os.environ,
            "BERTH_DATA_DIR": str(c.data_dir),
            "BERTH_SERVICE_TOKEN": self.service_token,
            "BERTH_REGISTRY_ADDR": c.addrs(c.registry_port),
            "BERTH_SECRETS_ADDR": c.addrs(c.secrets_port),
            "BERTH_SCHEDULER_ADDR": c.addrs(c.scheduler_port),
            "BERTH_RUN_DIR": str(self.run_dir),
            local.OWNER_ENV: self.owner,
            "PYTHONUNBUFFERED": "1",
        }
        base.pop("BERTH_PORT", None)
        logs = c.data_dir / "logs"

        def child(name: str, args: list[str], env: dict[str, str], port: int) -> Child:
            return Child(name, args, env, logs / f"{name}.log", self.run_dir, c.host, port)

        def named(service: str, i: int) -> str:
            return service if i == 0 else f"{service}-{i}"

        children: dict[str, list[Child]] = {"registry": [], "secrets": [], "scheduler": [], "router": []}
        for i in range(c.instances):
            port = c.port(c.registry_port, i)
            registry_args = ["services.registry", "--host", c.host, "--port", str(port)]
            if c.database_url:
                registry_args += ["--database-url", c.database_url]
            children["registry"].append(child(named("registry", i), registry_args,
                                              {**base, "BERTH_ADMIN_KEY": self.admin_key}, port))
            port = c.port(c.secrets_port, i)
            secrets_args = ["services.secrets", "--host", c.host, "--port", str(port)]
            if c.instances > 1:  # one database for every instance (the key file is shared: same data dir)
                secrets_args += ["--database-url", c.database_url]
            children["secrets"].append(child(
                named("secrets", i),
                secrets_args,
                {**base, "BERTH_ADMIN_KEY": self.admin_key},  # rotate-key is an admin operation
                port,
            ))
            port = c.port(c.scheduler_port, i)
            scheduler_args = ["services.scheduler", "--host", c.host, "--port", str(port), "--instance", self.instance,
                              "--data-dir", str(c.data_dir)]
            if c.instances > 1:
                # The lease lives in the shared database; each scheduler has
                # its own name in it (who leads, in `deployment status`).
                scheduler_args += ["--database-url", c.database_url,
                                   "--instance-name", f"{socket.gethostname()}-scheduler-{i}"]
            children["scheduler"].append(child(named("scheduler", i), scheduler_args, base, port))
            port = c.port(c.router_port, i)
            children["router"].append(child(
                named("router", i),
                ["services.router", "--host", c.host, "--port", str(port), "--domain", c.domain, "--supervise"],
                base,
                port,
            ))
        return [*children["registry"], *children["secrets"], *children["scheduler"], *children["router"]]

    def of(self, service: str) -> list[Child]:
        """The children running ``service`` ("registry", ...), first instance first."""
        return [child for child in self.children if child.args[0] == f"services.{service}"]

    def write_platform_file(self) -> None:
        c = self.config
        info = {
            "registry": c.addrs(c.registry_port),
            "secrets": c.addrs(c.secrets_port),
            "scheduler": c.addrs(c.scheduler_port),
            "router": f"http://{c.host}:{c.router_port}",
            "routers": [f"http://{c.host}:{c.port(c.router_port, i)}" for i in range(c.instances)],
            "instances": c.instances,
            "runtime": os.environ.get("BERTH_RUNTIME", "local"),  # berth up --runtime
            "image_registry": os.environ.get("BERTH_IMAGE_REGISTRY", ""),  # where berth deploy pushes
            "instance": self.instance,
            "pid": os.getpid(),
            "start_time": local.process_start_time(os.getpid()),
        }
        (c.data_dir / local.PLATFORM_FILE).write_text(json.dumps(info, indent=2))

    def _lock(self) -> None:
        fd = os.open(self.run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = "?"
            with contextlib.suppress(OSError, ValueError, KeyError):
                pid = json.loads((self.config.data_dir / local.PLATFORM_FILE).read_text())["pid"]
            raise PlatformError(
                f"berth up already runs from {self.config.data_dir} (pid {pid}); "
                f"stop it first with: berth down --data-dir {self.config.data_dir}"
            ) from None
        self._lock_fd = fd

    def check_ports(self) -> None:
        """Refuses to start when anything listens where a service would."""
        busy = []
        for child in self.children:
            holder = local.describe_port_holder(child.host, child.port)
            if holder:
                busy.append(f"port {child.port} ({child.name}) is in use: {holder}")
        if busy:
            raise PlatformError("; ".join(busy) + ". Stop that, or give berth up other ports "
                                "(--router-port, --registry-port, --secrets-port, --scheduler-port).")

    def start(self) -> None:
        """Takes the data directory (one berth up each), stops what a previous
        berth up left running, checks the ports, starts the services."""
        self._lock()
        try:
            self.leftovers = local.stop_processes(local.recorded_processes(self.run_dir))
            self.check_ports()
        except BaseException:
            self._unlock()
            raise
        self._started = True
        self.write_platform_file()
        for child in self.children:
            child.start()

    def healthy(self) -> dict[str, bool]:
        """Per child (every instance): alive, holding its port, and serving
        (grpc.health.v1 for the process, "", is SERVING; the router's
        /healthz is 200). With several schedulers one of them must lead
        (its berth.v1.Scheduler is SERVING; the standbys' NOT_SERVING)."""
        status = {child.name: child.owns_port() for child in self.children}
        for child in self.children:
            service = child.args[0].removeprefix("services.")
            if not status[child.name] or service == "router":
                continue
            try:
                with grpc.insecure_channel(child.addr) as channel:
                    answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                status[child.name] = answer.status == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                status[child.name] = False
        if self.config.instances > 1:
            schedulers = [child.name for child in self.of("scheduler")]
            # The leader reports berth.v1.Scheduler SERVING; a standby NOT_SERVING.
            if not any(self._serving(child, "berth.v1.Scheduler") for child in self.of("scheduler")
                       if status[child.name]):
                for name in schedulers:
                    status[name] = False  # no leader yet
        for child in self.of("router"):
            if status[child.name]:
                try:
                    with urllib.request.urlopen(f"http://{child.host}:{child.port}/healthz", timeout=2) as resp:
                        status[child.name] = resp.status == 200
                except OSError:
                    status[child.name] = False
        return status

    @staticmethod
    def _serving(child: Child, service: str = "") -> bool:
        try:
            with grpc.insecure_channel(child.addr) as channel:
                answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                                   timeout=1)
            return answer.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    def wait_healthy(self, timeout: float) -> dict[str, bool]:
        deadline = time.monotonic() + timeout
        status = self.healthy()
        while not all(status.values()) and time.monotonic() < deadline:
            for child in self.children:
                if child.process is not None and child.process.poll() is not None:
                    raise RuntimeError(
                        f"{child.name} exited with code {child.process.returncode}; see {child.log_path} "
                        f"and {child.stderr_path}"
                    )
            time.sleep(0.2)
            status = self.healthy()
        return status

    def supervise(self, stop_requested: Callable[[], bool]) -> None:
        """Restarts a child that died: at once if it had run for a while
        (``STABLE_AFTER``), else with exponential backoff."""
        while not stop_requested():
            now = time.monotonic()
            for child in self.children:
                if child.alive():
                    continue
                if child.restart_due is None:
                    child.restarts = 1 if now - child.started_at >= STABLE_AFTER else child.restarts + 1
                    delay = 0.0 if child.restarts == 1 else min(RESTART_BACKOFF_MAX, 0.5 * 2 ** min(child.restarts, 6))
                    child.restart_due = now + delay
                    code = child.process.returncode if child.process is not None else None
                    line = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "level": "WARNING", "logger": "berth.up",
                            "event": "supervisor_restart", "service": child.name, "code": code,
                            "restart_in_s": delay}
                    with open(child.log_path, "ab") as log:
                        log.write(json.dumps(line).encode() + b"\n")
                if now >= child.restart_due:
                    child.restart_due = None
                    child.start()
            time.sleep(SUPERVISE_INTERVAL)

    def stop(self, grace: float = 10.0) -> None:
        if self._started:
            # Router first so no new request arrives, then the rest.
            for child in reversed(self.children):
                child.stop()
            for child in reversed(self.children):
                child.wait(grace)
            # Whatever a child left (a router worker that outlived its supervisor).
            local.stop_processes(local.recorded_processes(self.run_dir), timeout=grace)
            (self.config.data_dir / local.PLATFORM_FILE).unlink(missing_ok=True)
            self._started = False
        self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def start_detached(data_dir: pathlib.Path, up_args: list[str], timeout: float = 120) -> str:
    """Starts ``berth up`` in its own session, logging to the data directory,
    and returns its banner once the platform serves."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "berth-up.log"
    rotate_small(log_path)
    offset = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "berth.cli", *up_args], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, env={**os.environ, "BERTH_DATA_DIR": str(data_dir)},
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_path.read_bytes()[offset:].decode(errors="replace")
        if "Berth is up" in text:
            return text[text.index("Berth is up"):]
        if process.poll() is not None:
            raise RuntimeError(f"berth up exited with code {process.returncode}:\n{text[-2000:]}")
        time.sleep(0.2)
    raise RuntimeError(f"the platform did not come up within {timeout:.0f} s; see {log_path}")


def stop_running(data_dir: pathlib.Path, timeout: float = 30) -> list[str]:
    """Stops the platform of ``data_dir``: SIGTERMs the ``berth up``
    recorded in ``platform.json`` (if it still is that process) and waits for
    it, then stops every process recorded in ``run/`` that still runs (what a
    killed ``berth up`` left). Returns what was stopped."""
    stopped = []
    path = data_dir / local.PLATFORM_FILE
    if path.exists():
        try:
            info = json.loads(path.read_text())
            pid = int(info["pid"])
            start_time = info.get("start_time")
        except (OSError, ValueError, KeyError, TypeError):
            pid, start_time = 0, None
        current = local.process_start_time(pid) if pid else None
        if current is not None and (start_time is None or current == start_time) and \
                any("berth" in part for part in local.process_cmdline(pid)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while local.process_start_time(pid) == current and time.monotonic() < deadline:
                time.sleep(0.1)
            if local.process_start_time(pid) == current:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            stopped.append(f"berth up (pid {pid})")
        path.unlink(missing_ok=True)
    for record in local.stop_processes(local.recorded_processes(data_dir / local.RUN_DIR)):
        stopped.append(f"{record.name} (pid {record.pid}, left by a berth up that did not stop them)")
    return stopped
