"""The router with the real platform (``berth up``) and real busybox worker
containers: the REST API's semantics, the zero-downtime prober (promotions,
rollbacks and a scale-down under load, with read-your-own-write), and
Schemathesis against the served OpenAPI document.

The tests share one platform and run in file order; the Schemathesis test
comes last because it may terminate, start and scale what it finds."""
from __future__ import annotations

import pathlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import docker
import pytest
import requests

from tests.support.docker_engine import engine, write_worker_context
from tests.support.platform import RunningPlatform, eventually

pytestmark = [pytest.mark.docker, pytest.mark.e2e]

ENV = "staging"


@dataclass
class Shop:
    platform: RunningPlatform
    key: str
    v1: str
    v2: str
    other_key: str
    api: str = field(init=False)

    def __post_init__(self) -> None:
        self.api = self.platform.router + "/api/v1"

    def call(self, method: str, path: str, key: str | None = None, **kw: Any) -> requests.Response:
        headers = {} if key == "" else {"X-API-KEY": key or self.key}
        return requests.request(method, self.api + path, headers=headers, timeout=60, **kw)

    def ok(self, method: str, path: str, **kw: Any) -> Any:
        resp = self.call(method, path, **kw)
        assert resp.status_code == 200, f"{method} {path}: {resp.status_code} {resp.text}"
        return resp.json()

    def binding_running(self, deployment_id: str, environment: str = ENV, ready: int = 1) -> bool:
        status = self.ok("GET", f"/deployments/{deployment_id}/status")
        for b in status["bindings"]:
            if b["environment"] == environment:
                return b["status"] == "running" and sum(r["state"] == "ready" for r in b["replicas"]) >= ready
        return False


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    tmp: pathlib.Path = tmp_path_factory.mktemp("router-platform")
    platform = RunningPlatform(tmp / "data")
    platform.data_dir.mkdir()
    images: list[str] = []
    try:
        platform.start()
        key = platform.cli_json("projects", "create", "shop")["api_key"]
        other_key = platform.cli_json("projects", "create", "other")["api_key"]
        for version in ("v1", "v2"):
            write_worker_context(str(tmp / version), version=version)
        v1 = platform.cli_json("deploy", str(tmp / "v1"), "--project", "shop", "--env", ENV,
                               "--min-replicas", "2", "--max-replicas", "3", api_key=key)["deployment"]["id"]
        v2 = platform.cli_json("deploy", str(tmp / "v2"), "--project", "shop", api_key=key)["deployment"]["id"]
        s = Shop(platform, key, v1, v2, other_key)
        images += [s.ok("GET", f"/deployments/{d}")["image_id"] for d in (v1, v2)]
        # Bind v2 to staging too (a warm previous deployment), then back to v1.
        s.ok("POST", "/deployments/promote", json={"source_deployment_id": v2, "target_environment_id": ENV})
        eventually(lambda: s.binding_running(v2), timeout=90, what="v2 ready in staging")
        s.ok("POST", "/deployments/rollback", json={"environment_id": ENV, "deployment_id": v1})
        eventually(lambda: s.binding_running(v1, ready=2), timeout=90, what="v1 ready in staging")
        yield s
    finally:
        platform.stop()
        platform.remove_containers()
        # Only this module's images: other sessions share the engine.
        for image in images:
            try:
                engine().images.remove(image, force=True)
            except docker.errors.APIError:
                pass  # already gone


