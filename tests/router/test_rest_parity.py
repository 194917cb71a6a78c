"""REST parity with the gRPC API (issue 13): ``POST /api/v1/deployments``
registers a deployment by image reference as ``Registry.Deploy`` does, with
the same validation and errors — checked side by side against the same
platform over both APIs."""
from __future__ import annotations

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
