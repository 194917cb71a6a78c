"""Runs the README's five-minute walk-through as written (the text between
the walkthrough markers), against a real `berth up`, and checks what each step
printed.

The block is what a user types, so it names the default router address; the
test runs its own platform on free ports with its own data directory (the
ports through `berth up`'s BERTH_*_PORT settings, the CLI finding them in the
data directory), so it runs while a quickstart platform holds the defaults.
The one rewrite is the router's default address in the curl lines."""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess

import pytest
from docker import errors as docker_errors

from tests.support.docker_engine import engine
from tests.support.platform import ROOT, free_port

pytestmark = [pytest.mark.docker, pytest.mark.e2e]

DEFAULT_ROUTER = "http://127.0.0.1:8080"
DEFAULT_PORTS = ("8080", "50051", "50052", "50053")


def walkthrough_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- walkthrough:start -->", 1)[1].split("<!-- walkthrough:end -->", 1)[0]
    body = block.split("```bash", 1)[1].split("```", 1)[0]
    return [line for line in body.strip().splitlines() if line.strip()]


def on_ports(commands: list[str], router: str) -> list[str]:
    """The block with the router's default address replaced by ``router``;
    no other default port may appear in it (the CLI finds the platform's
    addresses in its data directory)."""
    rewritten = [c.replace(DEFAULT_ROUTER, router) for c in commands]
    for command in rewritten:
        assert not any(re.search(rf"\b{p}\b", command) for p in DEFAULT_PORTS), command
    return rewritten


@pytest.fixture
def sandbox(tmp_path):
    seed = subprocess.run(["bash", str(ROOT / "scripts" / "seed-base-images.sh"), "python"], capture_output=True, text=True, timeout=900)
    assert seed.returncode == 0, seed.stderr
    data_dir = tmp_path / "berth-data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BERTH_")}
    env["BERTH_DATA_DIR"] = str(data_dir)
    ports = {name: free_port() for name in ("ROUTER", "REGISTRY", "SECRETS", "SCHEDULER")}
    env.update({f"BERTH_{name}_PORT": str(port) for name, port in ports.items()})
    yield env, data_dir, ports
    subprocess.run([str(ROOT / ".venv" / "bin" / "berth"), "down"], env=env, capture_output=True, timeout=60)
    docker = engine()
    instance_file = data_dir / "instance"
    images = set()
    if instance_file.exists():
        for c in docker.containers.list(all=True, filters={"label": f"berth.instance={instance_file.read_text().strip()}"}):
            images.add(c.attrs["Image"])
            c.remove(force=True)
    for image in docker.images.list(filters={"label": "berth.project=agent"}):
        if image.id in images:  # only what this run deployed, never a user's own
            with contextlib.suppress(docker_errors.APIError):
                docker.images.remove(image.id, force=True)


def test_readme_walkthrough_as_written(sandbox):
    env, data_dir, ports = sandbox
    written = walkthrough_commands()
    assert len(written) >= 10 and any(c.startswith("berth rollback") for c in written)
    assert any(DEFAULT_ROUTER in c for c in written)  # what a user types
    commands = on_ports(written, f"http://127.0.0.1:{ports['ROUTER']}")
    script = "set -euo pipefail\n" + "".join(f"echo '@@STEP {i}'\n{cmd}\necho\n" for i, cmd in enumerate(commands))
    run = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    steps = dict(re.findall(r"@@STEP (\d+)\n(.*?)(?=@@STEP \d+\n|\Z)", run.stdout, flags=re.S))
    assert run.returncode == 0, f"walk-through failed at step {max(map(int, steps), default=-1)}:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"

    def output(prefix: str, nth: int = 0) -> str:
        matches = [i for i, c in enumerate(commands) if c.startswith(prefix)]
        return steps[str(matches[nth])]

    assert "Berth is up" in output("berth up")
    assert "Set AGENT_API_KEY (api_key, project) version 1" in output("printf")

    pinned = json.loads(output("curl -s -H", 0))
    v1 = pinned["deployment"]
    assert v1.startswith("dep_") and pinned["environment"] == "preview" and pinned["version"] == "1"
    assert pinned["api_key_fingerprint"] and "sk-demo-123" not in run.stdout + run.stderr

    stream = output("curl -s -N")
    assert 'data: {"token": "hello"}' in stream and 'data: {"token": "berth"}' in stream and "event: done" in stream

    assert re.search(rf"Promoted staging: \(none\) -> {v1}", output("berth promote $V1 --to staging"))
    assert re.search(rf"Promoted production: \(none\) -> {v1}", output("berth promote $V1 --to production"))
    v2_moved = re.search(rf"Promoted production: {v1} -> (dep_\w+)", output("berth promote $V2 --to production"))
    assert v2_moved, output("berth promote $V2 --to production")
    v2 = v2_moved.group(1)
    assert re.search(rf"Rolled back production: {v2} -> {v1}", output("berth rollback"))
    assert "secrets are not rolled back" in output("berth rollback")

    history = output("berth history")
    kinds = re.findall(r"^\s*(\d+)\s+(promote|rollback|deploy)\s+(dep_\w+)", history, flags=re.M)
    assert [(k, d) for _, k, d in kinds] == [("promote", v1), ("promote", v2), ("rollback", v1)], history

    final = json.loads(output("curl -s -H", 1))
    assert final["deployment"] == v1 and final["environment"] == "production" and final["version"] == "1"

    # it ran on its own ports, never on the defaults a quickstart platform holds
    recorded = json.loads((data_dir / "platform.json").read_text())
    assert recorded["router"] == f"http://127.0.0.1:{ports['ROUTER']}"
    assert recorded["registry"].endswith(f":{ports['REGISTRY']}")
    assert recorded["secrets"].endswith(f":{ports['SECRETS']}")
    assert recorded["scheduler"].endswith(f":{ports['SCHEDULER']}")
