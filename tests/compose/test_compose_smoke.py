"""The containerised platform: docker-compose brings up the four services and
PostgreSQL; a user deploys, routes and promotes through it."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys

import pytest
import requests

from tests.support.docker_engine import engine
from tests.support.platform import ROOT, eventually, free_port

pytestmark = [pytest.mark.docker, pytest.mark.compose]


@pytest.fixture(scope="module")
def compose(tmp_path_factory):
    work = tmp_path_factory.mktemp("compose")
    ports = {name: free_port() for name in ("ROUTER", "REGISTRY", "SECRETS", "SCHEDULER", "PG")}
    instance = "ctest" + secrets.token_hex(3)
    settings = {
        "BERTH_SERVICE_TOKEN": "berth_svc_" + secrets.token_hex(16),
        "BERTH_ADMIN_KEY": "berth_admin_" + secrets.token_hex(16),
        "BERTH_PG_PASSWORD": secrets.token_hex(8),
        "BERTH_INSTANCE": instance,
        **{f"BERTH_{name}_PORT": str(port) for name, port in ports.items()},
    }
    env_file = work / "compose.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    env = {**os.environ, "BERTH_COMPOSE_ENV_FILE": str(env_file), "COMPOSE_PROJECT_NAME": f"berth{instance}"}
    up = subprocess.run(["bash", str(ROOT / "scripts" / "compose.sh"), "up"], env=env, capture_output=True, text=True, timeout=1200)
    try:
        assert up.returncode == 0, f"compose up failed:\n{up.stdout[-6000:]}\n{up.stderr[-6000:]}"
        yield settings, ports, work
    finally:
        subprocess.run(["bash", str(ROOT / "scripts" / "compose.sh"), "down"], env=env, capture_output=True, timeout=300)
        docker = engine()
        for image in docker.images.list(filters={"label": "berth.project=smoke"}):
            docker.images.remove(image.id, force=True)
        try:
            docker.images.remove("berth:dev", force=True)  # the platform image this test built
        except Exception:  # noqa: BLE001 - already gone
            pass


def test_deploy_route_promote_through_compose(compose):
    settings, ports, work = compose
    env = {
        **os.environ,
        "BERTH_ADMIN_KEY": settings["BERTH_ADMIN_KEY"],
        "BERTH_REGISTRY_ADDR": f"127.0.0.1:{ports['REGISTRY']}",
        "BERTH_SECRETS_ADDR": f"127.0.0.1:{ports['SECRETS']}",
        "BERTH_SCHEDULER_ADDR": f"127.0.0.1:{ports['SCHEDULER']}",
        "BERTH_DATA_DIR": str(work / "cli"),
        "BERTH_PROJECT": "smoke",
    }

    def berth(*args: str, key: str = "") -> dict:
        result = subprocess.run([sys.executable, "-m", "berth.cli", *args, "--output", "json"],
                                env={**env, "BERTH_API_KEY": key}, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)["data"]

    key = berth("projects", "create", "smoke")["api_key"]
    deployed = berth("deploy", str(ROOT / "examples" / "hello"), key=key)
    dep_id = deployed["deployment"]["id"]
    assert deployed["status"] == "running"

    router = f"http://127.0.0.1:{ports['ROUTER']}"
    answer = requests.get(router, headers={"X-Berth-Project": "smoke", "X-Berth-Environment": "preview"}, timeout=30)
    assert answer.status_code == 200 and answer.headers["X-Berth-Deployment"] == dep_id
    assert "Hello from Berth!" in answer.text

    berth("promote", dep_id, "--to", "staging", key=key)
    staging = eventually(
        lambda: (lambda r: r if r.status_code == 200 else None)(
            requests.get(router, headers={"X-Berth-Project": "smoke", "X-Berth-Environment": "staging"}, timeout=30)),
        what="staging serves the promoted deployment",
    )
    assert staging.headers["X-Berth-Deployment"] == dep_id and "environment=staging" in staging.text
