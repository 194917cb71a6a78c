"""``berth up`` as a user runs it: a real subprocess on free ports with its
own data directory, driven through the real CLI."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import requests

from tests.support.docker_engine import TEST_LABEL, engine, remove_labelled

ROOT = pathlib.Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def eventually(check: Callable[[], Any], *, timeout: float = 30, interval: float = 0.2, what: str = "condition") -> Any:
    """Polls ``check`` until it returns something truthy, or fails with the
    last value seen."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (requests.RequestException, AssertionError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"{what} not reached within {timeout}s; last: {last!r}")


class RunningPlatform:
    def __init__(self, data_dir: pathlib.Path) -> None:
        self.data_dir = data_dir
        self.ports = {name: free_port() for name in ("router", "registry", "secrets", "scheduler")}
        self.router = f"http://127.0.0.1:{self.ports['router']}"
        self.process: subprocess.Popen[bytes] | None = None
        self.env = {
            **os.environ,
            "BERTH_DATA_DIR": str(data_dir),
            "BERTH_API_KEY": "",
            "BERTH_PROJECT": "",
        }
        for key in ("BERTH_REGISTRY_ADDR", "BERTH_SECRETS_ADDR", "BERTH_SCHEDULER_ADDR"):
            self.env.pop(key, None)

    def start(self, timeout: float = 90) -> None:
        out_path = self.data_dir / "berth-up.out"
        offset = out_path.stat().st_size if out_path.exists() else 0
        log = open(out_path, "ab")
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "berth.cli", "up", "--data-dir", str(self.data_dir),
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

    def output(self) -> str:
        text = (self.data_dir / "berth-up.out").read_text(errors="replace")
        for log in sorted((self.data_dir / "logs").glob("*.log")):
            text += f"\n--- {log.name}\n" + log.read_text(errors="replace")[-4000:]
        return text

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    @property
    def instance(self) -> str:
        return (self.data_dir / "instance").read_text().strip()

    def containers(self) -> list[Any]:
        return engine().containers.list(all=True, filters={"label": f"berth.instance={self.instance}"}, ignore_removed=True)

    def remove_containers(self) -> None:
        if not (self.data_dir / "instance").exists():
            return
        for container in self.containers():
            try:
                container.remove(force=True)
            except Exception:  # noqa: BLE001 - already gone
                pass

    def cli(self, *args: str, api_key: str = "", input: str | None = None, check: bool = True,
            cwd: pathlib.Path | None = None, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        env = {**self.env, "BERTH_API_KEY": api_key, **(env_extra or {})}
        result = subprocess.run(
            [sys.executable, "-m", "berth.cli", *args], env=env, capture_output=True, text=True,
            input=input, timeout=300, cwd=cwd or ROOT,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"berth {' '.join(args)} failed ({result.returncode}): {result.stderr}\n{self.output()}")
        return result

    def cli_json(self, *args: str, api_key: str = "", **kw: Any) -> Any:
        result = self.cli(*args, "--output", "json", api_key=api_key, **kw)
        return json.loads(result.stdout)["data"]

    def get(self, project: str, environment: str, path: str = "/", **headers: str) -> requests.Response:
        return requests.get(
            self.router + path,
            headers={"X-Berth-Project": project, "X-Berth-Environment": environment, **headers},
            timeout=60,
        )


@contextmanager
def started_platform(data_dir: pathlib.Path) -> Iterator[RunningPlatform]:
    """A `berth up` on free ports with its data under ``data_dir``; stopped
    and its replicas and this run's images removed afterwards."""
    p = RunningPlatform(data_dir)
    p.data_dir.mkdir()
    p.start()
    try:
        yield p
    finally:
        p.stop()
        p.remove_containers()
        remove_labelled(engine(), TEST_LABEL)
