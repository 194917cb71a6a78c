"""The CLI as people type it (issue 18), against a real `berth up`: deploy
from berth.toml without a PATH, the same environment flags everywhere,
production confirmed on a terminal and refused without one, the project, key
and environment checked before anything is built, status of what an
environment serves, failed waits that say why, and one rule for moving a
pointer to a terminated deployment."""
from __future__ import annotations

import json
import os
import pathlib
import pty
import re
import select
import subprocess
import sys
import time
import uuid

import click
import pytest

from berth.cli import main
from tests.support.docker_engine import TEST_LABEL, build_worker_image, engine, remove_labelled, write_worker_context
from tests.support.platform import ROOT, RunningPlatform

pytestmark = [pytest.mark.docker, pytest.mark.e2e]

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    p = RunningPlatform(tmp_path_factory.mktemp("cliflows") / "data")
    p.data_dir.mkdir()
    p.start()
    yield p
    p.stop()
    p.remove_containers()
    remove_labelled(engine(), TEST_LABEL)


@pytest.fixture(scope="module")
def image():
    tag, _ = build_worker_image(engine(), version="flows")
    return tag


def new_project(platform: RunningPlatform) -> tuple[str, str]:
    name = f"f{uuid.uuid4().hex[:8]}"
    return name, platform.cli_json("projects", "create", name)["api_key"]


def cli(platform: RunningPlatform, key: str, *args: str, **kw):
    return platform.cli(*args, api_key=key, check=False, **kw)


def cli_json(platform: RunningPlatform, key: str, *args: str, **kw):
    return platform.cli_json(*args, api_key=key, **kw)


def cli_tty(platform: RunningPlatform, key: str, *args: str, answer: str, timeout: float = 120) -> tuple[int, str]:
    """Runs ``berth ARGS`` with its stdin, stdout and stderr on a terminal
    (a pty), typing ``answer`` at a [y/N] prompt. Returns (exit code, what
    the terminal showed, without colours)."""
    master, slave = pty.openpty()
    env = {**platform.env, "BERTH_API_KEY": key, "COLUMNS": "250", "TERM": "dumb"}
    process = subprocess.Popen([sys.executable, "-m", "berth.cli", *args], stdin=slave, stdout=slave, stderr=slave,
                               env=env, cwd=ROOT, close_fds=True)
    os.close(slave)
    shown, answered = b"", False
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the command closed the terminal
                    chunk = b""
                if not chunk:
                    break
                shown += chunk
                if not answered and b"[y/N]" in shown:
                    os.write(master, answer.encode() + b"\n")
                    answered = True
            elif process.poll() is not None:
                break
        else:
            process.kill()
            raise AssertionError(f"berth {' '.join(args)} did not finish: {shown.decode(errors='replace')}")
        return process.wait(30), ANSI.sub("", shown.decode(errors="replace"))
    finally:
        os.close(master)


def build_dir(root: pathlib.Path, project: str, *, marker: str = "", entrypoint: str = "") -> pathlib.Path:
    """A worker directory with berth.toml; ``marker`` labels its image (to
    tell whether it was built), ``entrypoint`` replaces the worker's."""
    write_worker_context(str(root), version="toml")
    dockerfile = root / "Dockerfile"
    text = dockerfile.read_text()
    if marker:
        text += f"LABEL berth.flowcheck={marker}\n"
    if entrypoint:
        text = re.sub(r"^ENTRYPOINT .*$", f"ENTRYPOINT {entrypoint}", text, flags=re.M)
    dockerfile.write_text(text)
    (root / "berth.toml").write_text(
        f'project = "{project}"\n\n[worker]\nport = 8080\nhealth_path = "/"\n\n[variables]\nWHO = "toml"\n'
    )
    return root


def built(marker: str) -> list:
    return engine().images.list(filters={"label": f"berth.flowcheck={marker}"})


