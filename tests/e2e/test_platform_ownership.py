"""``berth up`` owns its services (issue 12, item 7): they die with it even
when it is SIGKILLed; leftovers recorded in the data dir are stopped by the
next ``berth up`` and by ``berth down`` (never a process that merely reused
a pid); it refuses ports another process listens on, naming it; one
``berth up`` per data directory."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from berth import local
from tests.support.docker_engine import TEST_LABEL, engine, remove_labelled
from tests.support.platform import ROOT, RunningPlatform, eventually, free_port

pytestmark = [pytest.mark.docker, pytest.mark.e2e]


def running(pid: int) -> bool:
    return local.process_start_time(pid) is not None


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[RunningPlatform]:
    p = RunningPlatform(tmp_path / "data")
    p.data_dir.mkdir()
    leftovers: list[subprocess.Popen[bytes]] = []
    p.leftovers = leftovers  # type: ignore[attr-defined]
    try:
        yield p
    finally:
        p.stop()
        for proc in leftovers:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        # whatever a failed test left of the platform
        local.stop_processes(local.recorded_processes(p.data_dir / local.RUN_DIR), timeout=5)
        p.remove_containers()
        remove_labelled(engine(), TEST_LABEL)


def platform_pids(p: RunningPlatform) -> dict[str, int]:
    return {r.name: r.pid for r in local.recorded_processes(p.data_dir / local.RUN_DIR) if r.running()}


def fake_leftover(p: RunningPlatform, name: str, marker: str, port: int | None = None) -> subprocess.Popen[bytes]:
    """A process that looks like a service a killed berth up left: its
    command line names ``marker``, it is recorded in ``run/<name>.pid``, and
    it holds ``port`` if given."""
    code = "import socket, sys, time\n"
    if port is not None:
        code += (f"s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen()\n")
    code += "print('ready', flush=True)\ntime.sleep(300)\n"
    proc = subprocess.Popen([sys.executable, "-c", code, marker], stdout=subprocess.PIPE, start_new_session=True)
    p.leftovers.append(proc)  # type: ignore[attr-defined]
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    local.record_process(p.data_dir / local.RUN_DIR, name, proc.pid, marker)
    return proc


def test_services_die_with_a_sigkilled_berth_up_and_the_next_one_starts_clean(platform: RunningPlatform) -> None:
    platform.start()
    pids = platform_pids(platform)
    assert {"registry", "secrets", "scheduler", "router"} <= set(pids)
    workers = [pid for name, pid in pids.items() if name.startswith("router-worker-")]
    assert len(workers) >= 1, pids  # the router's workers record themselves
    assert platform.process is not None
    platform.process.kill()  # as an OOM killer would: no chance to stop anything itself
    platform.process.wait()
    killed = time.monotonic()
    eventually(lambda: not any(running(pid) for pid in pids.values()), timeout=15, what="every service exited")
    print(f"\nOWNERSHIP services gone {time.monotonic() - killed:.2f} s after SIGKILL of berth up")
    for name, port in platform.ports.items():
        assert local.describe_port_holder("127.0.0.1", port) is None, f"{name} port {port} still taken"

    platform.start()  # the same ports, the same data dir: no leftover answers in its place
    fresh = platform_pids(platform)
    assert not set(fresh.values()) & set(pids.values())
    assert platform.get("nope", "production").status_code == 404  # this router, with its table


def test_leftovers_are_stopped_by_the_next_berth_up(platform: RunningPlatform) -> None:
    stale = fake_leftover(platform, "registry", "services.registry", port=platform.ports["registry"])
    platform.start()
    assert stale.wait(10) is not None  # stopped, and its port handed to the real registry
    out = (platform.data_dir / "berth-up.out").read_text()
    assert f"stopped registry (pid {stale.pid}), left running by a previous berth up" in out
    assert platform_pids(platform)["registry"] != stale.pid


def test_berth_down_stops_leftovers_and_never_a_reused_pid(platform: RunningPlatform) -> None:
    stale = fake_leftover(platform, "router-worker-1", "services.router")
    bystander = fake_leftover(platform, "scheduler", "services.scheduler")
    # the record says another process than the one now holding that pid (as after pid reuse)
    record = platform.data_dir / local.RUN_DIR / "scheduler.pid"
    data = json.loads(record.read_text())
    record.write_text(json.dumps({**data, "start_time": data["start_time"] - 1}))

    result = platform.cli("down", "--data-dir", str(platform.data_dir))
    assert f"router-worker-1 (pid {stale.pid}" in result.stdout, result.stdout
    assert stale.wait(10) is not None
    assert bystander.poll() is None  # not what was recorded: left alone
    assert not record.exists()
    assert "No platform is running" in platform.cli("down", "--data-dir", str(platform.data_dir)).stdout


def test_berth_up_refuses_a_port_another_process_listens_on(platform: RunningPlatform) -> None:
    stranger = socket.socket()
    stranger.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # the router's bind would join it silently
    stranger.bind(("127.0.0.1", platform.ports["router"]))
    stranger.listen()
    try:
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "berth.cli", "up", "--data-dir", str(platform.data_dir),
             "--router-port", str(platform.ports["router"]), "--registry-port", str(platform.ports["registry"]),
             "--secrets-port", str(platform.ports["secrets"]), "--scheduler-port", str(platform.ports["scheduler"])],
            env=platform.env, capture_output=True, text=True, timeout=60, cwd=ROOT,
        )
        assert result.returncode != 0
        message = " ".join((result.stdout + result.stderr).split())
        assert f"port {platform.ports['router']} (router) is in use" in message, message
        assert f"pid {os.getpid()}" in message, message
        assert "Berth is up" not in result.stdout
        assert time.monotonic() - started < 20
        assert platform_pids(platform) == {}  # nothing was started
        assert not (platform.data_dir / local.PLATFORM_FILE).exists()
    finally:
        stranger.close()


def test_one_berth_up_per_data_dir(platform: RunningPlatform) -> None:
    platform.start()
    other = {name: free_port() for name in platform.ports}
    result = subprocess.run(
        [sys.executable, "-m", "berth.cli", "up", "--data-dir", str(platform.data_dir),
         "--router-port", str(other["router"]), "--registry-port", str(other["registry"]),
         "--secrets-port", str(other["secrets"]), "--scheduler-port", str(other["scheduler"])],
        env=platform.env, capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert result.returncode != 0
    assert "already runs from" in " ".join(result.stderr.split())
    assert platform.get("nope", "production").status_code == 404  # the first one still serves
    assert platform.process is not None and platform.process.poll() is None

    platform.process.send_signal(signal.SIGTERM)  # a graceful stop removes every record
    platform.process.wait(60)
    assert platform_pids(platform) == {}
