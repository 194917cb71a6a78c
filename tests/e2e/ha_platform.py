"""``berth up --database-url postgresql://… --instances N`` as a user runs
it, for the multi-instance and chaos tests: free ports chosen so that every
instance's port (base + 100·i) is free too, the processes by name from the
platform's run directory, and the leading scheduler."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc

from berth import local
from tests.support.platform import ROOT, RunningPlatform, eventually

STEP = 100  # berth.platform.INSTANCE_PORT_STEP


def _free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_set(instances: int) -> int:
    """A base port whose base + 100·i are all free (i < instances)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + STEP * instances < 65000 and all(_free(base + STEP * i) for i in range(instances)):
            return base
    raise RuntimeError("no free port set found")


def grpc_status(address: str, service: str = "", timeout: float = 1.0) -> str:
    try:
        with grpc.insecure_channel(address) as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                               timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    except grpc.RpcError as exc:
        return f"unreachable ({exc.code().name})"  # type: ignore[attr-defined]


class HaPlatform(RunningPlatform):
    def __init__(self, data_dir: Path, database_url: str, instances: int = 2) -> None:
        super().__init__(data_dir)
        self.instances = instances
        self.database_url = database_url
        self.ports = {name: free_port_set(instances) for name in ("router", "registry", "secrets", "scheduler")}
        self.router = f"http://127.0.0.1:{self.ports['router']}"
        # Short leases so that a standby takes over within the chaos test's bound.
        self.env["BERTH_LEASE_DURATION"] = os.environ.get("BERTH_TEST_LEASE_DURATION", "3")
        self.env["PYTHONFAULTHANDLER"] = "1"  # a crashing process leaves its stack in <service>.stderr.log

    def port(self, service: str, i: int) -> int:
        return self.ports[service] + STEP * i

    def name(self, service: str, i: int) -> str:
        return service if i == 0 else f"{service}-{i}"

    @property
    def routers(self) -> list[str]:
        return [f"http://127.0.0.1:{self.port('router', i)}" for i in range(self.instances)]

    def start(self, timeout: float = 150) -> None:
        out_path = self.data_dir / "berth-up.out"
        offset = out_path.stat().st_size if out_path.exists() else 0
        log = open(out_path, "ab")
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "berth.cli", "up", "--data-dir", str(self.data_dir),
                "--database-url", self.database_url, "--instances", str(self.instances),
                "--router-port", str(self.ports["router"]), "--registry-port", str(self.ports["registry"]),
                "--secrets-port", str(self.ports["secrets"]), "--scheduler-port", str(self.ports["scheduler"]),
            ],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )

        def up() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"berth up exited: {self.output()}")
            return b"Berth is up" in out_path.read_bytes()[offset:]

        eventually(up, timeout=timeout, what="berth up healthy")

    def records(self) -> dict[str, local.ProcessRecord]:
        return {r.name: r for r in local.recorded_processes(self.data_dir / local.RUN_DIR) if r.running()}

    def platform_file(self) -> dict[str, Any]:
        return json.loads((self.data_dir / local.PLATFORM_FILE).read_text())

    def leader(self) -> int | None:
        """The index of the one scheduler whose berth.v1.Scheduler is
        SERVING (the leader; a standby reports NOT_SERVING for it)."""
        serving = [i for i in range(self.instances)
                   if grpc_status(f"127.0.0.1:{self.port('scheduler', i)}", "berth.v1.Scheduler") == "SERVING"]
        return serving[0] if len(serving) == 1 else None

    def kill(self, name: str) -> local.ProcessRecord:
        record = self.records()[name]
        os.kill(record.pid, signal.SIGKILL)
        return record

    def wait_restarted(self, name: str, old_pid: int, timeout: float = 60) -> local.ProcessRecord:
        def restarted() -> local.ProcessRecord | None:
            record = self.records().get(name)
            return record if record is not None and record.pid != old_pid else None

        found: local.ProcessRecord = eventually(restarted, timeout=timeout, what=f"{name} restarted")
        return found

    def healthz(self, i: int) -> bool:
        with contextlib.suppress(requests.RequestException):
            return requests.get(self.routers[i] + "/healthz", timeout=2).status_code == 200
        return False

    def wait_all_healthy(self, timeout: float = 60) -> None:
        def every() -> bool:
            grpc_ok = all(grpc_status(f"127.0.0.1:{self.port(service, i)}") == "SERVING"
                          for service in ("registry", "secrets", "scheduler") for i in range(self.instances))
            return grpc_ok and self.leader() is not None and all(self.healthz(i) for i in range(self.instances))

        eventually(every, timeout=timeout, interval=0.1, what="every instance healthy, one scheduler leading")
