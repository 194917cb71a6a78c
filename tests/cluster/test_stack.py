"""deploy/stack.yml: its shape (parsed with PyYAML: `docker stack config`
does not exist in docker 20.10), the *_FILE variant of the services'
settings, and the README's stack block run as written on the harness's
3-node swarm with the platform image built from the repository's Dockerfile,
then used through the CLI and the routers."""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import docker
import pytest
import requests
import yaml

from services.common import config
from tests.support.docker_engine import RUN_ID, build_worker_image, engine
from tests.support.platform import ROOT, eventually, free_port
from tests.support.swarm import SwarmCluster

STACK = ROOT / "deploy" / "stack.yml"
BERTH_SERVICES = {"registry", "secrets", "scheduler", "router"}
CREDENTIALS = {"BERTH_ADMIN_KEY", "BERTH_MASTER_KEY", "BERTH_SERVICE_TOKEN", "BERTH_DATABASE_URL",
               "BERTH_SECRETS_DATABASE_URL", "POSTGRES_PASSWORD"}
VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def _interpolate(value: Any, variables: dict[str, str]) -> Any:
    """${VAR:-default} as `docker stack deploy` substitutes it."""
    if isinstance(value, str):
        return VAR.sub(lambda m: variables.get(m.group(1), m.group(2) or ""), value)
    if isinstance(value, list):
        return [_interpolate(v, variables) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v, variables) for k, v in value.items()}
    return value


def _stack(variables: dict[str, str] | None = None) -> dict[str, Any]:
    return _interpolate(yaml.safe_load(STACK.read_text()), variables or {})


