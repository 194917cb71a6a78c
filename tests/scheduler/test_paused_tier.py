"""The paused tier on a real engine, through a real platform (``berth up``)
and its router: an idle min-0 binding is paused (``docker pause``) after its
pause window and woken by the next request through the router; a request in
flight keeps it from pausing; a paused replica is adopted as it is after the
control plane restarts (not recreated, not a crash); it is stopped after its
stop window. The windows are the binding's own (``berth deploy --idle-pause
--idle-stop``, ``berth deployment scale --idle-stop``): the scheduler's
defaults (60 s, 15 min) would not pause or stop it within these tests."""
from __future__ import annotations

import contextlib
import io
import pathlib
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import docker
import pytest
import requests

from tests.support import docker_engine
from tests.support.docker_engine import BUSYBOX, RUN_ID, engine
from tests.support.platform import RunningPlatform, eventually

pytestmark = pytest.mark.docker

# A busybox httpd worker whose CGI sleeps for ``?sleep=N`` seconds before it
# answers (the slow request held open across the pause window).
CGI = """#!/bin/sh
case "$QUERY_STRING" in sleep=*) sleep "${QUERY_STRING#sleep=}";; esac
echo "Content-Type: text/plain"
echo ""
echo "version=paused-tier"
echo "host=$HOSTNAME"
"""
ENTRYPOINT = """#!/bin/sh
mkdir -p /www/cgi-bin
cp /app/cgi.sh /www/cgi-bin/index.cgi
chmod +x /www/cgi-bin/index.cgi
exec httpd -f -p "${PORT:-8080}" -h /www
"""
PAUSE = 3  # the binding's pause window, seconds


def _build_slow_worker(client: docker.DockerClient) -> tuple[str, str]:
    tag = f"berth-test-worker:paused-{uuid.uuid4().hex[:8]}"
    dockerfile = """FROM scratch
COPY busybox /bin/busybox
COPY applets/ /bin/
COPY entrypoint.sh /app/entrypoint.sh
COPY cgi.sh /app/cgi.sh
ENV PATH=/bin
ENTRYPOINT ["/bin/busybox", "sh", "/app/entrypoint.sh"]
"""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        docker_engine._add(tar, "Dockerfile", dockerfile.encode(), 0o644)
        with open(BUSYBOX, "rb") as f:
            docker_engine._add(tar, "busybox", f.read())
        docker_engine._add(tar, "entrypoint.sh", ENTRYPOINT.encode())
        docker_engine._add(tar, "cgi.sh", CGI.encode())
        docker_engine._add_applets(tar)
    buf.seek(0)
    image, _ = client.images.build(fileobj=buf, custom_context=True, tag=tag, labels={"berth.test": RUN_ID}, rm=True)
    return tag, image.id


class Deployed:
    def __init__(self, platform: RunningPlatform, key: str, project: str, deployment: str) -> None:
        self.platform, self.key, self.project, self.deployment = platform, key, project, deployment

    def replicas(self) -> list[Any]:
        """This deployment's containers as the engine lists them now."""
        return engine().containers.list(
            all=True, ignore_removed=True,
            filters={"label": [f"berth.instance={self.platform.instance}", f"berth.deployment={self.deployment}"]},
        )

    def statuses(self) -> list[str]:
        return [c.status for c in self.replicas()]

    def status(self) -> dict[str, Any]:
        [binding] = self.platform.cli_json(
            "deployment", "status", self.deployment, "--project", self.project, api_key=self.key
        )["bindings"]
        return binding

    def get(self, path: str = "/cgi-bin/index.cgi", timeout: float = 60) -> requests.Response:
        return requests.get(
            self.platform.router + path,
            headers={"X-Berth-Project": self.project, "X-Berth-Environment": "preview"}, timeout=timeout,
        )


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    data = pathlib.Path(tmp_path_factory.mktemp("paused")) / "data"
    data.mkdir()
    platform = RunningPlatform(data)
    platform.env.update({"BERTH_DRAIN_DELAY": "0.5", "BERTH_SCALE_DOWN_WINDOW": "2"})
    image = ""
    try:
        tag, image = _build_slow_worker(engine())
        platform.start()
        created = platform.cli_json("projects", "create", "paused")
        key = created["api_key"]
        dep = platform.cli_json(
            "deploy", "--image", tag, "--project", "paused", "--min-replicas", "0", "--max-replicas", "1",
            "--idle-pause", f"{PAUSE}s", "--idle-stop", "10m", "--no-wait", api_key=key,
        )["deployment"]["id"]
        yield Deployed(platform, key, "paused", dep)
    finally:
        platform.stop()
        platform.remove_containers()
        if image:
            with contextlib.suppress(docker.errors.APIError):
                engine().images.remove(image, force=True)


def _awake(d: Deployed) -> str:
    """A request through the router answers 200; the container id it ran on."""
    answer = d.get()
    assert answer.status_code == 200, answer.text
    assert "version=paused-tier" in answer.text
    [replica] = d.replicas()
    return str(replica.id)


def _paused(d: Deployed) -> str:
    def check() -> str | None:
        found = d.replicas()
        return str(found[0].id) if [c.status for c in found] == ["paused"] else None

    return eventually(check, timeout=60, interval=0.2, what="the replica paused")


