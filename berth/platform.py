"""``berth up``: the whole platform on one machine, one process per service.

The supervisor starts registry, secrets, scheduler and router as child
processes, restarts one that dies (with backoff), and stops them gracefully
on SIGINT/SIGTERM. Replicas are Docker containers and outlive it: the next
``berth up`` adopts them.
"""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from berth import local
from services.common.auth import ADMIN_KEY_PREFIX, SERVICE_TOKEN_PREFIX, new_key


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

    def addr(self, port: int) -> str:
        return f"{self.host}:{port}"


@dataclass
class Child:
    name: str
    args: list[str]
    env: dict[str, str]
    log_path: pathlib.Path
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", *self.args], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

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


class Platform:
    def __init__(self, config: PlatformConfig) -> None:
        self.config = config
        d = config.data_dir
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        (d / "logs").mkdir(exist_ok=True)
        self.admin_key = local.private_file(d / local.ADMIN_KEY_FILE, lambda: new_key(ADMIN_KEY_PREFIX))
        self.service_token = local.private_file(d / local.SERVICE_TOKEN_FILE, lambda: new_key(SERVICE_TOKEN_PREFIX))
        self.instance = local.private_file(d / local.INSTANCE_FILE, local.new_instance_id)
        self.children = self._children()

    def _children(self) -> list[Child]:
        c = self.config
        base = {
            **os.environ,
            "BERTH_DATA_DIR": str(c.data_dir),
            "BERTH_SERVICE_TOKEN": self.service_token,
            "BERTH_REGISTRY_ADDR": c.addr(c.registry_port),
            "BERTH_SECRETS_ADDR": c.addr(c.secrets_port),
            "BERTH_SCHEDULER_ADDR": c.addr(c.scheduler_port),
            "PYTHONUNBUFFERED": "1",
        }
        base.pop("BERTH_PORT", None)
        logs = c.data_dir / "logs"
        registry_args = ["services.registry", "--host", c.host, "--port", str(c.registry_port)]
        if c.database_url:
            registry_args += ["--database-url", c.database_url]
        return [
            Child("registry", registry_args, {**base, "BERTH_ADMIN_KEY": self.admin_key}, logs / "registry.log"),
            Child(
                "secrets",
                ["services.secrets", "--host", c.host, "--port", str(c.secrets_port)],
                {**base, "BERTH_ADMIN_KEY": self.admin_key},  # rotate-key is an admin operation
                logs / "secrets.log",
            ),
            Child(
                "scheduler",
                ["services.scheduler", "--host", c.host, "--port", str(c.scheduler_port), "--instance", self.instance,
                 "--data-dir", str(c.data_dir)],
                base,
                logs / "scheduler.log",
            ),
            Child(
                "router",
                ["services.router", "--host", c.host, "--port", str(c.router_port), "--domain", c.domain],
                base,
                logs / "router.log",
            ),
        ]

    def write_platform_file(self) -> None:
        c = self.config
        info = {
            "registry": c.addr(c.registry_port),
            "secrets": c.addr(c.secrets_port),
            "scheduler": c.addr(c.scheduler_port),
            "router": f"http://{c.host}:{c.router_port}",
            "instance": self.instance,
            "pid": os.getpid(),
        }
        (c.data_dir / local.PLATFORM_FILE).write_text(json.dumps(info, indent=2))

    def start(self) -> None:
        self.write_platform_file()
        for child in self.children:
            child.start()

    def healthy(self) -> dict[str, bool]:
        c = self.config
        status = {}
        for name, port in (("registry", c.registry_port), ("secrets", c.secrets_port), ("scheduler", c.scheduler_port)):
            try:
                with grpc.insecure_channel(c.addr(port)) as channel:
                    answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                status[name] = answer.status == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                status[name] = False
        try:
            with urllib.request.urlopen(f"http://{c.host}:{c.router_port}/healthz", timeout=2) as resp:
                status["router"] = resp.status == 200
        except OSError:
            status["router"] = False
        return status

    def wait_healthy(self, timeout: float) -> dict[str, bool]:
        deadline = time.monotonic() + timeout
        status = self.healthy()
        while not all(status.values()) and time.monotonic() < deadline:
            for child in self.children:
                if child.process is not None and child.process.poll() is not None:
                    raise RuntimeError(
                        f"{child.name} exited with code {child.process.returncode}; see {child.log_path}"
                    )
            time.sleep(0.2)
            status = self.healthy()
        return status

    def supervise(self, stop_requested) -> None:  # type: ignore[no-untyped-def]
        """Restarts a child that died, with exponential backoff."""
        while not stop_requested():
            now = time.monotonic()
            for child in self.children:
                if not child.alive() and now >= child.next_start:
                    child.restarts += 1
                    child.next_start = now + min(30.0, 0.5 * 2 ** min(child.restarts, 6))
                    with open(child.log_path, "ab") as log:
                        log.write(f'{{"event": "supervisor_restart", "service": "{child.name}"}}\n'.encode())
                    child.start()
            time.sleep(0.2)

    def stop(self, grace: float = 10.0) -> None:
        # Router first so no new request arrives, then the rest.
        for child in reversed(self.children):
            child.stop()
        for child in reversed(self.children):
            child.wait(grace)
        (self.config.data_dir / local.PLATFORM_FILE).unlink(missing_ok=True)


def start_detached(data_dir: pathlib.Path, up_args: list[str], timeout: float = 120) -> str:
    """Starts ``berth up`` in its own session, logging to the data directory,
    and returns its banner once the platform serves."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "berth-up.log"
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


def stop_running(data_dir: pathlib.Path, timeout: float = 30) -> bool:
    """SIGTERMs the ``berth up`` recorded in ``platform.json``; waits for it."""
    path = data_dir / local.PLATFORM_FILE
    if not path.exists():
        return False
    try:
        pid = int(json.loads(path.read_text())["pid"])
        os.kill(pid, signal.SIGTERM)
    except (ValueError, KeyError, ProcessLookupError, OSError):
        path.unlink(missing_ok=True)
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    return True