def _port_of(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


def test_stack_file_runs_the_platform_with_credentials_as_secrets():
    stack = _stack()
    assert stack["version"] >= "3.8"
    services = stack["services"]
    assert set(services) == BERTH_SERVICES | {"postgres"}
    declared_secrets = stack["secrets"]
    assert all(spec == {"external": True} for spec in declared_secrets.values())
    assert stack["networks"]["berth"] == {"driver": "overlay", "attachable": True}

    for name, service in services.items():
        env = service.get("environment", {})
        assert not CREDENTIALS & set(env), f"{name} takes a credential from its environment"
        plain = {k: v for k, v in env.items() if not k.endswith("_FILE")}
        assert not any(re.search(r"berth_(admin|svc)_|postgresql://|password", str(v)) for v in plain.values()), env
        mounted = set(service.get("secrets", []))
        assert mounted <= set(declared_secrets)
        for key, value in env.items():
            if key.endswith("_FILE"):
                assert value.startswith("/run/secrets/") and value.removeprefix("/run/secrets/") in mounted, (name, key)
        assert service["networks"] == ["berth"]
        assert service["deploy"]["endpoint_mode"] == "dnsrr"  # no VIP, no ingress mesh needed
        assert service["deploy"]["restart_policy"]["condition"] == "any"
        for port in service.get("ports", []):
            assert port["mode"] == "host" and port["published"] == port["target"]

    def file_var(service: str, var: str) -> str:
        return services[service]["environment"][var].removeprefix("/run/secrets/")

    # The master key reaches only the secrets service; the admin key the services that authenticate it.
    assert [n for n, s in services.items() if "berth_master_key" in s.get("secrets", [])] == ["secrets"]
    assert file_var("secrets", "BERTH_MASTER_KEY_FILE") == "berth_master_key"
    for name in ("registry", "secrets", "scheduler"):
        assert file_var(name, "BERTH_ADMIN_KEY_FILE") == "berth_admin_key"
    for name in BERTH_SERVICES:
        assert file_var(name, "BERTH_SERVICE_TOKEN_FILE") == "berth_service_token"
    assert file_var("registry", "BERTH_DATABASE_URL_FILE") == file_var("secrets", "BERTH_SECRETS_DATABASE_URL_FILE")
    assert "berth_pg_password" in services["postgres"]["secrets"]
    assert "/run/secrets/berth_pg_password" in " ".join(services["postgres"]["entrypoint"])

    # Each service listens where the others (and its health check) look for it.
    shared = services["router"]["environment"]
    for name in ("registry", "secrets", "scheduler"):
        command = services[name]["command"]
        port = int(command[command.index("--port") + 1])
        assert command[command.index("--host") + 1] == "0.0.0.0"
        assert shared[f"BERTH_{name.upper()}_ADDR"] == f"{name}:{port}"
        assert services[name]["environment"][f"BERTH_{name.upper()}_ADDR"] == f"{name}:{port}"
        assert services[name]["healthcheck"]["test"][-1] == f"127.0.0.1:{port}"
        assert services[name]["ports"][0]["target"] == str(port)
        assert services[name]["deploy"]["placement"]["constraints"] == ["node.role == manager"]
        assert services[name]["deploy"]["replicas"] == 1

    scheduler = services["scheduler"]
    assert scheduler["environment"]["BERTH_RUNTIME"] == "swarm"
    assert scheduler["environment"]["DOCKER_HOST"] == "unix:///var/run/docker.sock"
    assert "/var/run/docker.sock:/var/run/docker.sock" in scheduler["volumes"]

    router = services["router"]
    assert router["deploy"]["mode"] == "global" and "replicas" not in router["deploy"]
    assert router["ports"] == [{"target": "8080", "published": "8080", "protocol": "tcp", "mode": "host"}]
    assert router["command"][router["command"].index("--port") + 1] == "8080"

    assert services["postgres"]["deploy"]["placement"]["constraints"] == ["node.labels.berth.postgres == true"]
    assert "pgdata:/var/lib/postgresql/data" in services["postgres"]["volumes"]

    # Ports follow BERTH_*_PORT everywhere at once.
    moved = _stack({"BERTH_ROUTER_PORT": "18080", "BERTH_REGISTRY_PORT": "15051"})["services"]
    assert moved["router"]["ports"][0]["published"] == "18080" and moved["router"]["command"][-1] == "18080"
    assert moved["router"]["environment"]["BERTH_REGISTRY_ADDR"] == "registry:15051"
    assert moved["registry"]["healthcheck"]["test"][-1] == "127.0.0.1:15051"


def test_settings_read_a_file_named_by_the_file_variant(tmp_path, monkeypatch):
    key = tmp_path / "admin_key"
    key.write_text("berth_admin_from_file\n")
    monkeypatch.delenv("BERTH_TEST_SETTING", raising=False)
    monkeypatch.setenv("BERTH_TEST_SETTING_FILE", str(key))
    assert config.env("BERTH_TEST_SETTING") == "berth_admin_from_file"  # the trailing newline is not part of it
    monkeypatch.setenv("BERTH_TEST_SETTING", "from_env")
    assert config.env("BERTH_TEST_SETTING") == "from_env"  # the variable itself wins
    monkeypatch.delenv("BERTH_TEST_SETTING")
    monkeypatch.setenv("BERTH_TEST_SETTING_FILE", str(tmp_path / "missing"))
    with pytest.raises(SystemExit, match="BERTH_TEST_SETTING_FILE: cannot read .*missing: No such file"):
        config.env("BERTH_TEST_SETTING")
    monkeypatch.delenv("BERTH_TEST_SETTING_FILE")
    assert config.env("BERTH_TEST_SETTING", "default") == "default"


# ------------------------------------------------------- on a real swarm


@pytest.fixture(scope="module")
def platform_image(tmp_path_factory) -> Iterator[str]:
    """The platform image built from the repository's Dockerfile (wheelhouse
    from this checkout; the python base is seeded locally when no registry
    is reachable), removed after."""
    subprocess.run(["bash", str(ROOT / "scripts" / "seed-base-images.sh"), "python", "postgres"], check=True,
                   capture_output=True, timeout=900)
    context = tmp_path_factory.mktemp("platform")
    wheels = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--wheel-dir",
         str(context / "build" / "wheels"), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert wheels.returncode == 0, wheels.stderr[-3000:]
    shutil.copy(ROOT / "Dockerfile", context / "Dockerfile")
    main = engine()
    tag = f"berth-stacktest:{RUN_ID}"
    main.images.build(path=str(context), tag=tag, labels={"berth.test": RUN_ID}, rm=True)
    try:
        yield tag
    finally:
        try:
            main.images.remove(tag, force=True)
        except docker.errors.NotFound:
            pass


@pytest.fixture(scope="module")
def worker_tag() -> Iterator[str]:
    main = engine()
    tag, _ = build_worker_image(main, version="stack")
    try:
        yield tag
    finally:
        try:
            main.images.remove(tag, force=True)
        except docker.errors.NotFound:
            pass


def _grpc_serving(addr: str) -> bool:
    return subprocess.run([sys.executable, "-m", "berth.healthcheck", "grpc", addr], capture_output=True,
                          timeout=30).returncode == 0


def _tasks_of(client: docker.DockerClient, name: str) -> list[dict[str, Any]]:
    return client.api.tasks(filters={"service": name, "desired-state": "running"})


def readme_stack_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- stack:start -->", 1)[1].split("<!-- stack:end -->", 1)[0]
    body = block.split("```bash", 1)[1].split("```", 1)[0]
    return [line for line in body.strip().splitlines() if line.strip()]


def _secret_in(client: docker.DockerClient, service: str, name: str) -> str:
    """The content of /run/secrets/NAME in the running task of ``service``
    (a container on the manager's node, as every stack service reads)."""
    containers = client.containers.list(filters={"label": f"com.docker.swarm.service.name={service}"})
    assert containers, f"no container of {service} on the manager"
    result = containers[0].exec_run(["cat", f"/run/secrets/{name}"])
    assert result.exit_code == 0, result.output
    return result.output.decode().rstrip("\n")


def _history(client: docker.DockerClient, stack_name: str) -> list[tuple[str, str, str, str]]:
    return [(t["ServiceID"][:6], t["NodeID"][:6], t["Status"]["State"], t["Status"].get("Err", ""))
            for t in client.api.tasks(filters={"label": f"com.docker.stack.namespace={stack_name}"})]


@pytest.mark.docker
@pytest.mark.timeout(900)  # builds the platform image, pushes ~1.1 GB to the registry, three nodes pull
def test_stack_deploys_on_a_three_node_swarm(swarm_cluster: SwarmCluster, platform_image: str, worker_tag: str,
                                             tmp_path):
    cluster = swarm_cluster
    manager = cluster.client(0)
    image = cluster.import_image(platform_image)
    worker_ref = cluster.import_image(worker_tag)
    postgres_image = cluster.import_image("postgres:15")

    ports = {name: free_port() for name in ("ROUTER", "REGISTRY", "SECRETS", "SCHEDULER")}
    stack_name = "berth"  # as the README has it: the harness's swarm is this test module's alone
    env = {
        **os.environ, "DOCKER_HOST": cluster.manager_host, "BERTH_POSTGRES_IMAGE": postgres_image,
        "BERTH_INSTANCE": "stack" + RUN_ID[:6], **{f"BERTH_{name}_PORT": str(port) for name, port in ports.items()},
    }
    # The README's block, as written, with the harness's node, registry and image put in.
    block = readme_stack_commands()
    rewritten = [
        line.replace("NODE", cluster.nodes[0].name).replace("REGISTRY/berth@sha256:...", image)
        .replace("=REGISTRY", "=" + cluster.registry)
        for line in block
    ]
    assert sum(a != b for a, b in zip(block, rewritten, strict=True)) == 2, rewritten
    script = "set -euo pipefail\n" + "\n".join(rewritten) + "\n"
    deploy = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    try:
        n1 = cluster.nodes[0].address
        node1 = manager.nodes.get(manager.info()["Swarm"]["NodeID"])
        assert node1.attrs["Spec"]["Labels"] == {"berth.postgres": "true"}
        eventually(lambda: _grpc_serving(f"{n1}:{ports['REGISTRY']}"), timeout=300, interval=1,
                   what="the registry serving (it reached PostgreSQL with the URL from its secret)")
        eventually(lambda: _grpc_serving(f"{n1}:{ports['SECRETS']}"), timeout=120, interval=1, what="secrets serving")
        eventually(lambda: _grpc_serving(f"{n1}:{ports['SCHEDULER']}"), timeout=120, interval=1, what="scheduler serving")
        for node in cluster.nodes:
            eventually(lambda: requests.get(f"http://{node.address}:{ports['ROUTER']}/healthz", timeout=5).status_code == 200,
                       timeout=240, interval=1, what=f"the router on {node.name}")
        # What each service reads from /run/secrets (an operator on the node could read it the same way).
        values = {name: _secret_in(manager, f"{stack_name}_{service}", name) for service, name in (
            ("registry", "berth_admin_key"), ("registry", "berth_service_token"), ("registry", "berth_database_url"),
            ("secrets", "berth_master_key"), ("postgres", "berth_pg_password"))}
        admin_key = values["berth_admin_key"]
        assert admin_key.startswith("berth_admin_") and len(base64.b64decode(values["berth_master_key"])) == 32
        assert values["berth_database_url"] == f"postgresql://berth:{values['berth_pg_password']}@postgres:5432/berth"

        # Placement: the router once per node, the control plane on the manager.
        all_nodes = sorted(n.id for n in manager.nodes.list())

        def router_per_node() -> bool:
            running = [t["NodeID"] for t in _tasks_of(manager, f"{stack_name}_router") if t["Status"]["State"] == "running"]
            return sorted(running) == all_nodes

        try:
            eventually(router_per_node, timeout=60, what="one running router per node")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the stack's tasks: {_history(manager, stack_name)}") from None
        for name in ("registry", "secrets", "scheduler", "postgres"):
            running = [t for t in _tasks_of(manager, f"{stack_name}_{name}") if t["Status"]["State"] == "running"]
            assert [t["NodeID"] for t in running] == [node1.id], name

        # No credential appears in any service's spec; each service got its files.
        for service in manager.services.list(filters={"label": f"com.docker.stack.namespace={stack_name}"}):
            spec_text = json.dumps(service.attrs["Spec"])
            assert not any(v in spec_text for v in values.values()), service.name

        # The scheduler drives the swarm through the manager's socket.
        scheduler_task = _tasks_of(manager, f"{stack_name}_scheduler")[0]
        container = manager.containers.get(scheduler_task["Status"]["ContainerStatus"]["ContainerID"])
        seen = container.exec_run(["python", "-c", "import docker; i = docker.from_env().info(); "
                                   "print(i['Swarm']['NodeID'], i['Swarm']['ControlAvailable'])"])
        assert seen.exit_code == 0, seen.output
        assert seen.output.decode().split() == [node1.id, "True"]

        # Through the CLI, as an operator: the admin key from the secret creates
        # a project; a secret is stored (master key from its Docker secret) and listed.
        cli_env = {
            **os.environ, "BERTH_ADMIN_KEY": admin_key, "BERTH_DATA_DIR": str(tmp_path / "cli"), "BERTH_PROJECT": "stk",
            "BERTH_IMAGE_REGISTRY": cluster.registry,
            **{f"BERTH_{name}_ADDR": f"{n1}:{ports[name]}" for name in ("REGISTRY", "SECRETS", "SCHEDULER")},
        }

        def berth(*args: str, key: str = "", stdin: str | None = None) -> dict[str, Any]:
            result = subprocess.run([sys.executable, "-m", "berth.cli", *args, "--output", "json"], input=stdin,
                                    env={**cli_env, "BERTH_API_KEY": key}, capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, result.stderr
            return json.loads(result.stdout)["data"]

        key = berth("projects", "create", "stk")["api_key"]
        berth("secrets", "set", "--name", "STACK_CANARY", "--type", "generic", "--stdin", key=key, stdin="canary-value")
        listed = berth("secrets", "list", key=key)
        assert "STACK_CANARY" in json.dumps(listed) and "canary-value" not in json.dumps(listed)

        # A deployment by digest: the scheduler runs it as a Swarm service
        # spread over the nodes, and the router on every node serves it.
        deployed = berth("deploy", "--image", worker_ref, "--min-replicas", "3", "--max-replicas", "3",
                         "--health-path", "/cgi-bin/index.cgi", "--var", "SHOW_SECRET=STACK_CANARY", key=key)
        assert deployed["status"] == "running", deployed
        dep_id = deployed["deployment"]["id"]
        status = berth("deployment", "status", dep_id, key=key)
        assert {r["node"] for r in status["bindings"][0]["replicas"]} == {n.name for n in cluster.nodes}, status
        headers = {"X-Berth-Project": "stk", "X-Berth-Environment": "preview"}
        for node in cluster.nodes:
            answer = eventually(
                lambda: (lambda r: r if r.status_code == 200 else None)(requests.get(
                    f"http://{node.address}:{ports['ROUTER']}/cgi-bin/index.cgi", headers=headers, timeout=10)),
                timeout=60, what=f"the router on {node.name} serves the deployment")
            assert answer.headers["X-Berth-Deployment"] == dep_id
            assert f"deployment={dep_id}" in answer.text and "secret=canary-value" in answer.text
    finally:
        subprocess.run(["docker", "stack", "rm", stack_name], env=env, capture_output=True, timeout=120)
