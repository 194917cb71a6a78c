"""``berth logs`` against a real ``berth up`` (issue 16): a worker that
prints a line at start and one per request, a worker that crashes at start;
the follow sees a replica started after it began, the crash reason is kept
after the crashed containers are gone, --since/--tail bound what is printed,
JSON lines parse, Ctrl-C ends a follow cleanly; and the REST endpoint
(``GET /api/v1/deployments/{id}/logs``), plain and as server-sent events."""
from __future__ import annotations

import json
import pathlib
import re
import signal
import subprocess
import sys
import threading
import uuid
from datetime import datetime

import pytest
import requests

from tests.support.docker_engine import write_worker_context
from tests.support.platform import ROOT, RunningPlatform, eventually, started_platform

pytestmark = [pytest.mark.docker, pytest.mark.e2e]

LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) ([0-9a-f]{12})( \(kept\))? (stdout|stderr) (.*)$")


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    with started_platform(tmp_path_factory.mktemp("logs") / "data") as p:
        yield p


def worker_dir(root: pathlib.Path, project: str, *, crash: str = "") -> pathlib.Path:
    """The busybox worker, printing ``worker starting`` (stdout) at start
    and ``request served ... query=QUERY`` (stderr) per request (its health
    checks too: busybox httpd answers ``/`` with the CGI); or, with
    ``crash``, printing it to stderr and exiting 3 at start."""
    write_worker_context(str(root), version="logs")
    entrypoint = root / "entrypoint.sh"
    text = entrypoint.read_text()
    if crash:
        text = text.replace("exec httpd", f'echo "{crash} (version $WORKER_VERSION)" >&2; exit 3\nexec httpd')
    else:
        text = text.replace("exec httpd", 'echo "worker starting on port $PORT"\nexec httpd')
    entrypoint.write_text(text)
    cgi = root / "cgi.sh"
    cgi.write_text(cgi.read_text() + 'echo "request served version=$WORKER_VERSION query=$QUERY_STRING" >&2\n')
    (root / "berth.toml").write_text(f'project = "{project}"\n\n[worker]\nport = 8080\nhealth_path = "/"\n')
    return root


