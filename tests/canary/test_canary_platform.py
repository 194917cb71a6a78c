"""Canaries on a real platform (``berth up``: registry, scheduler, router on
real sockets, busybox workers in Docker), through the registry's gRPC API:

- the router's split, measured over 2,000 requests, within 3 points of the
  weight; pause, resume, abort (weight 0: every request stable), and
  promote-now (the pointer moves: every request the candidate's);
- a candidate answering 5xx to a share of requests is aborted by the
  scheduler's controller (weight 0) with the reason in history and a
  ``canary_aborted`` deployment error, with no 5xx served by the stable;
- a healthy candidate walks its steps to 100% while the registry is
  SIGKILLed mid-canary (restarted by ``berth up``'s supervisor): each step
  is applied exactly once.

The controller's interval is 1 s here (``BERTH_CANARY_INTERVAL``), bake
times are seconds; the figures are printed, bounds are generous.
"""
from __future__ import annotations

import io
import os
import signal
import tarfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
import requests

from berth import enums, local
from berth.v1 import common_pb2, registry_pb2, registry_pb2_grpc
from tests.support.docker_engine import BUSYBOX, ENTRYPOINT, RUN_ID, TEST_LABEL, engine, remove_labelled
from tests.support.platform import RunningPlatform, eventually

pytestmark = [pytest.mark.docker, pytest.mark.e2e]

# Answers 500 to $FAIL_PERCENT percent of requests (at random), else 200.
CGI = """#!/bin/sh
if [ "$((RANDOM % 100))" -lt "${FAIL_PERCENT:-0}" ]; then
  printf 'HTTP/1.1 500 Internal Server Error\\r\\nContent-Type: text/plain\\r\\n\\r\\nfailed\\n'
else
  printf 'HTTP/1.1 200 OK\\r\\nContent-Type: text/plain\\r\\n\\r\\nok %s\\n' "$WORKER_VERSION"
fi
"""
APPLETS = ("sh", "mkdir", "cat", "chmod", "httpd", "env", "sleep", "printf")
PROJECT = "canary"


def build_worker(version: str, fail_percent: int) -> str:
    tag = f"berth-test-canary:{version}-{uuid.uuid4().hex[:8]}"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        def add(name: str, data: bytes, mode: int = 0o755) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))

        add("Dockerfile", (
            "FROM scratch\nCOPY busybox /bin/busybox\nCOPY applets/ /bin/\n"
            "COPY entrypoint.sh /app/entrypoint.sh\nCOPY cgi.sh /app/cgi.sh\n"
            f"ENV PATH=/bin WORKER_VERSION={version} FAIL_PERCENT={fail_percent}\n"
            'ENTRYPOINT ["/bin/busybox", "sh", "/app/entrypoint.sh"]\n').encode(), 0o644)
        with open(BUSYBOX, "rb") as f:
            add("busybox", f.read())
        add("entrypoint.sh", ENTRYPOINT.encode())
        add("cgi.sh", CGI.encode())
        for applet in APPLETS:
            link = tarfile.TarInfo(f"applets/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
    buf.seek(0)
    engine().images.build(fileobj=buf, custom_context=True, tag=tag, labels={"berth.test": RUN_ID}, rm=True)
    return tag


@pytest.fixture(scope="module")
def platform(tmp_path_factory):  # type: ignore[no-untyped-def]
    p = RunningPlatform(tmp_path_factory.mktemp("canary") / "data")
    p.data_dir.mkdir()
    p.env["BERTH_CANARY_INTERVAL"] = "1"
    try:
        p.start()
        yield p
    finally:
        p.stop()
        local.stop_processes(local.recorded_processes(p.data_dir / local.RUN_DIR), timeout=5)
        p.remove_containers()
        remove_labelled(engine(), TEST_LABEL)


class Api:
    """The registry's gRPC API with the project's key."""

    def __init__(self, platform: RunningPlatform, key: str) -> None:
        self.platform = platform
        self.channel = grpc.insecure_channel(f"127.0.0.1:{platform.ports['registry']}")
        self.stub = registry_pb2_grpc.RegistryStub(self.channel)
        self.metadata = [("x-api-key", key)]

    def call(self, method: str, request: Any, *, attempts: int = 40) -> Any:
        """Retries UNAVAILABLE only (the registry restarting)."""
        for attempt in range(attempts):
            try:
                return getattr(self.stub, method)(request, metadata=self.metadata, timeout=10)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == attempts - 1:
                    raise
                time.sleep(0.5)
        raise AssertionError("unreachable")

    def canary(self, env: str = "staging") -> common_pb2.Environment:
        return self.call("GetCanary", registry_pb2.GetCanaryRequest(environment=env)).environment

    def start(self, deployment: str, steps: list[tuple[int, int]], *, min_requests: int = 20,
              latency_ratio: float = 0, env: str = "staging") -> common_pb2.Environment:
        return self.call("StartCanary", registry_pb2.StartCanaryRequest(
            deployment_id=deployment, environment=env,
            steps=[common_pb2.Canary.Step(weight=w, bake_seconds=b) for w, b in steps],
            thresholds=common_pb2.Canary.Thresholds(min_requests=min_requests, max_latency_ratio=latency_ratio),
            min_replicas=1, max_replicas=1,
        )).environment

    def history(self, env: str = "staging") -> list[common_pb2.HistoryEntry]:
        return list(self.call("ListHistory", registry_pb2.ListHistoryRequest(environment=env, page_size=1000)).entries)


def state(env: common_pb2.Environment) -> str:
    return enums.label(common_pb2.Canary.State, env.canary.state)


def probe(platform: RunningPlatform, count: int, concurrency: int = 8) -> list[tuple[int, str]]:
    """``count`` requests to staging: (status, X-Berth-Deployment) each."""
    local_ = threading.local()

    def one(_: int) -> tuple[int, str]:
        session = getattr(local_, "session", None)
        if session is None:
            session = local_.session = requests.Session()
        r = session.get(f"{platform.router}/cgi-bin/index.cgi", timeout=60,
                        headers={"X-Berth-Project": PROJECT, "X-Berth-Environment": "staging"})
        return r.status_code, r.headers.get("X-Berth-Deployment", "")

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(one, range(count)))