def pointer(platform: RunningPlatform, key: str, project: str, environment: str) -> str:
    envs = cli_json(platform, key, "env", "list", "--project", project)["environments"]
    return next(e["deployment_id"] for e in envs if e["name"] == environment)


# ---------------------------------------------------------------- deploy from berth.toml


def test_deploy_without_path_builds_the_directory_berth_toml_describes(platform, tmp_path):
    project, key = new_project(platform)
    app = build_dir(tmp_path / "app", project)
    deployed = cli_json(platform, key, "deploy", "--no-wait", cwd=app)
    dep = deployed["deployment"]
    assert dep["image"].startswith(f"berth/{project}:") and dep["image_id"].startswith("sha256:")
    assert dep["config"]["variables"] == {"WHO": "toml"} and deployed["environment"]["name"] == "preview"

    (app / "src").mkdir()
    human = cli(platform, key, "deploy", "--no-wait", cwd=app / "src")  # from a subdirectory too
    assert human.returncode == 0, human.stderr
    assert f"building {app}" in human.stderr and "berth.toml" in human.stderr and "Deployed dep_" in human.stdout

    nothing = cli(platform, key, "deploy", "--project", project, cwd=tmp_path)
    assert nothing.returncode == 2 and "PATH" in nothing.stderr and "berth.toml" in nothing.stderr


def test_deploy_checks_project_key_and_environment_before_building(platform, tmp_path):
    project, key = new_project(platform)
    marker = uuid.uuid4().hex
    app = build_dir(tmp_path / "app", "someone-else", marker=marker)

    wrong_project = cli(platform, key, "deploy", str(app))
    assert wrong_project.returncode == 4, wrong_project.stderr
    assert f"belongs to project '{project}', not 'someone-else'" in wrong_project.stderr
    assert str(app / "berth.toml") in wrong_project.stderr  # where the project came from

    unknown_env = cli(platform, key, "deploy", str(app), "--project", project, "--environment", "prodution")
    assert unknown_env.returncode == 3 and "'prodution' not found" in unknown_env.stderr
    assert "production" in unknown_env.stderr  # the known ones are named

    bad_key = cli(platform, "berth_pk_not-a-key", "deploy", str(app), "--project", project)
    assert bad_key.returncode == 4, bad_key.stderr

    unconfirmed = cli(platform, key, "deploy", str(app), "--project", project, "--env", "production")
    assert unconfirmed.returncode == 5 and "--yes" in unconfirmed.stderr and "protected" in unconfirmed.stderr

    for result in (wrong_project, unknown_env, bad_key, unconfirmed):
        assert "Traceback" not in result.stderr
    assert built(marker) == []  # nothing was built for any of them
    assert cli_json(platform, key, "deployments", "--project", project)["deployments"] == []

    ok = cli(platform, key, "deploy", str(app), "--project", project, "--no-wait")
    assert ok.returncode == 0, ok.stderr
    assert built(marker)


# ---------------------------------------------------------------- confirmation


def test_production_moves_ask_on_a_terminal(platform, image):
    project, key = new_project(platform)
    code, shown = cli_tty(platform, key, "deploy", "--image", image, "--env", "production", "--project", project,
                          "--no-wait", answer="n")
    assert code == 5 and "[y/N]" in shown and "not confirmed" in shown, shown
    assert pointer(platform, key, project, "production") == ""
    assert cli_json(platform, key, "deployments", "--project", project)["deployments"] == []

    code, shown = cli_tty(platform, key, "deploy", "--image", image, "-e", "production", "--project", project,
                          "--no-wait", answer="y")
    assert code == 0 and "Deployed dep_" in shown, shown
    v1 = re.search(r"Deployed (dep_\w+)", shown).group(1)
    assert pointer(platform, key, project, "production") == v1

    v2 = cli_json(platform, key, "deploy", "--image", image, "--project", project, "--no-wait")["deployment"]["id"]
    code, shown = cli_tty(platform, key, "promote", v2, "--to", "production", "--project", project, "--no-wait",
                          answer="y")
    assert code == 0 and "[y/N]" in shown and f"Promoted production: {v1} -> {v2}" in shown, shown

    # without a terminal: refused, the same way for both, unless --yes
    for args in (("deploy", "--image", image), ("promote", v1), ("rollback",)):
        refused = cli(platform, key, *args, "--environment", "production", "--project", project, "--no-wait")
        assert refused.returncode == 5, refused.stderr
        assert "protected" in refused.stderr and "--yes" in refused.stderr and "Traceback" not in refused.stderr
    assert pointer(platform, key, project, "production") == v2
    yes = cli(platform, key, "rollback", "-e", "production", "--yes", "--project", project, "--no-wait")
    assert yes.returncode == 0 and f"{v2} -> {v1}" in yes.stdout