def when(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


class Follow:
    """``berth logs ... --follow`` as a subprocess; its stdout lines collected."""

    def __init__(self, platform: RunningPlatform, key: str, *args: str) -> None:
        env = {**platform.env, "BERTH_API_KEY": key}
        self.process = subprocess.Popen([sys.executable, "-m", "berth.cli", "logs", "--follow", *args], env=env,
                                        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def interrupt(self) -> tuple[int, str]:
        """Ctrl-C, as on a terminal."""
        self.process.send_signal(signal.SIGINT)
        code = self.process.wait(30)
        self._reader.join(10)
        assert self.process.stderr is not None
        return code, self.process.stderr.read()


def test_logs_follow_scale_up_crash_tail_since_tail_json_and_rest(platform: RunningPlatform, tmp_path):
    project = f"l{uuid.uuid4().hex[:8]}"
    key = platform.cli_json("projects", "create", project)["api_key"]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return platform.cli(*args, "--project", project, api_key=key, check=False)

    deployed = platform.cli_json("deploy", str(worker_dir(tmp_path / "w", project)), "-e", "staging",
                                 "--project", project, api_key=key)
    dep = deployed["deployment"]["id"]

    follow = Follow(platform, key, "-e", "staging", "--output", "json", "--project", project)
    try:
        first = eventually(lambda: [json.loads(x) for x in follow.lines if "worker starting" in x], timeout=60,
                           what="the first replica's start line")
        assert first[0]["stream"] == "stdout" and first[0]["environment"] == "staging"
        assert platform.get(project, "staging", "/cgi-bin/index.cgi?followed").status_code == 200
        served = eventually(lambda: [json.loads(x) for x in follow.lines if "query=followed" in x], timeout=60,
                            what="the request's line")
        assert served[0]["stream"] == "stderr" and served[0]["text"] == "request served version=logs query=followed"

        # A replica started after the follow began joins it.
        assert cli("deployment", "scale", dep, "--min-replicas", "2", "--max-replicas", "2", "-e", "staging"
                   ).returncode == 0
        started = eventually(
            lambda: len({json.loads(x)["replica_id"] for x in follow.lines if "worker starting" in x}) >= 2 or None,
            timeout=90, what="a start line from the second replica",
        )
        assert started
    finally:
        code, stderr = follow.interrupt()
    assert code == 0 and "Traceback" not in stderr, stderr  # Ctrl-C ends a follow cleanly
    for line in follow.lines:  # JSON lines parse, every one
        data = json.loads(line)
        assert set(data) >= {"time", "replica_id", "replica_index", "environment", "stream", "text"}

    # Plain output: TIME REPLICA STREAM TEXT, merged in time order.
    plain = cli("logs", dep)
    assert plain.returncode == 0, plain.stderr
    rows = [LINE.match(x) for x in plain.stdout.splitlines()]
    assert rows and all(rows), plain.stdout
    assert [r.group(1) for r in rows] == sorted(r.group(1) for r in rows)  # type: ignore[union-attr]
    assert {r.group(2) for r in rows if "worker starting" in r.group(5)} == {  # type: ignore[union-attr]
        json.loads(x)["replica_id"][:12] for x in follow.lines if "worker starting" in x}
    # (the replicas keep printing: a later read has the earlier lines, maybe more)
    last_one = cli("logs", dep, "--tail", "1").stdout.splitlines()
    assert len(last_one) == 1 and LINE.match(last_one[0]).group(1) >= rows[-1].group(1)  # type: ignore[union-attr]
    assert cli("logs", dep, "--tail", "0").stdout == ""
    recent = cli("logs", "-e", "staging", "--since", "1h", "--output", "json")
    texts = [(json.loads(x)["replica_id"][:12], json.loads(x)["text"]) for x in recent.stdout.splitlines()]
    assert texts[:len(rows)] == [(r.group(2), r.group(5)) for r in rows]  # type: ignore[union-attr]
    cut = json.loads(recent.stdout.splitlines()[-1])["time"]
    since = cli("logs", dep, "--since", cut, "--output", "json")
    assert since.stdout.splitlines() and all(when(json.loads(x)["time"]) >= when(cut) for x in since.stdout.splitlines())
    assert len(since.stdout.splitlines()) < len(rows)

    # Refusals, with the CLI's exit codes.
    assert cli("logs", dep, "--tail", "10001").returncode == 2
    bad_since = cli("logs", dep, "--since", "yesterday")
    assert bad_since.returncode == 2 and "--since" in bad_since.stderr
    other_key = platform.cli_json("projects", "create", f"o{uuid.uuid4().hex[:8]}")["api_key"]
    assert platform.cli("logs", dep, api_key=other_key, check=False).returncode == 3
    unknown = cli("logs", dep, "--replica", "ffffffffffff")
    assert unknown.returncode == 3 and "no replica" in unknown.stderr

    # A worker that crashes at start: the reason, kept after its containers are removed.
    crash = "fatal: DATABASE_URL is not set"
    crashed = platform.cli("deploy", str(worker_dir(tmp_path / "c", project, crash=crash)), "--project", project,
                           "--timeout", "120", api_key=key, check=False)
    assert crashed.returncode == 5, crashed.stdout + crashed.stderr
    bad = re.search(r"Deployed (dep_\w+)", crashed.stdout).group(1)  # type: ignore[union-attr]
    kept = eventually(lambda: [x for x in cli("logs", bad).stdout.splitlines() if "(kept)" in x and crash in x],
                      timeout=120, what="a kept crash tail")
    assert LINE.match(kept[0]) and " stderr " in kept[0]
    assert kept[0].endswith(f"{crash} (version logs)")  # the image's own ENV is not taken for a secret

    # REST: the same lines as JSON, and a follow as server-sent events.
    headers = {"X-API-KEY": key}
    got = requests.get(f"{platform.router}/api/v1/deployments/{dep}/logs", params={"tail": "3"}, headers=headers,
                       timeout=30)
    assert got.status_code == 200, got.text
    lines = got.json()["lines"]
    assert len(lines) == 3 and all(x["environment"] == "staging" for x in lines)
    assert when(lines[0]["time"]) <= when(lines[-1]["time"])
    refused = requests.get(f"{platform.router}/api/v1/deployments/{dep}/logs", params={"tail": "-1"},
                           headers=headers, timeout=30)
    assert refused.status_code == 400 and "tail" in refused.text
    with requests.get(f"{platform.router}/api/v1/deployments/{dep}/logs", params={"follow": "true", "tail": "0"},
                      headers=headers, stream=True, timeout=60) as stream:
        assert stream.status_code == 200 and stream.headers["Content-Type"].startswith("text/event-stream")
        assert platform.get(project, "staging", "/cgi-bin/index.cgi?sse").status_code == 200
        for raw in stream.iter_lines(decode_unicode=True):
            if raw.startswith("data:"):
                event = json.loads(raw[5:])
                if event["text"].endswith("query=sse"):
                    assert event["stream"] == "stderr"
                    break
