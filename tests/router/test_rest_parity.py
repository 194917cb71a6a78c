"""REST parity with the gRPC API (issue 13): ``POST /api/v1/deployments``
registers a deployment by image reference as ``Registry.Deploy`` does, with
the same validation and errors — checked side by side against the same
platform over both APIs — and ``GET /api/v1/watch`` streams the project's
changes (Registry.WatchEnvironments) as server-sent events, resumable with
``Last-Event-ID``."""
from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import requests

from berth.client import error_from_rpc
from berth.v1 import registry_pb2, registry_pb2_grpc
from tests.support.platform import RunningPlatform

pytestmark = [pytest.mark.docker, pytest.mark.e2e]

# .invalid never resolves: the registry registers it, the scheduler records an image_pull_error.
IMAGE = "berth-parity.invalid/app:1"


@dataclass
class Apis:
    platform: RunningPlatform
    key: str
    registry: registry_pb2_grpc.RegistryStub

    def rest(self, method: str, path: str, body: Any = None, key: str | None = None) -> requests.Response:
        return requests.request(method, f"{self.platform.router}/api/v1{path}", json=body, timeout=60,
                                headers={"X-API-KEY": self.key if key is None else key})

    def grpc_deploy(self, **fields: Any) -> registry_pb2.DeployResponse:
        return self.registry.Deploy(registry_pb2.DeployRequest(**fields), metadata=(("x-api-key", self.key),),
                                    timeout=10)


@pytest.fixture(scope="module")
def apis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Apis]:
    tmp: pathlib.Path = tmp_path_factory.mktemp("rest-parity")
    platform = RunningPlatform(tmp / "data")
    platform.data_dir.mkdir()
    try:
        platform.start()
        key = platform.cli_json("projects", "create", "parity")["api_key"]
        with grpc.insecure_channel(f"127.0.0.1:{platform.ports['registry']}") as channel:
            yield Apis(platform, key, registry_pb2_grpc.RegistryStub(channel))
    finally:
        platform.stop()
        platform.remove_containers()


