"""docker-compose.ha.yml: two of each service on one PostgreSQL database.

docker-compose itself resolves and validates the file (``config``) with an
env file of test settings; the test then checks what the platform needs of
it: two instances of each service on ports by the +100 rule, every service
given every instance of the others as an address list, the schedulers on the
shared lease with distinct instance names, the secrets services sharing the
key file, health checks gating the start order."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.platform import ROOT

SERVICES = ("registry", "secrets", "scheduler", "router")
DEFAULT_PORTS = {"registry": 50051, "secrets": 50052, "scheduler": 50053, "router": 8080}


def config(tmp_path: Path, settings: dict[str, str]) -> dict[str, Any]:
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose is not installed (scripts/compose.sh installs it)")
    env_file = tmp_path / "ha.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    result = subprocess.run(
        ["docker-compose", "--project-name", "berthhatest", "--env-file", str(env_file),
         "-f", str(ROOT / "docker-compose.ha.yml"), "config"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    parsed: dict[str, Any] = yaml.safe_load(result.stdout)
    return parsed


def port_flag(service: dict[str, Any]) -> int:
    command = service["command"]
    return int(command[command.index("--port") + 1])


@pytest.fixture
def settings() -> dict[str, str]:
    return {"BERTH_SERVICE_TOKEN": "berth_svc_test", "BERTH_ADMIN_KEY": "berth_admin_test", "BERTH_PG_PASSWORD": "pw"}


def test_two_of_each_service_on_ports_by_the_instance_rule(tmp_path: Path, settings: dict[str, str]) -> None:
    services = config(tmp_path, settings)["services"]
    assert set(services) == {"postgres", *(f"{s}-{i}" for s in SERVICES for i in (1, 2))}
    for name in SERVICES:
        first, second = services[f"{name}-1"], services[f"{name}-2"]
        assert first["command"][0] == second["command"][0] == f"services.{name}"
        if name == "router":
            assert port_flag(first) == DEFAULT_PORTS[name] and port_flag(second) == DEFAULT_PORTS[name] + 100
        else:
            assert (port_flag(first), port_flag(second)) == (DEFAULT_PORTS[name], DEFAULT_PORTS[name] + 100)
        for service in (first, second):
            assert service["network_mode"] == "host" and service["restart"] == "unless-stopped"
            check = " ".join(service["healthcheck"]["test"])
            assert str(port_flag(service)) in check, (name, check)


def test_every_service_reaches_every_instance_of_the_others(tmp_path: Path, settings: dict[str, str]) -> None:
    services = config(tmp_path, settings)["services"]
    expected = {f"BERTH_{name.upper()}_ADDR": f"127.0.0.1:{DEFAULT_PORTS[name]},127.0.0.1:{DEFAULT_PORTS[name] + 100}"
                for name in ("registry", "secrets", "scheduler")}
    database = "postgresql://berth:pw@127.0.0.1:55432/berth"
    for name, service in services.items():
        if name == "postgres":
            continue
        env = service["environment"]
        for key, value in expected.items():
            assert env[key] == value, (name, key)
        assert env["BERTH_DATABASE_URL"] == env["BERTH_SECRETS_DATABASE_URL"] == database
        assert env["BERTH_SCHEDULER_DATABASE_URL"] == database
        assert env["BERTH_SERVICE_TOKEN"] == "berth_svc_test"


def test_schedulers_share_the_lease_and_secrets_the_key_file(tmp_path: Path, settings: dict[str, str]) -> None:
    services = config(tmp_path, settings)["services"]
    names = []
    for i in (1, 2):
        command = services[f"scheduler-{i}"]["command"]
        assert command[command.index("--instance") + 1] == "compose"  # one platform instance: one lease
        names.append(command[command.index("--instance-name") + 1])
        assert "/var/run/docker.sock:/var/run/docker.sock:rw" in services[f"scheduler-{i}"]["volumes"]
        secrets = services[f"secrets-{i}"]
        assert secrets["command"][secrets["command"].index("--master-key-file") + 1] == "/data/master.key"
        assert "berthdata:/data:rw" in secrets["volumes"]
    assert len(set(names)) == 2


def test_start_order_waits_for_health(tmp_path: Path, settings: dict[str, str]) -> None:
    services = config(tmp_path, settings)["services"]
    needs = {"registry": {"postgres"}, "secrets": {"registry-1", "registry-2"},
             "scheduler": {"registry-1", "registry-2", "secrets-1", "secrets-2"},
             "router": {"scheduler-1", "scheduler-2"}}
    for name, deps in needs.items():
        for i in (1, 2):
            depends = services[f"{name}-{i}"]["depends_on"]
            assert set(depends) == deps
            assert {d["condition"] for d in depends.values()} == {"service_healthy"}


def test_ports_follow_the_env_file(tmp_path: Path, settings: dict[str, str]) -> None:
    services = config(tmp_path, {**settings, "BERTH_REGISTRY_PORT": "41001", "BERTH_REGISTRY_PORT_2": "41101",
                                 "BERTH_ROUTER_PORT_2": "41180"})["services"]
    assert (port_flag(services["registry-1"]), port_flag(services["registry-2"])) == (41001, 41101)
    assert services["router-1"]["environment"]["BERTH_REGISTRY_ADDR"] == "127.0.0.1:41001,127.0.0.1:41101"
    assert port_flag(services["router-2"]) == 41180


def test_missing_credentials_are_refused(tmp_path: Path) -> None:
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    result = subprocess.run(
        ["docker-compose", "--env-file", str(env_file), "-f", str(ROOT / "docker-compose.ha.yml"), "config"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode != 0
    assert "BERTH_SERVICE_TOKEN" in result.stderr or "BERTH_ADMIN_KEY" in result.stderr