# ---------------------------------------------------------------- flags


def test_every_command_naming_an_environment_takes_e_env_and_environment():
    def walk(command: click.Command, path: str):
        yield path, command
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                yield from walk(sub, f"{path} {name}")

    naming = {}
    for path, command in walk(main, "berth"):
        for param in command.params:
            if isinstance(param, click.Option) and (param.name == "environment" or path == "berth promote" and param.name == "target"):
                naming[path] = set(param.opts)
    assert {"berth deploy", "berth promote", "berth rollback", "berth history", "berth deployments",
            "berth deployment status", "berth secrets list"} <= set(naming)
    for path, opts in naming.items():
        assert {"-e", "--env", "--environment"} <= opts, (path, opts)
    assert "--to" in naming["berth promote"]


def test_environment_flags_as_typed(platform, image):
    project, key = new_project(platform)

    def run(*args: str):
        return cli_json(platform, key, *args, "--project", project)

    v1 = run("deploy", "--image", image, "--environment", "staging", "--no-wait")["deployment"]["id"]
    v2 = run("deploy", "--image", image, "-e", "staging", "--no-wait")["deployment"]["id"]
    assert run("promote", v1, "--env", "preview", "--no-wait")["environment"]["name"] == "preview"
    assert run("promote", v2, "--environment", "preview", "--no-wait")["entry"]["deployment_id"] == v2
    back = run("rollback", "--env", "staging", "--no-wait")
    assert back["entry"]["kind"] == "rollback" and back["entry"]["deployment_id"] == v1
    assert [e["kind"] for e in run("history", "--env", "staging")["entries"]] == ["deploy", "deploy", "rollback"]
    assert {d["id"] for d in run("deployments", "--env", "staging")["deployments"]} == {v1, v2}
    assert [b["environment"] for b in run("deployment", "status", v1, "--env", "staging")["bindings"]] == ["staging"]
    assert run("secrets", "list", "--env", "staging")["secrets"] == []


# ---------------------------------------------------------------- status


def test_status_of_an_environment_is_the_deployment_it_points_at(platform, image):
    project, key = new_project(platform)

    def run(*args: str):
        return cli_json(platform, key, *args, "--project", project)

    v1 = run("deploy", "--image", image, "--no-wait")["deployment"]["id"]
    run("promote", v1, "--to", "staging", "--no-wait")
    v2 = run("deploy", "--image", image, "--no-wait")["deployment"]["id"]

    staging = run("deployment", "status", "-e", "staging")
    assert staging["id"] == v1 and [b["environment"] for b in staging["bindings"]] == ["staging"]
    assert run("deployment", "status")["id"] == v2  # no environment: the latest
    human = cli(platform, key, "deployment", "status", "--environment", "staging", "--project", project)
    assert f"Deployment {v1}" in human.stdout

    empty = cli(platform, key, "deployment", "status", "-e", "production", "--project", project)
    assert empty.returncode == 3 and "'production' points at no deployment" in empty.stderr


# ---------------------------------------------------------------- failed waits