class Background:
    """Requests to staging in a thread until stopped (bounded to 600 s)."""

    def __init__(self, platform: RunningPlatform) -> None:
        self.platform = platform
        self.results: list[tuple[float, int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        session = requests.Session()
        deadline = time.monotonic() + 600
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                r = session.get(f"{self.platform.router}/cgi-bin/index.cgi", timeout=30,
                                headers={"X-Berth-Project": PROJECT, "X-Berth-Environment": "staging"})
                self.results.append((time.monotonic(), r.status_code, r.headers.get("X-Berth-Deployment", "")))
            except requests.RequestException:
                self.results.append((time.monotonic(), 0, ""))
            time.sleep(0.005)

    def __enter__(self) -> Background:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(60)


@pytest.fixture(scope="module")
def setup(platform):  # type: ignore[no-untyped-def]
    key = platform.cli_json("projects", "create", PROJECT)["api_key"]
    api = Api(platform, key)
    deployments = {}
    for name, fail in (("v1", 0), ("v2", 0), ("bad", 30), ("v3", 0)):
        tag = build_worker(name, fail)
        deployments[name] = platform.cli_json("deploy", "--image", tag, "--project", PROJECT, "--env", "preview",
                                              api_key=key)["deployment"]["id"]
    platform.cli("promote", deployments["v1"], "--to", "staging", "--project", PROJECT, api_key=key)
    eventually(lambda: probe(platform, 1)[0] == (200, deployments["v1"]), timeout=120, what="v1 serving staging")
    return api, deployments, key


def test_split_pause_resume_abort_promote_now(platform, setup) -> None:  # type: ignore[no-untyped-def]
    api, deps, _ = setup
    # Never judged here (the controller's part is the next tests'): the split alone.
    env = api.start(deps["v2"], [(30, 3600)], min_requests=10_000_000)
    assert state(env) == "running" and env.canary.candidate_weight == 30
    # The candidate binding was created at start; the split begins once it serves.
    eventually(lambda: any(d == deps["v2"] for _, d in probe(platform, 20)), timeout=120, what="v2 taking a share")
    results = probe(platform, 2000, concurrency=int(os.environ.get("CANARY_PROBE_CONCURRENCY", "8")))
    served = Counter(d for _, d in results)
    share = served[deps["v2"]] / len(results) * 100
    print(f"SPLIT weight 30: candidate {served[deps['v2']]}, stable {served[deps['v1']]} of {len(results)} "
          f"= {share:.2f}%")
    assert {s for s, _ in results} == {200}
    assert abs(share - 30) <= 3
    # Pinned with the header the router sets: sticky.
    pinned = [requests.get(f"{platform.router}/cgi-bin/index.cgi", timeout=30, headers={
        "X-Berth-Project": PROJECT, "X-Berth-Environment": "staging", "X-Berth-Deployment": deps["v2"]})
        for _ in range(30)]
    assert {r.headers["X-Berth-Deployment"] for r in pinned} == {deps["v2"]}

    paused = api.call("PauseCanary", registry_pb2.PauseCanaryRequest(environment="staging", reason="look"))
    assert state(paused.environment) == "paused"
    assert enums.label(common_pb2.HistoryEntry.Kind, paused.entry.kind) == "canary"
    resumed = api.call("ResumeCanary", registry_pb2.ResumeCanaryRequest(environment="staging"))
    assert state(resumed.environment) == "running"
    aborted = api.call("AbortCanary", registry_pb2.AbortCanaryRequest(environment="staging", reason="enough"))
    assert state(aborted.environment) == "aborted" and aborted.environment.canary.candidate_weight == 0
    after = eventually(lambda: (lambda r: r if {d for _, d in r} == {deps["v1"]} else None)(probe(platform, 200)),
                       timeout=30, what="every request on the stable after the abort")
    assert len(after) == 200

    api.start(deps["v2"], [(10, 3600)], min_requests=10_000_000)
    now = api.call("PromoteCanaryNow", registry_pb2.PromoteCanaryNowRequest(environment="staging"))
    assert now.environment.deployment_id == deps["v2"] and state(now.environment) == "promoted"
    assert enums.label(common_pb2.HistoryEntry.Kind, now.entry.kind) == "promote"
    eventually(lambda: {d for _, d in probe(platform, 100)} == {deps["v2"]}, timeout=30,
               what="every request on v2 after promote-now")


def test_failing_candidate_is_aborted(platform, setup) -> None:  # type: ignore[no-untyped-def]
    api, deps, key = setup
    with Background(platform) as prober:
        started = time.monotonic()
        env = api.start(deps["bad"], [(50, 3600)], min_requests=20)
        assert state(env) == "running"
        ended = eventually(lambda: (lambda e: e if state(e) == "aborted" else None)(api.canary()), timeout=180,
                           interval=0.2, what="the failing canary aborted")
        aborted_after = time.monotonic() - started
        # The router applies weight 0: the prober sees only the stable again.
        eventually(lambda: all(d == deps["v2"] for _, _, d in prober.results[-50:]) and len(prober.results) > 50,
                   timeout=30, what="only the stable serving")
    by = Counter((d, s) for _, s, d in prober.results)
    first_bad = next((t for t, _, d in prober.results if d == deps["bad"]), None)
    print(f"ABORT after {aborted_after:.1f} s from start (first candidate response at "
          f"{(first_bad or started) - started:.1f} s); responses {dict(by)}; analysis: {ended.canary.last_analysis}")
    assert ended.canary.candidate_weight == 0 and ended.deployment_id == deps["v2"]
    assert by[(deps["v2"], 500)] == 0 and by[(deps["bad"], 500)] > 0
    assert "5xx" in ended.canary.last_analysis
    entry = api.history()[-1]
    assert enums.label(common_pb2.HistoryEntry.Kind, entry.kind) == "canary" and "aborted" in entry.reason
    assert "5xx" in entry.reason
    errors_ = platform.cli_json("deployment", "errors", deps["bad"], "--project", PROJECT, api_key=key)["errors"]
    print("deployment errors:", errors_)
    assert any(e["kind"] == "canary_aborted" for e in errors_)


def test_healthy_candidate_reaches_100_across_a_registry_kill(platform, setup) -> None:  # type: ignore[no-untyped-def]
    api, deps, _ = setup
    steps = [(20, 3), (50, 3), (80, 3)]
    with Background(platform) as prober:
        before = api.canary().sequence
        # Latency judged loosely here (5x): this machine is shared and a one-minute p99 of a few
        # milliseconds is noisy; the latency rule itself is unit-tested (test_analysis.py).
        api.start(deps["v3"], steps, min_requests=5, latency_ratio=5)
        # Kill the registry once the first step was applied (mid-canary).
        reached = eventually(lambda: (lambda e: e if e.canary.step >= 1 or state(e) != "running" else None)(
            api.canary()), timeout=120, what="step 2 reached")
        assert state(reached) == "running", reached.canary
        registry = next(r for r in local.recorded_processes(platform.data_dir / local.RUN_DIR)
                        if r.name == "registry" and r.running())
        os.kill(registry.pid, signal.SIGKILL)
        killed = time.monotonic()
        done = eventually(lambda: (lambda e: e if state(e) in ("promoted", "aborted") else None)(api.canary()),
                          timeout=240, interval=0.5, what="the canary ended")
        print(f"registry killed at step 2; canary {state(done)} {time.monotonic() - killed:.1f} s later: "
              f"{done.canary.last_analysis}")
        assert state(done) == "promoted" and done.deployment_id == deps["v3"]
    entries = [h for h in api.history() if h.sequence > before]
    reasons = [(enums.label(common_pb2.HistoryEntry.Kind, h.kind), h.reason) for h in entries]
    for kind, reason in reasons:
        print("  ", kind, reason)
    kinds = [k for k, _ in reasons]
    assert kinds == ["canary", "canary", "canary", "promote"], kinds  # start, 20->50, 50->80, 100%: once each
    assert "20% -> 50%" in reasons[1][1] and "50% -> 80%" in reasons[2][1]
    assert [h.sequence for h in entries] == list(range(before + 1, before + 5))
    statuses = Counter(s for _, s, _ in prober.results)
    print("prober statuses during the canary:", dict(statuses))
    assert statuses.get(500, 0) == 0


def test_cli_promote_with_canary_and_canary_commands(platform, setup) -> None:  # type: ignore[no-untyped-def]
    api, deps, key = setup
    serving = api.canary().deployment_id
    candidate = deps["v1"] if serving != deps["v1"] else deps["v2"]
    bad = platform.cli("promote", candidate, "--to", "staging", "--project", PROJECT, "--canary", "50:1m,20:1m",
                       api_key=key, check=False)
    assert bad.returncode != 0 and "must increase" in bad.stderr
    started = platform.cli_json("promote", candidate, "--to", "staging", "--project", PROJECT,
                                "--canary", "10:1h,40:1h", "--min-requests", "1000000", api_key=key)
    assert started["canary"]["state"] == "running" and started["canary"]["candidate_weight"] == 10
    assert started["canary"]["thresholds"]["min_requests"] == 1000000
    assert [s["bake_seconds"] for s in started["canary"]["steps"]] == [3600, 3600]
    status = platform.cli_json("canary", "status", "staging", "--project", PROJECT, api_key=key)
    assert status["canary"]["candidate_deployment_id"] == candidate
    text = platform.cli("canary", "status", "staging", "--project", PROJECT, api_key=key).stdout
    print(text)
    assert "10%" in text and "running" in text
    paused = platform.cli_json("canary", "pause", "staging", "--project", PROJECT, api_key=key)
    assert paused["canary"]["state"] == "paused" and paused["entry"]["kind"] == "canary"
    twice = platform.cli("canary", "pause", "staging", "--project", PROJECT, api_key=key, check=False)
    assert twice.returncode != 0 and "not running" in twice.stderr
    platform.cli_json("canary", "resume", "staging", "--project", PROJECT, api_key=key)
    aborted = platform.cli_json("canary", "abort", "staging", "--project", PROJECT, "--reason", "cli test",
                                api_key=key)
    assert aborted["canary"]["state"] == "aborted" and aborted["canary"]["candidate_weight"] == 0
    assert aborted["environment"]["deployment_id"] == serving


def test_rest_canary_routes(platform, setup) -> None:  # type: ignore[no-untyped-def]
    api, deps, key = setup
    base = f"{platform.router}/api/v1/environments/staging/canary"
    headers = {"X-API-KEY": key}
    serving = api.canary().deployment_id
    candidate = deps["v1"] if serving != deps["v1"] else deps["v2"]
    bad = requests.post(base, headers=headers, json={"deployment_id": candidate, "plan": "50:1m,20:1m"}, timeout=30)
    print("bad plan:", bad.status_code, bad.json())
    assert bad.status_code == 400 and "increase" in bad.text
    missing = requests.post(base, headers=headers, json={"plan": "10:1m"}, timeout=30)
    assert missing.status_code == 400
    started = requests.post(base, headers=headers, timeout=30, json={
        "deployment_id": candidate, "plan": "10:1h,40:1h", "min_requests": 1000000, "reason": "rest"})
    assert started.status_code == 200, started.text
    body = started.json()
    assert body["canary"]["state"] == "running" and body["canary"]["candidate_weight"] == 10
    assert body["entry"]["kind"] == "canary"
    again = requests.post(base, headers=headers, json={"deployment_id": candidate, "plan": "10:1m"}, timeout=30)
    assert again.status_code == 412, again.text  # CANARY_RUNNING
    got = requests.get(base, headers=headers, timeout=30).json()
    assert got["canary"]["candidate_deployment_id"] == candidate
    for action, expected in (("pause", "paused"), ("resume", "running"), ("promote-now", "promoted")):
        answer = requests.post(f"{base}/{action}", headers=headers, json={}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["canary"]["state"] == expected
    assert requests.get(base, headers=headers, timeout=30).json()["environment"]["deployment_id"] == candidate
    ended = requests.post(f"{base}/abort", headers=headers, json={}, timeout=30)
    assert ended.status_code == 412 and "already ended" in ended.text, ended.text
    spec = requests.get(f"{platform.router}/api/v1/openapi.json", timeout=30).json()
    assert "/api/v1/environments/{id}/canary/promote-now" in spec["paths"] and "Canary" in spec["components"]["schemas"]