def test_rest_api_semantics(shop: Shop) -> None:
    # Authentication: none, and a wrong key.
    for key, why in (("", "X-API-KEY"), ("berth_pk_not-a-key", "not valid")):
        resp = shop.call("GET", "/environments", key=key)
        assert resp.status_code == 401 and why in resp.json()["error"]["message"], resp.text

    envs = shop.ok("GET", "/environments")["environments"]
    staging = next(e for e in envs if e["name"] == ENV)
    assert staging["deployment_id"] == shop.v1 and staging["sequence"] == 3
    assert {"id", "name", "deployment_id", "previous_deployment_id", "sequence", "protected"} <= set(staging)

    listed = shop.ok("GET", "/deployments", params={"environment_id": ENV})["deployments"]
    assert {d["id"] for d in listed} == {shop.v1, shop.v2}
    one = shop.ok("GET", f"/deployments/{shop.v1}")
    assert one["id"] == shop.v1 and one["image_id"].startswith("sha256:") and one["state"] == "active"
    assert one["created_at"]
    status = shop.ok("GET", f"/deployments/{shop.v1}/status")
    assert {b["environment"] for b in status["bindings"]} == {ENV}
    [bound] = status["bindings"]  # serving again after the rollback: driven to within its bounds
    assert bound["min_replicas"] <= bound["desired_replicas"] <= bound["max_replicas"], bound
    assert shop.ok("GET", f"/deployments/{shop.v1}/errors") == {"deployment_id": shop.v1, "errors": [],
                                                                 "next_page_token": ""}

    history = shop.ok("GET", f"/environments/{ENV}/promotions")["entries"]
    assert [(h["sequence"], h["kind"], h["deployment_id"]) for h in history] == [
        (1, "deploy", shop.v1), (2, "promote", shop.v2), (3, "rollback", shop.v1)
    ]
    assert history[2]["previous_deployment_id"] == shop.v2 and history[2]["actor"]

    # Malformed input names the field.
    for body, field_name in (
        ({"target_environment_id": ENV}, "source_deployment_id"),
        ({"source_deployment_id": shop.v2, "target_environment_id": ENV, "confirm": "yes"}, "confirm"),
        ({"source_deployment_id": shop.v2, "target_environment": ENV}, "target_environment"),
    ):
        resp = shop.call("POST", "/deployments/promote", json=body)
        assert resp.status_code == 400 and field_name in resp.json()["error"]["message"], resp.text
    resp = shop.call("POST", "/deployments/promote", data=b"{not json")
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_json"

    # Unknown and other projects' resources.
    assert shop.call("GET", "/deployments/dep_000000000000").status_code == 404
    malformed = shop.call("GET", "/deployments/dep_nope")  # cannot be an id: the caller's error
    assert malformed.status_code == 400 and "deployment_id" in malformed.json()["error"]["message"], malformed.text
    assert shop.call("GET", f"/deployments/{shop.v1}", key=shop.other_key).status_code in (403, 404)
    assert shop.call("GET", "/environments/qa/promotions").status_code == 404
    # Production is protected: an unconfirmed move is a failed precondition.
    resp = shop.call("POST", "/deployments/promote",
                     json={"source_deployment_id": shop.v1, "target_environment_id": "production"})
    assert resp.status_code == 412 and "confirm" in resp.json()["error"]["message"].lower(), resp.text
    # A lost compare-and-swap.
    resp = shop.call("POST", "/deployments/promote", json={
        "source_deployment_id": shop.v2, "target_environment_id": ENV, "expected_sequence": 1})
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "aborted", resp.text

    # Secrets: values go in, never come out.
    put = shop.ok("PUT", "/secrets", json={"name": "API_TOKEN", "type": "token", "value": "canary-VALUE",
                                           "environment_id": ENV})
    assert put["secret"]["name"] == "API_TOKEN" and put["secret"]["version"] == 1
    listed_secrets = shop.call("GET", "/secrets", params={"environment_id": ENV})
    assert [s["name"] for s in listed_secrets.json()["secrets"]] == ["API_TOKEN"]
    assert "canary-VALUE" not in listed_secrets.text and "canary-VALUE" not in str(put)

    # Observability: metrics carry the served traffic; no key in the router's log.
    served = shop.platform.get("shop", ENV)
    assert served.status_code == 200
    # With several router workers, another worker's counts reach /metrics within a second.
    served_line = f'deployment="{shop.v1}",environment="{ENV}",project="shop",status_class="2xx"'
    deadline = time.monotonic() + 10
    metrics = requests.get(shop.platform.router + "/metrics", timeout=10).text
    while served_line not in metrics and time.monotonic() < deadline:
        time.sleep(0.2)
        metrics = requests.get(shop.platform.router + "/metrics", timeout=10).text
    assert served_line in metrics
    assert "berth_router_pointer_table_revision" in metrics
    router_log = (shop.platform.data_dir / "logs" / "router.log").read_text()
    assert '"event": "request"' in router_log
    assert shop.key not in router_log and shop.other_key not in router_log and "canary-VALUE" not in router_log


@dataclass
class Answer:
    started: float
    ended: float
    status: int
    deployment: str  # X-Berth-Deployment
    served_by: str  # what the worker says it is