def test_a_failed_wait_says_why(platform, image, tmp_path):
    project, key = new_project(platform)

    def missing() -> str:  # refused at once: an image_pull_error (a fresh reference: a fresh pull)
        return f"127.0.0.1:1/berth-missing-{uuid.uuid4().hex[:8]}:nope"

    failed = cli(platform, key, "deploy", "--image", missing(), "--project", project, "--timeout", "90")
    assert failed.returncode == 5, failed.stdout + failed.stderr
    assert re.search(r"status failed: 0/\d+ ready \(min \d+, max \d+\)", failed.stdout), failed.stdout
    assert "reason: image_pull_error" in failed.stdout, failed.stdout
    assert "127.0.0.1:1" in failed.stdout  # the engine's own message
    bad = re.search(r"Deployed (dep_\w+)", failed.stdout).group(1)

    as_json = cli(platform, key, "deploy", "--image", missing(), "--project", project, "--output", "json")
    assert as_json.returncode == 5
    data = json.loads(as_json.stdout)["data"]
    assert data["status"] == "failed" and data["reason"]["kind"] == "image_pull_error" and data["reason"]["message"]

    quiet = cli(platform, key, "deploy", "--image", missing(), "--project", project, "--quiet")
    assert quiet.returncode == 5 and quiet.stdout.strip().startswith("dep_") and "image_pull_error" in quiet.stderr

    # promote and rollback waiting on a binding that fails say why too
    reason = re.compile(r"reason( \(in preview\))?: image_pull_error")
    promoted = cli(platform, key, "promote", bad, "--to", "staging", "--project", project)
    assert promoted.returncode == 5 and reason.search(promoted.stdout), promoted.stdout
    good = cli_json(platform, key, "deploy", "--image", image, "--project", project, "--no-wait")["deployment"]["id"]
    assert cli(platform, key, "promote", good, "--to", "staging", "--project", project).returncode == 0
    rolled = cli(platform, key, "rollback", "-e", "staging", "--project", project)
    assert rolled.returncode == 5 and f"{good} -> {bad}" in rolled.stdout and reason.search(rolled.stdout), rolled.stdout

    crashing = build_dir(tmp_path / "crash", project, entrypoint='["/bin/busybox", "sh", "-c", "echo boom; exit 3"]')
    crashed = cli(platform, key, "deploy", str(crashing), "--timeout", "120")
    assert crashed.returncode == 5, crashed.stdout + crashed.stderr
    assert "status failed" in crashed.stdout and "reason: crash_loop" in crashed.stdout and "exit code 3" in crashed.stdout


def test_more_ready_than_the_minimum_reads_sensibly(platform, image):
    project, key = new_project(platform)

    def run(*args: str):
        return cli(platform, key, *args, "--project", project)

    first = run("deploy", "--image", image, "-e", "staging", "--min-replicas", "3", "--max-replicas", "3")
    assert first.returncode == 0 and "3/3 ready (min 3, max 3)" in first.stdout, first.stdout
    v1 = re.search(r"Deployed (dep_\w+)", first.stdout).group(1)
    assert run("deploy", "--image", image, "-e", "staging", "--no-wait").returncode == 0
    # v1's three replicas are kept warm; back with a minimum of 2, all three answer
    again = run("promote", v1, "--to", "staging", "--min-replicas", "2", "--max-replicas", "3")
    assert again.returncode == 0, again.stderr
    # ready over what the scheduler drives the binding to: the warm three, or
    # three while scaling down to two, never a bare "3/2"
    assert ("3/3 ready (min 2, max 3)" in again.stdout
            or "3 ready, scaling to 2 (min 2, max 3)" in again.stdout), again.stdout
    assert "3/2" not in again.stdout, again.stdout


# ---------------------------------------------------------------- terminated deployments


