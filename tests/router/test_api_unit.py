"""The REST API's input rules, error mapping and OpenAPI document, without
any service running (what reaches a service is tested in test_platform_api)."""
from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from services.router import api, openapi
from services.router.platform import PlatformRequest
from services.router.table import RoutingState


def test_body_validation_names_the_field() -> None:
    cases = {
        b"{": ("invalid_json", "not valid JSON"),
        b"[1]": ("invalid_argument", "must be a JSON object, not an array"),
        b'{"target_environment_id": "staging"}': ("invalid_argument", "source_deployment_id: is required"),
        b'{"source_deployment_id": 5, "target_environment_id": "s"}': ("invalid_argument",
                                                                       "source_deployment_id: must be a string"),
        b'{"source_deployment_id": "d", "target_environment_id": "s", "confirm": 1}': ("invalid_argument",
                                                                                     "confirm: must be true or false"),
        b'{"source_deployment_id": "d", "target_environment_id": "s", "min_replicas": true}': (
            "invalid_argument", "min_replicas: must be an integer"),
        b'{"source_deployment_id": "d", "target_environment_id": "s", "max_replicas": 5000}': (
            "invalid_argument", "max_replicas: must be at most 100"),
        b'{"source_deployment_id": "d", "target_environment": "s"}': ("invalid_argument",
                                                                     "target_environment: unknown field"),
        b'{"source_deployment_id": "d\\u0000", "target_environment_id": "s"}': (
            "invalid_argument", "source_deployment_id: must not contain control characters"),
        b'{"source_deployment_id": "\\ud800", "target_environment_id": "s"}': ("invalid_argument",
                                                                              "not valid Unicode"),
        b'{"source_deployment_id": "", "target_environment_id": "s"}': ("invalid_argument",
                                                                       "source_deployment_id: must not be empty"),
    }
    for raw, (code, message) in cases.items():
        with pytest.raises(api.ApiError) as caught:
            api.PROMOTE.parse(raw)
        assert caught.value.status == 400 and caught.value.code == code, raw
        assert message in caught.value.message, (raw, caught.value.message)
    parsed = api.PROMOTE.parse(b'{"source_deployment_id": "d", "target_environment_id": "staging", "confirm": true}')
    assert parsed["confirm"] is True and parsed["min_replicas"] is None and parsed["scale_previous_to_zero"] is False
    assert api.SCALE.parse(b"")["by"] == 1
    assert api.PUT_SECRET.parse(b'{"name": "A", "type": "token", "value": "multi\\nline"}')["value"] == "multi\nline"


def test_grpc_codes_map_to_http_in_one_table() -> None:
    class Fake(grpc.aio.AioRpcError):
        def __init__(self, code: grpc.StatusCode) -> None:
            super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="why")

    expected = {
        grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
        grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
        grpc.StatusCode.ABORTED: 409, grpc.StatusCode.ALREADY_EXISTS: 409,
        grpc.StatusCode.FAILED_PRECONDITION: 412, grpc.StatusCode.UNAVAILABLE: 503,
        grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.INTERNAL: 500, grpc.StatusCode.UNKNOWN: 500,
    }
    for code, status in expected.items():
        error = api.ApiError.from_rpc(Fake(code), "registry")
        response = error.response()
        assert response.status == status, code
        assert json.loads(response.body)["error"]["code"]
        assert (("Retry-After", str(api.RETRY_AFTER_S)) in response.headers) == (status == 503)