def test_rest_lists_page_with_page_size_and_page_token(shop: Shop) -> None:
    first = shop.ok("GET", "/deployments", params={"page_size": 1})
    assert [d["id"] for d in first["deployments"]] == [shop.v2] and first["next_page_token"]
    second = shop.ok("GET", "/deployments", params={"page_size": "1", "page_token": first["next_page_token"]})
    assert [d["id"] for d in second["deployments"]] == [shop.v1] and second["next_page_token"] == ""
    whole = shop.ok("GET", "/deployments")
    assert [d["id"] for d in whole["deployments"]] == [shop.v2, shop.v1] and whole["next_page_token"] == ""

    entries: list[int] = []
    token = ""
    while True:
        page = shop.ok("GET", f"/environments/{ENV}/promotions", params={"page_size": 2, "page_token": token})
        assert len(page["entries"]) <= 2
        entries += [e["sequence"] for e in page["entries"]]
        token = page["next_page_token"]
        if not token:
            break
    assert entries == [1, 2, 3]

    for params, field_name in (({"page_size": "-1"}, "page_size"), ({"page_size": "ten"}, "page_size"),
                               ({"page_token": "garbage!"}, "page_token"),
                               ({"page_token": first["next_page_token"], "environment_id": ENV}, "page_token")):
        resp = shop.call("GET", "/deployments", params=params)
        assert resp.status_code == 400, (params, resp.text)
        assert resp.json()["error"]["code"] == "invalid_argument" and field_name in resp.json()["error"]["message"]
    # Another project's token is refused too.
    foreign = shop.call("GET", "/deployments", key=shop.other_key, params={"page_token": first["next_page_token"]})
    assert foreign.status_code == 400 and "page_token" in foreign.json()["error"]["message"]


