"""Experiments, gates and ``berth dev`` on a real ``berth up`` (busybox
workers on the local engine), driven through the CLI and the REST API as a
user would: a 50-case dataset passing on one build and failing 20% on
another, the gate refusing the failing build and accepting the good one, a
changed dataset no longer satisfying it, the override recorded in history,
malformed datasets refused with nothing recorded; ``berth dev`` serving a
directory with an environment-scoped secret, picking up an edit, sweeping a
killed session's replica and leaving no container after Ctrl-C."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
import requests

from tests.support.docker_engine import engine, write_worker_context
from tests.support.platform import ROOT, RunningPlatform, eventually, started_platform

pytestmark = [pytest.mark.docker, pytest.mark.e2e]

CASES = 50
MISSING = {i for i in range(CASES) if i % 5 == 0}  # the bad build lacks these: 10 of 50 answer 404


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    with started_platform(tmp_path_factory.mktemp("experiments") / "data") as p:
        yield p


def worker_dir(root: pathlib.Path, *, missing: set[int] = frozenset(), page: str = "", project: str = "") -> pathlib.Path:  # type: ignore[assignment]
    """The test worker (busybox httpd) with static files under /www: c/N.txt
    answering 'ok N' (except ``missing``), info.json, and page.txt."""
    root.mkdir(parents=True, exist_ok=True)
    write_worker_context(str(root), version="exp")
    www = root / "www"
    (www / "c").mkdir(parents=True, exist_ok=True)
    for i in range(CASES - 1):
        if i not in missing:
            (www / "c" / f"{i}.txt").write_text(f"ok {i}\n")
    (www / "info.json").write_text(json.dumps({"ok": True, "build": "exp", "n": 3}))
    if page:
        (www / "page.txt").write_text(page)
    dockerfile = root / "Dockerfile"
    dockerfile.write_text(dockerfile.read_text().replace("ENTRYPOINT ", "COPY www/ /www/\nENTRYPOINT ", 1))
    if project:  # berth dev's worker also says hello on its output
        entrypoint = root / "entrypoint.sh"
        entrypoint.write_text(entrypoint.read_text().replace("mkdir -p /www/cgi-bin", "echo dev-worker-up\nmkdir -p /www/cgi-bin", 1))
        (root / "berth.toml").write_text(
            f'project = "{project}"\n\n[worker]\nport = 8080\nhealth_path = "/"\n\n'
            '[variables]\nSHOW_SECRET = "DEV_TOKEN"\n'
        )
    return root


def dataset(path: pathlib.Path, *, extra: bool = False) -> pathlib.Path:
    lines = [{"name": f"case-{i}", "request": {"method": "GET", "path": f"/c/{i}.txt"},
              "expect": {"status": 200, "contains": f"ok {i}", "regex": r"^ok \d+"}} for i in range(CASES - 1)]
    lines.append({"name": "info", "request": {"method": "GET", "path": "/info.json", "headers": {"Accept": "*/*"}},
                  "expect": {"status": 200, "json": {"ok": True, "n": 3}, "max_ms": 60000}})
    if extra:
        lines.append({"name": "missing-page", "request": {"path": "/nope.txt"}, "expect": {"status": 404}})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def cli(platform: RunningPlatform, key: str, *args: str, **kw) -> subprocess.CompletedProcess[str]:
    return platform.cli(*args, api_key=key, check=False, **kw)


def cli_json(platform: RunningPlatform, key: str, *args: str) -> dict:
    result = cli(platform, key, *args, "-o", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["data"]


def rest(platform: RunningPlatform, key: str, method: str, path: str, body: dict | None = None) -> requests.Response:
    return requests.request(method, f"{platform.router}/api/v1{path}", headers={"X-API-Key": key},
                            json=body, timeout=60)


def test_a_dataset_gates_promotion(platform: RunningPlatform, tmp_path: pathlib.Path) -> None:
    project = f"x{uuid.uuid4().hex[:8]}"
    key = platform.cli_json("projects", "create", project)["api_key"]
    good_dir = worker_dir(tmp_path / "good")
    bad_dir = worker_dir(tmp_path / "bad", missing=MISSING)
    good = cli(platform, key, "deploy", str(good_dir), "--quiet", "-p", project).stdout.strip()
    bad = cli(platform, key, "deploy", str(bad_dir), "--quiet", "-p", project).stdout.strip()
    assert good.startswith("dep_") and bad.startswith("dep_"), (good, bad)
    cases = dataset(tmp_path / "cases.jsonl")

    # the bad build: 40 of 50, recorded, exit 1 below the threshold
    ran = cli(platform, key, "experiments", "run", "--deployment", bad, "--dataset", str(cases), "--name", "smoke",
              "--threshold", "0.95", "--concurrency", "8", "-p", project, "-o", "json")
    assert ran.returncode == 1, ran.stderr
    bad_run = json.loads(ran.stdout)["data"]["run"]
    assert (bad_run["total"], bad_run["passed"], bad_run["pass_rate"]) == (50, 40, 0.8)
    failed = {c["name"]: c for c in bad_run["cases"] if not c["passed"]}
    assert set(failed) == {f"case-{i}" for i in MISSING}
    assert all(c["status"] == 404 and c["reason"] == "status 404, expected 200" for c in failed.values())

    good_run = cli_json(platform, key, "experiments", "run", "--deployment", good, "--dataset", str(cases),
                        "--name", "smoke", "--threshold", "0.95", "-p", project)["run"]
    assert (good_run["passed"], good_run["pass_rate"]) == (50, 1.0)
    assert good_run["dataset_digest"] == bad_run["dataset_digest"]
    print(f"EXPERIMENT_RUN 50 cases: good p50 {good_run['latency_p50_ms']:.1f} ms p99 "
          f"{good_run['latency_p99_ms']:.1f} ms; bad p50 {bad_run['latency_p50_ms']:.1f} ms")

    gate = cli_json(platform, key, "env", "gate", "production", "--experiment", "smoke", "--threshold", "0.95",
                    "-p", project)["gate"]
    assert (gate["environment"], gate["threshold"], gate["dataset_digest"]) == (
        "production", 0.95, good_run["dataset_digest"])

    # the CLI: a clear refusal naming the gate and the failing run; nothing moved
    refused = cli(platform, key, "promote", bad, "--to", "production", "--yes", "-p", project)
    assert refused.returncode == 5
    assert "gated on experiment 'smoke'" in refused.stderr and bad_run["id"] in refused.stderr
    assert "80.00%" in refused.stderr and "--skip-gate" in refused.stderr
    # REST: 412 naming the gate
    answer = rest(platform, key, "POST", "/deployments/promote",
                  {"source_deployment_id": bad, "target_environment_id": "production", "confirm": True})
    assert answer.status_code == 412, answer.text
    assert answer.json()["error"]["code"] == "failed_precondition"
    assert "smoke" in answer.json()["error"]["message"] and bad_run["id"] in answer.json()["error"]["message"]
    assert cli_json(platform, key, "history", "-e", "production", "-p", project)["entries"] == []

    moved = cli_json(platform, key, "promote", good, "--to", "production", "--yes", "-p", project)
    assert moved["environment"]["deployment_id"] == good

    # a changed dataset: a new digest the good build has no run on
    changed = dataset(tmp_path / "cases2.jsonl", extra=True)
    gate2 = cli_json(platform, key, "env", "gate", "staging", "--experiment", "smoke", "--threshold", "0.95",
                     "--dataset", str(changed), "-p", project)["gate"]
    assert gate2["dataset_digest"] != good_run["dataset_digest"]
    stale = cli(platform, key, "promote", good, "--to", "staging", "-p", project)
    assert stale.returncode == 5 and "has no run of it on that dataset" in stale.stderr
    cli_json(platform, key, "experiments", "run", "--deployment", good, "--dataset", str(changed), "--name", "smoke",
             "-p", project)
    assert cli_json(platform, key, "promote", good, "--to", "staging", "-p", project)["entry"]["deployment_id"] == good

    # the override, recorded in the history with its reason
    no_reason = cli(platform, key, "promote", bad, "--to", "production", "--yes", "--skip-gate", "-p", project)
    assert no_reason.returncode == 2 and "--skip-gate needs --reason" in no_reason.stderr
    cli_json(platform, key, "promote", bad, "--to", "production", "--yes", "--skip-gate", "--reason",
             "hotfix for incident 7", "-p", project)
    history = cli_json(platform, key, "history", "-e", "production", "-p", project)["entries"]
    assert [(h["deployment_id"], h["reason"]) for h in history] == [
        (good, ""), (bad, "gate smoke >= 0.95 skipped: hotfix for incident 7")]
    # rollback is not gated
    assert cli_json(platform, key, "rollback", "-e", "production", "--yes", "-p", project)["entry"][
        "deployment_id"] == good

    # listing and showing, CLI and REST
    runs = cli_json(platform, key, "experiments", "list", "--deployment", good, "-p", project)["runs"]
    assert len(runs) == 2 and all("cases" not in r for r in runs)
    shown = cli(platform, key, "experiments", "show", bad_run["id"], "-p", project)
    assert shown.returncode == 0 and "40/50 passed (80.0%)" in shown.stdout and "case-5" in shown.stdout
    listed = rest(platform, key, "GET", f"/experiments/runs?deployment_id={bad}").json()
    assert [r["id"] for r in listed["runs"]] == [bad_run["id"]] and listed["next_page_token"] == ""
    one = rest(platform, key, "GET", f"/experiments/runs/{bad_run['id']}").json()
    assert one["passed"] == 40 and len(one["cases"]) == 50
    gates = rest(platform, key, "GET", "/gates").json()["gates"]
    assert sorted(g["environment"] for g in gates) == ["production", "staging"]
    cleared = rest(platform, key, "DELETE", "/environments/staging/gate")
    assert cleared.status_code == 200 and cleared.json()["cleared"] is True
    assert rest(platform, key, "PUT", "/environments/staging/gate",
                {"experiment": "smoke", "threshold": 2}).status_code == 400
    put = rest(platform, key, "PUT", "/environments/staging/gate", {"experiment": "smoke", "threshold": 0.5})
    assert put.status_code == 200 and put.json()["gate"]["dataset_digest"] == gate2["dataset_digest"]


@pytest.mark.parametrize(("line", "where"), [
    ('{"name": "x", "request": {"path": "/"}, "expect": {"status": "200"}}', ":3: expect.status:"),
    ('{"name": "x", "request": {"path": "/", "verb": "GET"}, "expect": {"status": 200}}', ":3: request.verb:"),
    ('{"name": "x", "request": {"path": "/"}', ":3: not valid JSON"),
])
def test_malformed_datasets_are_refused_with_nothing_sent_or_recorded(
    platform: RunningPlatform, tmp_path: pathlib.Path, line: str, where: str
) -> None:
    project = f"m{uuid.uuid4().hex[:8]}"
    key = platform.cli_json("projects", "create", project)["api_key"]
    dep = cli(platform, key, "deploy", str(worker_dir(tmp_path / "w")), "--quiet", "-p", project).stdout.strip()
    path = tmp_path / "broken.jsonl"
    good = {"request": {"path": "/info.json"}, "expect": {"status": 200}}
    path.write_text(json.dumps({"name": "a", **good}) + "\n" + json.dumps({"name": "b", **good}) + "\n" + line + "\n")
    result = cli(platform, key, "experiments", "run", "--deployment", dep, "--dataset", str(path), "-p", project)
    assert result.returncode == 2, result.stderr
    assert f"{path}{where}" in " ".join(result.stderr.split())
    assert cli_json(platform, key, "experiments", "list", "-p", project)["runs"] == []


class DevSession:
    """``berth dev`` as a subprocess in its own process group, its output
    collected by a reader thread."""

    def __init__(self, platform: RunningPlatform, key: str, directory: pathlib.Path) -> None:
        env = {**platform.env, "BERTH_API_KEY": key, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "berth.cli", "dev", str(directory), "--poll", "0.2"], env=env, cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        self.output = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output += line

    def serving(self, count: int = 1) -> list[str]:
        return eventually(lambda: (ids := [w.split()[1] for w in self.output.splitlines() if w.startswith("Serving")])
                          and len(ids) >= count and ids, timeout=180, what=f"berth dev serving ({self.output})")

    def stop(self, sig: int = signal.SIGINT) -> int:
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)
        try:
            return self.process.wait(90)
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
            self._reader.join(5)


def containers_of(deployment_id: str) -> list:
    return engine().containers.list(all=True, filters={"label": f"berth.deployment={deployment_id}"},
                                    ignore_removed=True)


def test_berth_dev_serves_reloads_and_cleans_up(platform: RunningPlatform, tmp_path: pathlib.Path) -> None:
    project = f"d{uuid.uuid4().hex[:8]}"
    key = platform.cli_json("projects", "create", project)["api_key"]
    directory = worker_dir(tmp_path / "app", page="v1\n", project=project)
    # a managed environment is refused, nothing built or created
    refused = cli(platform, key, "dev", str(directory), "-e", "staging")
    assert refused.returncode == 5 and "managed environment" in refused.stderr
    cli(platform, key, "env", "create", "dev", "-p", project)
    platform.cli("secrets", "set", "--project", project, "--environment", "dev", "--name", "DEV_TOKEN",
                 "--type", "token", "--stdin", api_key=key, input="dev-canary-31")

    # a session killed without its cleanup leaves its replica; the next start sweeps it
    crashed = DevSession(platform, key, directory)
    try:
        [orphan] = crashed.serving()
    finally:
        crashed.stop(signal.SIGKILL)
    assert containers_of(orphan), "the killed session's replica is still there before the next start"

    session = DevSession(platform, key, directory)
    try:
        [first] = session.serving()
        assert first != orphan and "swept an earlier dev session" in session.output
        eventually(lambda: not containers_of(orphan), timeout=60, what="the orphan's container removed")

        def get(path: str) -> requests.Response:
            return requests.get(platform.router + path, timeout=30,
                                headers={"X-Berth-Project": project, "X-Berth-Environment": "dev"})

        assert get("/page.txt").text == "v1\n"
        cgi = get("/cgi-bin/index.cgi").text
        assert "secret=dev-canary-31" in cgi and f"deployment={first}" in cgi
        assert "dev-canary-31" not in session.output  # values are injected by the scheduler, never shown
        eventually(lambda: f"[{first}] dev-worker-up" in session.output, timeout=30,
                   what=f"the replica's output streamed ({session.output})")

        edited = time.monotonic()
        (directory / "www" / "page.txt").write_text("v2\n")
        eventually(lambda: get("/page.txt").text == "v2\n", timeout=180, what="the edit served")
        print(f"DEV_RELOAD edit served after {time.monotonic() - edited:.1f} s")
        second = session.serving(2)[-1]
        assert second != first
        eventually(lambda: not containers_of(first), timeout=60, what="the replaced build's container removed")
        envs = cli_json(platform, key, "env", "list", "-p", project)["environments"]
        assert {e["name"]: e["deployment_id"] for e in envs}["preview"] == ""  # no managed pointer moved
    finally:
        code = session.stop(signal.SIGINT)
    assert code == 0, session.output
    assert "dev session ended" in session.output
    assert containers_of(first) == [] and containers_of(second) == []


def test_a_run_wakes_a_deployment_scaled_to_zero(platform: RunningPlatform, tmp_path: pathlib.Path) -> None:
    project = f"z{uuid.uuid4().hex[:8]}"
    key = platform.cli_json("projects", "create", project)["api_key"]
    dep = cli(platform, key, "deploy", str(worker_dir(tmp_path / "w")), "--quiet", "-p", project).stdout.strip()
    cli_json(platform, key, "env", "create", "qa", "-p", project)
    cli_json(platform, key, "promote", dep, "--to", "qa", "--min-replicas", "0", "--no-wait", "-p", project)

    def qa_replicas() -> list:
        status = cli_json(platform, key, "deployment", "status", dep, "-e", "qa", "-p", project)
        return [r for b in status["bindings"] if b["environment"] == "qa" for r in b["replicas"]]

    # the binding exists with no replica (min 0, never asked for)
    eventually(lambda: cli_json(platform, key, "deployment", "status", dep, "-e", "qa", "-p", project)["bindings"],
               timeout=60, what="the scheduler reports the qa binding")
    assert qa_replicas() == []
    unknown = cli(platform, key, "experiments", "run", "--deployment", dep, "--dataset",
                  str(dataset(tmp_path / "cases.jsonl")), "-e", "staging", "-p", project)
    assert unknown.returncode == 5 and "is not bound to environment 'staging'" in unknown.stderr
    run = cli_json(platform, key, "experiments", "run", "--deployment", dep, "--dataset",
                   str(dataset(tmp_path / "cases.jsonl")), "--name", "wake", "-e", "qa", "-p", project)["run"]
    assert (run["passed"], run["total"]) == (50, 50)
    assert [r for r in qa_replicas() if r["state"] == "ready"], "the run's first request woke a replica in qa"


def test_gates_from_berth_toml_apply_all_or_none(platform: RunningPlatform, tmp_path: pathlib.Path) -> None:
    project = f"g{uuid.uuid4().hex[:8]}"
    key = platform.cli_json("projects", "create", project)["api_key"]
    cases = dataset(tmp_path / "cases.jsonl")
    (tmp_path / "berth.toml").write_text(
        f'project = "{project}"\n\n[gates.production]\nexperiment = "smoke"\nthreshold = 0.95\n'
        'dataset = "cases.jsonl"\n\n[gates.qa]\nexperiment = "smoke"\nthreshold = 0.5\ndataset = "cases.jsonl"\n')
    # qa does not exist: nothing is set, not even production's
    missing = cli(platform, key, "env", "gate", cwd=tmp_path)
    assert missing.returncode == 3 and "environment 'qa' not found" in missing.stderr
    assert rest(platform, key, "GET", "/gates").json()["gates"] == []
    cli_json(platform, key, "env", "create", "qa", "-p", project)
    applied = platform.cli("env", "gate", "-o", "json", api_key=key, cwd=tmp_path)
    gates = json.loads(applied.stdout)["data"]["gates"]
    assert sorted((g["environment"], g["threshold"]) for g in gates) == [("production", 0.95), ("qa", 0.5)]
    from berth.experiments import load_dataset

    assert {g["dataset_digest"] for g in gates} == {load_dataset(cases).digest}