def test_openapi_matches_the_operation_table() -> None:
    doc = openapi.document()
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    implemented = {(op.method, api.PREFIX + op.path) for op in api.OPERATIONS}
    assert documented == implemented
    design = {
        ("POST", "/api/v1/deployments/promote"), ("POST", "/api/v1/deployments/rollback"),
        ("POST", "/api/v1/deployments/{id}/scale-up"), ("POST", "/api/v1/deployments/{id}/scale-down"),
        ("POST", "/api/v1/deployments/{id}/terminate"), ("POST", "/api/v1/deployments/{id}/start"),
        ("GET", "/api/v1/deployments"), ("GET", "/api/v1/deployments/{id}"),
        ("GET", "/api/v1/deployments/{id}/status"), ("GET", "/api/v1/deployments/{id}/errors"),
        ("GET", "/api/v1/environments"), ("GET", "/api/v1/environments/{id}/promotions"),
        ("GET", "/api/v1/secrets"), ("PUT", "/api/v1/secrets"), ("GET", "/api/v1/openapi.json"),
    }
    # The design's endpoints, plus what Studio needs beyond them.
    studio_extras = {("POST", "/api/v1/deployments/{id}/scale"), ("POST", "/api/v1/environments"),
                     ("GET", "/api/v1/secrets/{name}/versions"), ("POST", "/api/v1/secrets/{name}/rollback")}
    # Deleting an environment (force: one that pointed somewhere); registering a deployment by image (gRPC parity).
    extras = {("DELETE", "/api/v1/environments/{id}"), ("POST", "/api/v1/deployments"), ("GET", "/api/v1/watch")}
    # Experiment runs and promotion gates (issue 17).
    experiments = {("GET", "/api/v1/experiments/runs"), ("GET", "/api/v1/experiments/runs/{id}"),
                   ("GET", "/api/v1/gates"), ("PUT", "/api/v1/environments/{id}/gate"),
                   ("DELETE", "/api/v1/environments/{id}/gate")}
    # Replica logs (issue 16): JSON, or server-sent events with follow=true.
    logs = {("GET", "/api/v1/deployments/{id}/logs")}
    # Canaries (issue 20).
    canary = {("GET", "/api/v1/environments/{id}/canary"), ("POST", "/api/v1/environments/{id}/canary")} | {
        ("POST", f"/api/v1/environments/{{id}}/canary/{a}") for a in ("pause", "resume", "abort", "promote-now")}
    assert implemented == design | studio_extras | extras | experiments | logs | canary
    logs_doc = doc["paths"]["/api/v1/deployments/{id}/logs"]["get"]["responses"]["200"]["content"]
    assert set(logs_doc) == {"application/json", "text/event-stream"}
    delete_env = doc["paths"]["/api/v1/environments/{id}"]["delete"]
    body = delete_env["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["properties"]) == {"force", "confirm"} and body["required"] == []
    promote = doc["paths"]["/api/v1/deployments/promote"]["post"]
    schema = promote["requestBody"]["content"]["application/json"]["schema"]
    assert schema["required"] == ["source_deployment_id", "target_environment_id"]
    assert schema["additionalProperties"] is False
    statuses = {int(s) for s in promote["responses"]}
    mapped = {status for status, _ in api.HTTP_BY_GRPC.values()} | {200, 400, 401, 413, 500}
    assert mapped <= statuses
    refs: set[str] = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                refs.add(node["$ref"].removeprefix("#/components/schemas/"))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    assert refs and refs <= set(doc["components"]["schemas"])


def _request(method: str, path: str, body: bytes = b"", **headers: str) -> PlatformRequest:
    return PlatformRequest(method, path, "", headers, body)


def test_dispatch_without_services() -> None:
    rest = api.RestApi(services=None, state=RoutingState())  # type: ignore[arg-type]

    async def run() -> None:
        doc = await rest.handle(_request("GET", "/api/v1/openapi.json"))
        assert doc.status == 200 and json.loads(doc.body)["openapi"].startswith("3.")
        no_key = await rest.handle(_request("GET", "/api/v1/environments"))
        assert no_key.status == 401 and "X-API-KEY" in json.loads(no_key.body)["error"]["message"]
        wrong_method = await rest.handle(_request("DELETE", "/api/v1/environments", **{"x-api-key": "k"}))
        assert wrong_method.status == 405 and ("Allow", "GET, POST") in wrong_method.headers
        unknown = await rest.handle(_request("GET", "/api/v1/nothing", **{"x-api-key": "k"}))
        assert unknown.status == 404 and "openapi.json" in json.loads(unknown.body)["error"]["message"]
        bad_body = await rest.handle(_request("POST", "/api/v1/deployments/promote", b"{", **{"x-api-key": "k"}))
        assert bad_body.status == 400
        bad_path = await rest.handle(_request("GET", "/api/v1/deployments/%ff", **{"x-api-key": "k"}))
        assert bad_path.status == 400

    asyncio.run(run())