def test_pause_after_idle_then_wake_through_the_router(deployed: Deployed) -> None:
    first = _awake(deployed)  # activation from zero (a cold start)
    paused_id = _paused(deployed)
    assert paused_id == first  # the same container, frozen, not replaced
    status = deployed.status()
    assert [r["state"] for r in status["replicas"]] == ["paused"], status
    assert status["status"] != "scaled_to_zero", status  # that word stays for stopped replicas

    woke = _awake(deployed)  # the router activates; the scheduler thaws it
    assert woke == paused_id
    assert deployed.statuses() == ["running"]
    assert [r["state"] for r in deployed.status()["replicas"]] == ["ready"]


def test_no_pause_with_a_request_in_flight(deployed: Deployed) -> None:
    _awake(deployed)
    held = 3 * PAUSE
    answers: list[requests.Response] = []
    slow = threading.Thread(target=lambda: answers.append(deployed.get(f"/cgi-bin/index.cgi?sleep={held}")))
    slow.start()
    seen: list[list[str]] = []
    try:
        # Across the whole time the request is open (three pause windows),
        # the replica is never paused.
        while slow.is_alive():
            seen.append(deployed.statuses())
            time.sleep(0.2)
    finally:
        slow.join(held + 60)
    assert answers and answers[0].status_code == 200, answers
    assert len(seen) > 5
    assert all(s == ["running"] for s in seen), seen
    _paused(deployed)  # and once it is done, the idle window pauses it


def test_paused_replica_adopted_after_restart(deployed: Deployed) -> None:
    _awake(deployed)
    paused_id = _paused(deployed)
    deployed.platform.stop()
    assert deployed.statuses() == ["paused"]  # replicas outlive the control plane
    deployed.platform.start()
    status = deployed.status()
    assert [(r["id"], r["state"]) for r in status["replicas"]] == [(paused_id, "paused")], status
    # Adopted as it is: not recreated, not thawed, not a crash.
    time.sleep(PAUSE)
    assert [str(c.id) for c in deployed.replicas()] == [paused_id]
    assert deployed.statuses() == ["paused"]
    errors = deployed.platform.cli_json(
        "deployment", "errors", deployed.deployment, "--project", deployed.project, api_key=deployed.key
    )["errors"]
    assert errors == [], errors
    assert _awake(deployed) == paused_id  # and the next request wakes it


def test_stopped_after_idle_stop(deployed: Deployed) -> None:
    scaled = deployed.platform.cli_json(
        "deployment", "scale", deployed.deployment, "--project", deployed.project, "--idle-stop", "8s",
        api_key=deployed.key,
    )["binding"]
    # The stop window changed, the pause window and the bounds kept.
    assert (scaled["idle_pause_seconds"], scaled["idle_stop_seconds"]) == (PAUSE, 8)
    assert (scaled["min_replicas"], scaled["max_replicas"]) == (0, 1)
    bad = deployed.platform.cli("deployment", "scale", deployed.deployment, "--project", deployed.project,
                                "--idle-stop", "2d", api_key=deployed.key, check=False)
    assert bad.returncode != 0 and "is not a duration" in bad.stderr
    # The same through the REST API: out of range is a 400 naming the field, nothing changed.
    rest = f"{deployed.platform.router}/api/v1/deployments/{deployed.deployment}/scale"
    refused = requests.post(rest, json={"min_replicas": 0, "max_replicas": 1, "idle_stop_seconds": 86_401},
                            headers={"X-API-KEY": deployed.key}, timeout=30)
    assert refused.status_code == 400 and "idle_stop_seconds" in refused.text, refused.text
    again = requests.post(rest, json={"min_replicas": 0, "max_replicas": 1, "idle_stop_seconds": 8},
                          headers={"X-API-KEY": deployed.key}, timeout=30)
    assert again.status_code == 200, again.text
    assert (again.json()["binding"]["idle_pause_seconds"], again.json()["binding"]["idle_stop_seconds"]) == (PAUSE, 8)
    _awake(deployed)
    _paused(deployed)  # paused first (3 s) ...
    eventually(lambda: deployed.replicas() == [], timeout=90, interval=0.5, what="the paused replica stopped")
    assert deployed.status()["status"] == "scaled_to_zero"
    _awake(deployed)  # a cold start again


def test_paused_replicas_stopped_when_the_host_needs_the_memory(deployed: Deployed) -> None:
    deployed.platform.stop()
    # A floor above any host's available memory: every paused replica is
    # in the way, so it is stopped long before its stop window (10 min).
    deployed.platform.env["BERTH_PAUSE_MEMORY_FLOOR"] = str(10**9)  # MiB
    try:
        deployed.platform.start()
        deployed.platform.cli_json(
            "deployment", "scale", deployed.deployment, "--project", deployed.project, "--idle-stop", "10m",
            api_key=deployed.key,
        )
        _awake(deployed)
        eventually(lambda: deployed.replicas() == [], timeout=90, interval=0.2, what="the replica stopped")
        assert deployed.status()["status"] == "scaled_to_zero"
        _awake(deployed)  # and it comes back on the next request
    finally:
        deployed.platform.stop()
        del deployed.platform.env["BERTH_PAUSE_MEMORY_FLOOR"]
