"""States and kinds: proto enums on the wire, the contract's lowercase words
in the domain, the CLI's JSON and REST (berth.enums, berth.shapes)."""
from __future__ import annotations

import pytest

from berth import enums, shapes
from berth.v1 import common_pb2, scheduler_pb2, secrets_pb2
from services.registry import domain
from services.scheduler.events import EventKind
from services.scheduler.reconciler import BindingState, ReplicaState

# Every domain enum whose words reach the public API, and the proto enum that
# carries them: a word the proto lacks would be sent as *_UNSPECIFIED.
PAIRS = [
    (domain.MoveKind, common_pb2.HistoryEntry.Kind),
    (domain.Lifecycle, common_pb2.Deployment.State),
    (domain.Lifecycle, common_pb2.Binding.State),
    (ReplicaState, scheduler_pb2.Replica.State),
    (BindingState, scheduler_pb2.BindingStatus.Status),
    (EventKind, scheduler_pb2.DeploymentError.Kind),
]


@pytest.mark.parametrize(("domain_enum", "proto_enum"), PAIRS, ids=lambda x: getattr(x, "__name__", "proto"))
def test_every_domain_word_has_a_proto_value_and_back(domain_enum, proto_enum):  # type: ignore[no-untyped-def]
    for member in domain_enum:
        number = enums.number(proto_enum, member.value)
        assert number != 0, f"{member.value!r} has no value in {proto_enum.DESCRIPTOR.full_name}"
        assert enums.label(proto_enum, number) == member.value


def test_every_public_enum_starts_with_unspecified_and_has_words():
    for proto_enum in {p for _, p in PAIRS} | {secrets_pb2.SecretInfo.Scope}:
        zero = proto_enum.DESCRIPTOR.values_by_number[0].name
        assert zero.endswith("_UNSPECIFIED"), zero
        assert enums.label(proto_enum, 0) == "unspecified"
        assert all(w and w == w.lower() for w in enums.words(proto_enum))
    assert "node_down" in enums.words(scheduler_pb2.DeploymentError.Kind)
    assert enums.words(common_pb2.HistoryEntry.Kind) == ["deploy", "promote", "rollback", "canary"]


def test_unknown_values_from_a_newer_server_read_unknown():
    """Proto3 enums are open: a number these stubs do not know survives
    parsing and reads "unknown" in every JSON shape instead of raising."""
    wire = common_pb2.HistoryEntry(sequence=3, kind=42).SerializeToString()  # a newer server's kind
    entry = common_pb2.HistoryEntry.FromString(wire)
    assert entry.kind == 42
    assert shapes.entry_json(entry)["kind"] == "unknown"
    status = scheduler_pb2.DeploymentStatus.FromString(scheduler_pb2.DeploymentStatus(
        deployment=common_pb2.Deployment(id="dep_0123456789ab", state=7),
        bindings=[scheduler_pb2.BindingStatus(status=99, replicas=[scheduler_pb2.Replica(state=77)])],
    ).SerializeToString())
    data = shapes.status_json(status)
    assert (data["state"], data["bindings"][0]["status"], data["bindings"][0]["replicas"][0]["state"]) == (
        "unknown", "unknown", "unknown")
    error = scheduler_pb2.DeploymentError.FromString(scheduler_pb2.DeploymentError(kind=1000).SerializeToString())
    assert shapes.error_json(error)["kind"] == "unknown"
    secret = secrets_pb2.SecretInfo.FromString(secrets_pb2.SecretInfo(name="A", scope=9).SerializeToString())
    assert shapes.secret_json(secret)["scope"] == "unknown"


def test_json_shapes_keep_the_contract_words():
    entry = common_pb2.HistoryEntry(kind=common_pb2.HistoryEntry.KIND_PROMOTE)
    assert shapes.entry_json(entry)["kind"] == "promote"
    assert shapes.binding_json(common_pb2.Binding(state=common_pb2.Binding.STATE_TERMINATED))["state"] == "terminated"
    error = scheduler_pb2.DeploymentError(kind=scheduler_pb2.DeploymentError.KIND_HEALTH_CHECK_FAILED)
    assert shapes.error_json(error)["kind"] == "health_check_failed"
    status = scheduler_pb2.BindingStatus(status=scheduler_pb2.BindingStatus.STATUS_SCALED_TO_ZERO)
    assert shapes.binding_status(status) == "scaled_to_zero"
    staging = secrets_pb2.SecretInfo(scope=secrets_pb2.SecretInfo.SCOPE_ENVIRONMENT, environment_id="env_1",
                                     environment="staging")
    assert shapes.secret_json(staging)["scope"] == "environment:staging"
    assert shapes.secret_json(secrets_pb2.SecretInfo(scope=secrets_pb2.SecretInfo.SCOPE_PROJECT))["scope"] == "project"
    assert enums.number(common_pb2.HistoryEntry.Kind, "no-such-word") == 0
