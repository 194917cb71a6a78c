"""Log rotation by size (services/common/logs.py): a bounded number of
bounded files, the newest lines kept, and several processes appending to
(and rotating) one file without tearing a line or losing the newest."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from services.common import logs

ROOT = Path(__file__).resolve().parents[1]


def log_files(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + "*"), key=lambda p: p.name)


def test_one_writer_keeps_a_bounded_number_of_bounded_files(tmp_path: Path) -> None:
    path = tmp_path / "svc.log"
    target = logs.RotatingLogFile(path, max_bytes=10_000, backups=3)
    try:
        for i in range(2_000):
            target.write(json.dumps({"n": i, "pad": "x" * 60}) + "\n")
    finally:
        target.close()
    files = [p for p in log_files(path) if not p.name.endswith(".lock")]
    assert [p.name for p in files] == ["svc.log", "svc.log.1", "svc.log.2", "svc.log.3"]
    assert all(p.stat().st_size <= 10_000 for p in files), [p.stat().st_size for p in files]
    # oldest to newest: .3, .2, .1, current; consecutive numbers ending at the last line written
    numbers = [json.loads(line)["n"] for p in reversed(files) for line in p.read_text().splitlines()]
    assert numbers == list(range(numbers[0], 2_000))
    assert numbers[0] > 0  # the oldest lines were dropped


def test_zero_backups_keeps_only_the_current_file(tmp_path: Path) -> None:
    path = tmp_path / "svc.log"
    target = logs.RotatingLogFile(path, max_bytes=1_000, backups=0)
    try:
        for i in range(500):
            target.write(f"line {i}\n")
    finally:
        target.close()
    assert [p.name for p in log_files(path) if not p.name.endswith(".lock")] == ["svc.log"]
    assert path.stat().st_size <= 1_000 and path.read_text().endswith("line 499\n")


WRITER = textwrap.dedent("""
    import logging, sys
    from services.common import logs
    logs.configure("router")
    log = logging.getLogger("berth.test")
    name = sys.argv[1]
    for i in range(int(sys.argv[2])):
        log.info("request", extra={"writer": name, "n": i, "pad": "y" * 80})
    print("stray output after logging is set up", file=sys.stderr)
    logging.shutdown()
""")


def test_several_processes_share_one_rotating_file(tmp_path: Path) -> None:
    """As the router's workers do: each appends and rotates ``router.log``;
    no line is torn, the file count and sizes stay bounded, and what is kept
    of each writer is the newest part of what it wrote, in order."""
    path = tmp_path / "router.log"
    env = {**os.environ, "BERTH_LOG_FILE": str(path), "BERTH_LOG_MAX_BYTES": "200000", "BERTH_LOG_BACKUPS": "2",
           "PYTHONPATH": str(ROOT)}
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, f"w{i}", "20000"], env=env, cwd=ROOT,
                         stderr=subprocess.PIPE)
        for i in range(4)
    ]
    try:
        for proc in writers:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err.decode()
            assert err == b""  # stderr went into the log file once logging was set up
    finally:
        for proc in writers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    files = [p for p in log_files(path) if not p.name.endswith(".lock")]
    assert [p.name for p in files] == ["router.log", "router.log.1", "router.log.2"]
    # each writer keeps within the limit; writers appending at the same instant near it may add theirs
    assert all(p.stat().st_size <= 4 * 200_000 for p in files), [p.stat().st_size for p in files]
    assert sum(p.stat().st_size <= 200_000 for p in files) >= 2, [p.stat().st_size for p in files]
    kept: dict[str, list[int]] = {}
    for p in reversed(files):  # oldest first
        for line in p.read_text().splitlines():
            if line == "stray output after logging is set up":
                continue
            record = json.loads(line)  # never a torn or interleaved line
            assert record["event"] == "request" and record["service"] == "router"
            kept.setdefault(record["writer"], []).append(record["n"])
    assert kept, "nothing kept"
    for writer, numbers in kept.items():  # a writer's newest lines, none missing in between, in order
        assert numbers == list(range(numbers[0], 20_000)), writer
    assert "stray output after logging is set up" in path.read_text() + (tmp_path / "router.log.1").read_text()
    total = sum(p.stat().st_size for p in files)
    assert total < 4 * 20_000 * 100  # far less than was written: old files were dropped


def test_configure_rejects_a_bad_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BERTH_LOG_MAX_BYTES", "lots")
    with pytest.raises(ValueError, match="BERTH_LOG_MAX_BYTES"):
        logs.configure("registry", log_file=str(tmp_path / "x.log"))


@pytest.mark.docker
@pytest.mark.e2e
def test_berth_up_rotates_every_service_log_and_the_access_log(tmp_path: Path) -> None:
    """A real ``berth up`` with a 40 kB limit and 2 backups: thousands of
    requests (unknown project: the unauthenticated kind) leave at most three
    router log files, each bounded, the newest request in the current one;
    every service writes its own log, and its pre-logging stderr apart."""
    import http.client

    from tests.support.platform import RunningPlatform, eventually

    platform = RunningPlatform(tmp_path / "data")
    platform.data_dir.mkdir()
    platform.env.update({"BERTH_LOG_MAX_BYTES": "40000", "BERTH_LOG_BACKUPS": "2"})
    try:
        platform.start()
        port = int(platform.router.rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            for i in range(3000):
                conn.request("GET", f"/flood/{i}", headers={"X-Berth-Project": "nobody", "X-Berth-Environment": "x"})
                resp = conn.getresponse()
                resp.read()
                assert resp.status == 404
            conn.request("GET", "/the-newest-line", headers={"X-Berth-Project": "nobody", "X-Berth-Environment": "x"})
            conn.getresponse().read()
        finally:
            conn.close()
        logs_dir = platform.data_dir / "logs"
        router_log = logs_dir / "router.log"
        eventually(lambda: "/the-newest-line" in router_log.read_text(), timeout=5, what="the newest line logged")
        files = sorted(p.name for p in logs_dir.glob("router.log*") if not p.name.endswith(".lock"))
        assert files == ["router.log", "router.log.1", "router.log.2"], files
        sizes = {p.name: p.stat().st_size for p in logs_dir.glob("router.log*") if not p.name.endswith(".lock")}
        # within the limit, or (two workers and the supervisor appending at one instant) a few times it
        assert all(size <= 3 * 40_000 for size in sizes.values()), sizes
        assert sizes["router.log.1"] <= 40_000 or sizes["router.log.2"] <= 40_000, sizes
        assert sum(sizes.values()) < 3000 * 200  # far less than the access log's 3000 lines took
        for service in ("registry", "secrets", "scheduler", "router"):
            assert (logs_dir / f"{service}.log").stat().st_size > 0
            assert (logs_dir / f"{service}.stderr.log").exists()
    finally:
        platform.stop()
        platform.remove_containers()