def test_terminated_deployment_promote_refuses_rollback_starts_it_and_says_so(platform, image):
    # DESIGN.md: rollback returns to what served before and starts it again
    # if it was terminated; promote refuses a terminated deployment. Each
    # says which rule applied.
    project, key = new_project(platform)

    def run(*args: str):
        return cli_json(platform, key, *args, "--project", project)

    v1 = run("deploy", "--image", image, "--no-wait")["deployment"]["id"]
    v2 = run("deploy", "--image", image, "--no-wait")["deployment"]["id"]
    run("promote", v1, "--to", "staging", "--no-wait")
    run("promote", v2, "--to", "staging", "--no-wait")
    run("deployment", "terminate", v1)

    said = f"deployment {v1} is terminated; start it with `berth deployment start {v1}`"
    refused = cli(platform, key, "promote", v1, "--to", "production", "--yes", "--no-wait", "--project", project)
    assert refused.returncode == 5 and said in refused.stderr, refused.stderr
    as_json = cli(platform, key, "promote", v1, "--to", "production", "--yes", "--no-wait", "--project", project,
                  "--output", "json")
    assert json.loads(as_json.stderr)["error"]["code"] == "failed_precondition"
    assert pointer(platform, key, project, "production") == ""

    back = cli(platform, key, "rollback", "-e", "staging", "--to", v1, "--no-wait", "--project", project)
    assert back.returncode == 0, back.stderr
    assert f"deployment {v1} was terminated: rolling back to it starts it again" in back.stderr
    assert pointer(platform, key, project, "staging") == v1
    assert next(d for d in run("deployments")["deployments"] if d["id"] == v1)["state"] == "active"


# ---------------------------------------------------------------- env delete --force


def test_env_delete_force_deletes_an_environment_that_pointed_somewhere(platform, image):
    import requests

    from tests.support.platform import eventually

    project, key = new_project(platform)
    cli_json(platform, key, "env", "create", "qa", "--project", project)
    v1 = cli_json(platform, key, "deploy", "--image", image, "-e", "qa", "--project", project)["deployment"]["id"]
    served = requests.get(platform.router + "/", headers={"X-Berth-Project": project, "X-Berth-Environment": "qa"},
                          timeout=30)
    assert served.status_code == 200 and served.headers["X-Berth-Deployment"] == v1

    plain = cli(platform, key, "env", "delete", "qa", "--project", project)
    assert plain.returncode == 5 and f"points to deployment {v1}" in plain.stderr and "--force" in plain.stderr
    no_tty = cli(platform, key, "env", "delete", "qa", "--force", "--project", project)
    assert no_tty.returncode == 5 and "--yes" in no_tty.stderr and "Traceback" not in no_tty.stderr
    code, shown = cli_tty(platform, key, "env", "delete", "qa", "--force", "--project", project, answer="n")
    assert code == 5 and "[y/N]" in shown and "not confirmed" in shown, shown
    assert pointer(platform, key, project, "qa") == v1

    code, shown = cli_tty(platform, key, "env", "delete", "qa", "--force", "--project", project, answer="y")
    assert code == 0 and "Deleted environment qa" in shown, shown
    names = {e["name"] for e in cli_json(platform, key, "env", "list", "--project", project)["environments"]}
    assert "qa" not in names and "preview" in names
    # The router's table dropped it: 404, not the old deployment.
    eventually(lambda: requests.get(platform.router + "/", timeout=10, headers={
        "X-Berth-Project": project, "X-Berth-Environment": "qa"}).status_code == 404, what="qa unrouted")
    # The deployment's binding went with it, and the scheduler stops its replica.
    status = cli(platform, key, "deployment", "status", v1, "--project", project)
    assert status.returncode != 0 and "not bound to any environment" in status.stderr, status.stderr
    eventually(lambda: not engine().containers.list(all=True, filters={"label": f"berth.deployment={v1}"}),
               what="qa's replica removed")

    # production: --force with --yes (a protected environment is confirmed).
    cli_json(platform, key, "deploy", "--image", image, "-e", "production", "--yes", "--no-wait", "--project", project)
    refused = cli(platform, key, "env", "delete", "production", "--project", project)
    assert refused.returncode == 5 and "protected" in refused.stderr
    gone = cli_json(platform, key, "env", "delete", "production", "--force", "--yes", "--project", project)
    assert gone["environment"]["name"] == "production"