def test_prober_zero_downtime_with_moves_and_scale_down(shop: Shop) -> None:
    total, concurrency, moves = 2000, 32, 10
    answers: list[Answer] = []
    lock = threading.Lock()
    stop = threading.Event()
    moved: list[tuple[float, float, str]] = []  # (call started, returned, expected deployment)
    scaled: list[Any] = []

    def client() -> None:
        session = requests.Session()
        session.headers.update({"X-Berth-Project": "shop", "X-Berth-Environment": ENV})
        while not stop.is_set():
            started = time.monotonic()
            try:
                resp = session.get(shop.platform.router + "/", timeout=60)
                status, deployment, text = resp.status_code, resp.headers.get("X-Berth-Deployment", ""), resp.text
            except requests.RequestException as exc:
                status, deployment, text = 0, "", repr(exc)
            served_by = next((line.split("=", 1)[1] for line in text.splitlines() if line.startswith("deployment=")),
                             text[:200])
            with lock:
                answers.append(Answer(started, time.monotonic(), status, deployment, served_by))

    def count() -> int:
        with lock:
            return len(answers)

    def mover() -> None:
        step = total // (moves + 2)
        for i in range(moves):
            wanted = count() + step  # every move under load, with answers before the next one
            while count() < wanted and not stop.is_set():
                time.sleep(0.005)
            if i == moves // 2:
                # Scale-down through the API lowers the floor; the autoscaler
                # may keep a replica for the load, so the ceiling comes down
                # too, and the mover waits (under load) until a replica left.
                scaled.append(shop.call("POST", f"/deployments/{shop.v1}/scale-down",
                                        json={"by": 1, "environment_id": ENV}))
                shop.platform.cli("deployment", "scale", shop.v1, "--min-replicas", "1", "--max-replicas", "1",
                                  "--environment", ENV, "--project", "shop", api_key=shop.key)
                eventually(lambda: ready_replicas(shop, shop.v1) == 1, timeout=90, what="a v1 replica scaled away")
            started = time.monotonic()
            if i % 2 == 0:
                resp = shop.call("POST", "/deployments/promote",
                                 json={"source_deployment_id": shop.v2, "target_environment_id": ENV})
            else:
                resp = shop.call("POST", "/deployments/rollback", json={"environment_id": ENV, "deployment_id": shop.v1})
            assert resp.status_code == 200, resp.text
            body = resp.json()
            assert body["routed"] is True
            moved.append((started, time.monotonic(), body["environment"]["deployment_id"]))
        wanted = count() + step  # load after the last move too
        while count() < wanted and not stop.is_set():
            time.sleep(0.005)

    with ThreadPoolExecutor(concurrency + 1) as pool:
        clients = [pool.submit(client) for _ in range(concurrency)]
        move_job = pool.submit(mover)
        try:
            move_job.result(timeout=240)
            eventually(lambda: count() >= total, timeout=240, interval=0.05, what=f"{total} answers")
        finally:
            stop.set()
        for job in clients:
            job.result(timeout=90)

    assert len(moved) == moves and [m[2] for m in moved] == [shop.v2, shop.v1] * (moves // 2)
    assert scaled and scaled[0].status_code == 200, scaled[0].text if scaled else "no scale-down"
    assert scaled[0].json()["binding"]["min_replicas"] == 1 and scaled[0].json()["binding"]["deployment_id"] == shop.v1
    failed = [a for a in answers if not 200 <= a.status < 300]
    assert not failed, f"{len(failed)} of {len(answers)} failed, e.g. {failed[:3]}"
    assert {a.deployment for a in answers} <= {shop.v1, shop.v2}
    mismatched = [a for a in answers if a.deployment != a.served_by]
    assert not mismatched, f"{len(mismatched)} bodies disagree with X-Berth-Deployment: {mismatched[:3]}"
    # Read your own write: a request that started after a move returned (and
    # before the next move was asked for) is served by the move's target.
    stale = []
    for i, (_, returned, target) in enumerate(moved):
        next_started = moved[i + 1][0] if i + 1 < len(moved) else float("inf")
        stale += [a for a in answers if returned < a.started and a.ended < next_started and a.deployment != target]
    assert not stale, f"{len(stale)} answers from the old deployment after the move returned: {stale[:3]}"
    after_each = [sum(1 for a in answers if r < a.started < (moved[i + 1][0] if i + 1 < len(moved) else 1e18))
                  for i, (_, r, _) in enumerate(moved)]
    assert all(n > 0 for n in after_each), after_each  # every move was really under load
    print(f"prober: {len(answers)} answers at concurrency {concurrency}, {moves} moves, 1 scale-down, "
          f"all 2xx; answers after each move: {after_each}")
    # (A later rollback restores v1's bounds from its history entry, so the
    # count after the run says nothing; the mover saw the scale-away happen.)


def ready_replicas(shop: Shop, deployment_id: str) -> int:
    status = shop.ok("GET", f"/deployments/{deployment_id}/status")
    return sum(r["state"] == "ready" for b in status["bindings"] if b["environment"] == ENV for r in b["replicas"])


def test_schemathesis_against_served_openapi(shop: Shop) -> None:
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis.generation import GenerationMode
    from schemathesis.specs.openapi import checks

    schema = schemathesis.openapi.from_url(shop.api + "/openapi.json")
    run_checks = [checks.status_code_conformance, checks.content_type_conformance,
                  checks.response_schema_conformance, checks.ignored_auth]
    from schemathesis.checks import not_a_server_error

    run_checks.insert(0, not_a_server_error)
    seen: dict[str, set[int]] = {}
    real_ids = {"id": st.sampled_from([shop.v1, shop.v2, ENV, "production"])}
    operations = [result.ok() for result in schema.get_all_operations()]
    # GET /watch streams server-sent events for up to an hour: tests/router/test_rest_parity.py covers it.
    # GET /deployments/{id}/logs?follow=true streams until the client leaves: tests/cli/test_logs_cli.py.
    operations = [op for op in operations if op.path not in ("/api/v1/watch", "/api/v1/deployments/{id}/logs")]
    assert len(operations) >= 14  # (schemathesis may leave out the unauthenticated document itself)
    def make_check(label: str, strategies: list[Any]) -> Any:
        @settings(max_examples=12, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=st.one_of(strategies))
        def check(case: Any) -> None:
            negative = case.meta is not None and getattr(case.meta, "generation", None) is not None and \
                case.meta.generation.mode == GenerationMode.NEGATIVE
            response = case.call_and_validate(
                base_url=shop.platform.router, headers={"X-API-KEY": shop.key},
                checks=run_checks + ([checks.negative_data_rejection] if negative else []),
            )
            seen.setdefault(label, set()).add(response.status_code)

        return check

    for operation in operations:
        strategies = [operation.as_strategy(), operation.as_strategy(GenerationMode.NEGATIVE)]
        if "{id}" in operation.path:
            strategies.append(operation.as_strategy(path_parameters=real_ids))  # type: ignore[arg-type]
        make_check(f"{operation.method.upper()} {operation.path}", strategies)()
    assert set(seen) == {f"{op.method.upper()} {op.path}" for op in operations}
    print("schemathesis statuses:", {k: sorted(v) for k, v in sorted(seen.items())})
