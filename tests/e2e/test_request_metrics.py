"""Request metrics through a real platform (``berth up``, two router worker
processes, a real replica): a known mix of 200s, 500s and a slow path, then
``berth deployment status`` (text and JSON) and the REST status show the
counts, the error rate and a p99 in the slow path's histogram bucket, summed
over both workers' reports."""
from __future__ import annotations

import io
import json
import tarfile
import urllib.request
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
import requests

from berth.internal.v1 import scheduler_internal_pb2, scheduler_internal_pb2_grpc
from tests.support.docker_engine import BUSYBOX, ENTRYPOINT, RUN_ID, TEST_LABEL, engine, remove_labelled
from tests.support.platform import RunningPlatform, eventually

pytestmark = [pytest.mark.docker, pytest.mark.e2e]

# /cgi-bin/index.cgi?fail answers 500, ?slow answers 200 after a second, anything else 200 at once.
CGI = """#!/bin/sh
case "$QUERY_STRING" in
  fail) printf 'HTTP/1.1 500 Internal Server Error\\r\\nContent-Type: text/plain\\r\\n\\r\\nfailed\\n' ;;
  slow) sleep 1; printf 'HTTP/1.1 200 OK\\r\\nContent-Type: text/plain\\r\\n\\r\\nslow\\n' ;;
  *) printf 'HTTP/1.1 200 OK\\r\\nContent-Type: text/plain\\r\\n\\r\\nok\\n' ;;
esac
"""
APPLETS = ("sh", "mkdir", "cat", "chmod", "httpd", "env", "sleep", "printf")
FAST, FAILING, SLOW = 150, 40, 10
TOTAL = FAST + FAILING + SLOW


def build_mixed_worker() -> str:
    """A busybox httpd worker with the CGI above (the test worker's
    entrypoint: the environment written for the CGI, httpd on $PORT)."""
    tag = f"berth-test-mixed:{uuid.uuid4().hex[:8]}"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        def add(name: str, data: bytes, mode: int = 0o755) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))

        add("Dockerfile", b"FROM scratch\nCOPY busybox /bin/busybox\nCOPY applets/ /bin/\n"
            b"COPY entrypoint.sh /app/entrypoint.sh\nCOPY cgi.sh /app/cgi.sh\nENV PATH=/bin\n"
            b'ENTRYPOINT ["/bin/busybox", "sh", "/app/entrypoint.sh"]\n', 0o644)
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
def platform(tmp_path_factory):
    p = RunningPlatform(tmp_path_factory.mktemp("request-metrics") / "data")
    p.data_dir.mkdir()
    p.env["BERTH_ROUTER_WORKERS"] = "2"
    p.start()
    yield p
    p.stop()
    p.remove_containers()
    remove_labelled(engine(), TEST_LABEL)


def live_reporters(platform: RunningPlatform) -> set[str]:
    """The router processes the scheduler hears from (its internal
    ListRouters, with the platform's service token)."""
    token = (platform.data_dir / "service.token").read_text().strip()
    with grpc.insecure_channel(f"127.0.0.1:{platform.ports['scheduler']}") as channel:
        answer = scheduler_internal_pb2_grpc.SchedulerInternalStub(channel).ListRouters(
            scheduler_internal_pb2.ListRoutersRequest(), metadata=[("x-api-key", token)], timeout=10
        )
    return {r.reporter for r in answer.routers}


def test_status_shows_counts_error_rate_and_p99_merged_over_two_router_workers(platform) -> None:
    key = platform.cli_json("projects", "create", "metrics")["api_key"]
    tag = build_mixed_worker()
    deployment = platform.cli_json("deploy", "--image", tag, "--project", "metrics", api_key=key)["deployment"]["id"]
    assert len(eventually(lambda: live_reporters(platform) if len(live_reporters(platform)) == 2 else None,
                          timeout=30, what="two router worker processes reporting")) == 2

    def status_now() -> dict[str, Any]:
        data = platform.cli_json("deployment", "status", deployment, "--project", "metrics", api_key=key)
        (binding,) = data["bindings"]
        return binding

    eventually(lambda: status_now()["status"] == "running", timeout=90, what="the binding running")
    assert status_now()["requests"] is None  # no request yet

    # Every request on its own connection, so the kernel spreads them over both workers.
    def one(query: str) -> int:
        return requests.get(f"{platform.router}/cgi-bin/index.cgi?{query}", timeout=60,
                            headers={"X-Berth-Project": "metrics", "X-Berth-Environment": "preview",
                                     "Connection": "close"}).status_code

    queries = ["ok"] * FAST + ["fail"] * FAILING + ["slow"] * SLOW
    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = Counter(pool.map(one, queries))
    assert statuses == {200: FAST + SLOW, 500: FAILING}

    def settled() -> dict[str, Any] | None:
        requests_ = status_now()["requests"]
        return requests_ if requests_ is not None and requests_["last_minute"]["requests"] == TOTAL else None

    figures = eventually(settled, timeout=30, what="every request in the scheduler's figures")
    minute, five = figures["last_minute"], figures["last_five_minutes"]
    assert minute["responses"] == {"2xx": FAST + SLOW, "3xx": 0, "4xx": 0, "5xx": FAILING}
    assert five["requests"] == minute["requests"] and five["responses"] == minute["responses"]
    assert minute["error_rate"] == pytest.approx(FAILING / (TOTAL))
    assert minute["requests_per_second"] == pytest.approx((TOTAL) / 60)
    assert five["requests_per_second"] == pytest.approx((TOTAL) / 300)
    # p99 is among the ten slow ones (just over 1 s): the (1 s, 2.5 s] bucket
    assert 1.0 < minute["p99_seconds"] <= 2.5
    assert minute["p50_seconds"] < minute["p99_seconds"] and minute["p50_seconds"] <= 0.5

    # the same through REST, and as text
    request = urllib.request.Request(f"{platform.router}/api/v1/deployments/{deployment}/status",
                                     headers={"X-API-KEY": key})
    with urllib.request.urlopen(request, timeout=30) as response:
        rest = json.loads(response.read())
    assert rest["bindings"][0]["requests"]["last_five_minutes"]["responses"]["5xx"] == FAILING
    text = platform.cli("deployment", "status", deployment, "--project", "metrics", api_key=key).stdout
    assert "Requests: 1m" in text and "errors" in text and "p99" in text

    # /metrics keeps its Prometheus families, summed over both workers
    exposition = requests.get(f"{platform.router}/metrics", timeout=30).text
    assert "berth_router_request_duration_seconds_bucket" in exposition
    assert "berth_router_workers 2.0" in exposition