def test_register_a_deployment_by_image_reference(apis):
    answer = apis.rest("POST", "/deployments", {"image": IMAGE, "environment_id": "staging", "min_replicas": 0,
                                                "max_replicas": 1, "reason": "from REST"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    deployment, environment, entry = body["deployment"], body["environment"], body["entry"]
    assert deployment["id"].startswith("dep_") and deployment["image"] == IMAGE and deployment["state"] == "active"
    assert (environment["name"], environment["deployment_id"], environment["sequence"]) == ("staging",
                                                                                           deployment["id"], 1)
    assert (entry["kind"], entry["sequence"], entry["deployment_id"]) == ("deploy", 1, deployment["id"])
    assert (entry["min_replicas"], entry["max_replicas"], entry["reason"]) == (0, 1, "from REST")  # 0 honoured
    assert isinstance(body["routed"], bool)
    # The same deployment over gRPC and the REST reads.
    got = apis.registry.GetDeployment(registry_pb2.GetDeploymentRequest(deployment_id=deployment["id"]),
                                      metadata=(("x-api-key", apis.key),), timeout=10)
    assert got.image == IMAGE
    assert apis.rest("GET", f"/deployments/{deployment['id']}").json()["image"] == IMAGE

    # No environment: preview, as gRPC; absent bounds: the defaults.
    plain = apis.rest("POST", "/deployments", {"image": IMAGE})
    assert plain.status_code == 200, plain.text
    assert plain.json()["environment"]["name"] == "preview"
    assert (plain.json()["entry"]["min_replicas"], plain.json()["entry"]["max_replicas"]) == (1, 3)
    # expected_sequence: compare-and-swap as in gRPC.
    again = apis.rest("POST", "/deployments", {"image": IMAGE, "environment_id": "staging", "expected_sequence": 1})
    assert again.status_code == 200 and again.json()["entry"]["sequence"] == 2, again.text


GRPC_TO_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 412,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}

# (REST body, the same request over gRPC, the field named when INVALID_ARGUMENT)
CASES = [
    ({"image": "Not An Image!"}, {"image": "Not An Image!"}, "image"),
    ({"image": IMAGE, "min_replicas": 3, "max_replicas": 2}, {"image": IMAGE, "min_replicas": 3, "max_replicas": 2},
     "min_replicas"),
    ({"image": IMAGE, "max_replicas": 0}, {"image": IMAGE, "max_replicas": 0}, "max_replicas"),
    ({"image": IMAGE, "port": 0, "health_path": "no-slash"}, {"image": IMAGE, "config": {"health_path": "no-slash"}},
     "config.health_path"),
    ({"image": IMAGE, "environment_id": "no-such-env"}, {"image": IMAGE, "environment": "no-such-env"}, ""),
    ({"image": IMAGE, "environment_id": "production"}, {"image": IMAGE, "environment": "production"}, ""),
    ({"image": IMAGE, "environment_id": "staging", "expected_sequence": 99},
     {"image": IMAGE, "environment": "staging", "expected_sequence": 99}, ""),
]


@pytest.mark.parametrize(("rest_body", "grpc_fields", "field"), CASES,
                         ids=[str(i) for i in range(len(CASES))])
def test_refusals_are_the_same_over_rest_and_grpc(apis, rest_body, grpc_fields, field):  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as refused:
        apis.grpc_deploy(**grpc_fields)
    code = refused.value.code()
    error = error_from_rpc(refused.value)
    answer = apis.rest("POST", "/deployments", rest_body)
    assert answer.status_code == GRPC_TO_HTTP[code], (code, answer.text)
    message = answer.json()["error"]["message"]
    assert message.startswith(refused.value.details()), (message, refused.value.details())  # same words (+ hint)
    if field:
        assert code == grpc.StatusCode.INVALID_ARGUMENT and error.field == field, (code, error.field)
        assert message.split()[0] == field, message


def test_rest_only_refusals_name_the_field(apis):
    """Refused by the REST layer before any call: JSON types and shape."""
    for body, field in (({}, "image"), ({"image": ""}, "image"), ({"image": IMAGE, "min_replicas": "2"}, "min_replicas"),
                        ({"image": IMAGE, "min_replicas": -1}, "min_replicas"),
                        ({"image": IMAGE, "bogus": 1}, "bogus")):
        answer = apis.rest("POST", "/deployments", body)
        assert answer.status_code == 400 and answer.json()["error"]["message"].startswith(field), (body, answer.text)
    assert apis.rest("POST", "/deployments", {"image": IMAGE}, key="").status_code == 401
    listed = apis.rest("GET", "/deployments").json()["deployments"]
    assert all(d["image"] == IMAGE for d in listed) and len(listed) == 3  # only the test above registered any


# ---------------------------------------------------------------- GET /watch (server-sent events)

MAX_EVENTS = 500  # every read below is bounded in count; the socket read timeout bounds it in time


def _events(response: requests.Response) -> Iterator[dict[str, Any]]:
    """Server-sent events of a streamed response: {"event", "id", "data"};
    heartbeat comments skipped."""
    fields: dict[str, Any] = {}
    for line in response.iter_lines(chunk_size=1, decode_unicode=True):  # as bytes arrive, not per 512
        if line is None:
            continue
        if line == "":
            if fields:
                yield {"event": fields.get("event", "message"), "id": fields.get("id"),
                       "data": json.loads(fields.get("data", "null"))}
            fields = {}
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value


def _watch(apis: Apis, *, since: str | None = None, last_event_id: str | None = None) -> requests.Response:
    headers = {"X-API-KEY": apis.key}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    params = {} if since is None else {"since_revision": since}
    return requests.get(f"{apis.platform.router}/api/v1/watch", params=params, headers=headers, stream=True,
                        timeout=(10, 40))  # reads: longer than the 15 s heartbeat


def _until(events: Iterator[dict[str, Any]], stop: Any) -> list[dict[str, Any]]:
    seen = []
    for _, event in zip(range(MAX_EVENTS), events, strict=False):
        seen.append(event)
        if stop(event):
            return seen
    raise AssertionError(f"stream ended or {MAX_EVENTS} events without the one awaited: {seen[-5:]}")


def test_watch_as_server_sent_events_resumes_with_last_event_id(apis):
    with _watch(apis) as stream:
        assert stream.status_code == 200, stream.text
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        events = _events(stream)
        snapshot = _until(events, lambda e: e["event"] == "snapshot_complete")
        marker = snapshot[-1]
        assert marker["data"]["resumed"] is False and marker["id"] == str(marker["data"]["revision"])
        assert all(e["id"] is None for e in snapshot[:-1])  # the current state carries no resumable id
        current = {e["data"]["environment"]["name"] for e in snapshot if e["event"] == "environment"}
        assert {"preview", "staging", "production"} <= current
        # A deploy over REST shows up as a move, with the revision as its id.
        deployed = apis.rest("POST", "/deployments", {"image": IMAGE, "environment_id": "staging"}).json()
        seen = _until(events, lambda e: e["event"] == "moved"
                      and e["data"]["entry"]["deployment_id"] == deployed["deployment"]["id"])
        move = seen[-1]
        assert move["data"]["entry"]["kind"] == "deploy" and move["data"]["environment"]["name"] == "staging"
        assert int(move["id"]) == move["data"]["revision"] > int(marker["id"])
        assert all(e["id"] is not None for e in seen)

    # Reconnecting from the marker's id (Last-Event-ID wins over since_revision): the changes after it
    # (the same move, same revision; ids again only from the marker on, so a reconnect mid-replay replays
    # it whole), then the marker with resumed true.
    with _watch(apis, since="0", last_event_id=marker["id"]) as again:
        assert again.status_code == 200, again.text
        replay = _until(_events(again), lambda e: e["event"] == "snapshot_complete")
        assert replay[-1]["data"]["resumed"] is True
        moves = [e for e in replay if e["event"] == "moved"]
        assert [(m["data"]["revision"], m["data"]["entry"]["deployment_id"]) for m in moves] == [
            (int(move["id"]), deployed["deployment"]["id"])]
        assert all(e["id"] is None for e in replay[:-1]) and replay[-1]["id"] is not None
        assert not [e for e in replay if e["event"] == "environment"]  # no full state when resuming


def test_watch_refusals(apis):
    for since, header, field in (("abc", None, "since_revision"), ("-1", None, "since_revision"),
                                 (None, "x1", "Last-Event-ID")):
        with _watch(apis, since=since, last_event_id=header) as refused:
            assert refused.status_code == 400 and refused.json()["error"]["message"].startswith(field), refused.text
    with _watch(apis, since=str(10**15)) as future:  # newer than the registry has issued: the registry refuses
        assert future.status_code == 400 and "since_revision" in future.json()["error"]["message"], future.text
    no_key = requests.get(f"{apis.platform.router}/api/v1/watch", timeout=10)
    assert no_key.status_code == 401
