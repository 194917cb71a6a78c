import datetime

from berth.v1 import common_pb2 as _common_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CreateProjectRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class CreateProjectResponse(_message.Message):
    __slots__ = ("project", "api_key")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    project: _common_pb2.Project
    api_key: str
    def __init__(self, project: _Optional[_Union[_common_pb2.Project, _Mapping]] = ..., api_key: _Optional[str] = ...) -> None: ...

class GetProjectRequest(_message.Message):
    __slots__ = ("project",)
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    project: str
    def __init__(self, project: _Optional[str] = ...) -> None: ...

class ListEnvironmentsRequest(_message.Message):
    __slots__ = ("project", "page_size", "page_token")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    project: str
    page_size: int
    page_token: str
    def __init__(self, project: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListEnvironmentsResponse(_message.Message):
    __slots__ = ("environments", "next_page_token")
    ENVIRONMENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    environments: _containers.RepeatedCompositeFieldContainer[_common_pb2.Environment]
    next_page_token: str
    def __init__(self, environments: _Optional[_Iterable[_Union[_common_pb2.Environment, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CreateEnvironmentRequest(_message.Message):
    __slots__ = ("project", "name")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    project: str
    name: str
    def __init__(self, project: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class DeleteEnvironmentRequest(_message.Message):
    __slots__ = ("project", "environment", "force", "confirm")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    CONFIRM_FIELD_NUMBER: _ClassVar[int]
    project: str
    environment: str
    force: bool
    confirm: bool
    def __init__(self, project: _Optional[str] = ..., environment: _Optional[str] = ..., force: _Optional[bool] = ..., confirm: _Optional[bool] = ...) -> None: ...

class DeleteEnvironmentResponse(_message.Message):
    __slots__ = ("environment",)
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    environment: _common_pb2.Environment
    def __init__(self, environment: _Optional[_Union[_common_pb2.Environment, _Mapping]] = ...) -> None: ...

class CreateApiKeyRequest(_message.Message):
    __slots__ = ("project", "name")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    project: str
    name: str
    def __init__(self, project: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class CreateApiKeyResponse(_message.Message):
    __slots__ = ("key", "api_key")
    KEY_FIELD_NUMBER: _ClassVar[int]
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    key: _common_pb2.ApiKeyInfo
    api_key: str
    def __init__(self, key: _Optional[_Union[_common_pb2.ApiKeyInfo, _Mapping]] = ..., api_key: _Optional[str] = ...) -> None: ...

class ListApiKeysRequest(_message.Message):
    __slots__ = ("project", "page_size", "page_token")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    project: str
    page_size: int
    page_token: str
    def __init__(self, project: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListApiKeysResponse(_message.Message):
    __slots__ = ("keys", "next_page_token")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[_common_pb2.ApiKeyInfo]
    next_page_token: str
    def __init__(self, keys: _Optional[_Iterable[_Union[_common_pb2.ApiKeyInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class RevokeApiKeyRequest(_message.Message):
    __slots__ = ("project", "key")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    project: str
    key: str
    def __init__(self, project: _Optional[str] = ..., key: _Optional[str] = ...) -> None: ...

class DeployRequest(_message.Message):
    __slots__ = ("project", "image", "image_id", "config", "environment", "min_replicas", "max_replicas", "expected_sequence", "confirm", "reason", "idle_pause_seconds", "idle_stop_seconds")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    MIN_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    CONFIRM_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    IDLE_PAUSE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    IDLE_STOP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    project: str
    image: str
    image_id: str
    config: _common_pb2.WorkerConfig
    environment: str
    min_replicas: int
    max_replicas: int
    expected_sequence: int
    confirm: bool
    reason: str
    idle_pause_seconds: int
    idle_stop_seconds: int
    def __init__(self, project: _Optional[str] = ..., image: _Optional[str] = ..., image_id: _Optional[str] = ..., config: _Optional[_Union[_common_pb2.WorkerConfig, _Mapping]] = ..., environment: _Optional[str] = ..., min_replicas: _Optional[int] = ..., max_replicas: _Optional[int] = ..., expected_sequence: _Optional[int] = ..., confirm: _Optional[bool] = ..., reason: _Optional[str] = ..., idle_pause_seconds: _Optional[int] = ..., idle_stop_seconds: _Optional[int] = ...) -> None: ...

class DeployResponse(_message.Message):
    __slots__ = ("deployment", "environment", "entry")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    deployment: _common_pb2.Deployment
    environment: _common_pb2.Environment
    entry: _common_pb2.HistoryEntry
    def __init__(self, deployment: _Optional[_Union[_common_pb2.Deployment, _Mapping]] = ..., environment: _Optional[_Union[_common_pb2.Environment, _Mapping]] = ..., entry: _Optional[_Union[_common_pb2.HistoryEntry, _Mapping]] = ...) -> None: ...

class GetDeploymentRequest(_message.Message):
    __slots__ = ("project", "deployment_id")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    project: str
    deployment_id: str
    def __init__(self, project: _Optional[str] = ..., deployment_id: _Optional[str] = ...) -> None: ...

class ListDeploymentsRequest(_message.Message):
    __slots__ = ("project", "environment", "page_size", "page_token")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    project: str
    environment: str
    page_size: int
    page_token: str
    def __init__(self, project: _Optional[str] = ..., environment: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListDeploymentsResponse(_message.Message):
    __slots__ = ("deployments", "next_page_token")
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    deployments: _containers.RepeatedCompositeFieldContainer[_common_pb2.Deployment]
    next_page_token: str
    def __init__(self, deployments: _Optional[_Iterable[_Union[_common_pb2.Deployment, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class PromoteRequest(_message.Message):
    __slots__ = ("project", "deployment_id", "target_environment", "min_replicas", "max_replicas", "scale_previous_to_zero", "expected_sequence", "confirm", "reason", "skip_gate", "idle_pause_seconds", "idle_stop_seconds")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    MIN_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    SCALE_PREVIOUS_TO_ZERO_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    CONFIRM_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SKIP_GATE_FIELD_NUMBER: _ClassVar[int]
    IDLE_PAUSE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    IDLE_STOP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    project: str
    deployment_id: str
    target_environment: str
    min_replicas: int
    max_replicas: int
    scale_previous_to_zero: bool
    expected_sequence: int
    confirm: bool
    reason: str
    skip_gate: bool
    idle_pause_seconds: int
    idle_stop_seconds: int
    def __init__(self, project: _Optional[str] = ..., deployment_id: _Optional[str] = ..., target_environment: _Optional[str] = ..., min_replicas: _Optional[int] = ..., max_replicas: _Optional[int] = ..., scale_previous_to_zero: _Optional[bool] = ..., expected_sequence: _Optional[int] = ..., confirm: _Optional[bool] = ..., reason: _Optional[str] = ..., skip_gate: _Optional[bool] = ..., idle_pause_seconds: _Optional[int] = ..., idle_stop_seconds: _Optional[int] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("project", "environment", "to_deployment_id", "expected_sequence", "confirm", "reason")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    TO_DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    CONFIRM_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    project: str
    environment: str
    to_deployment_id: str
    expected_sequence: int
    confirm: bool
    reason: str
    def __init__(self, project: _Optional[str] = ..., environment: _Optional[str] = ..., to_deployment_id: _Optional[str] = ..., expected_sequence: _Optional[int] = ..., confirm: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class PointerMoveResponse(_message.Message):
    __slots__ = ("environment", "entry")
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    environment: _common_pb2.Environment
    entry: _common_pb2.HistoryEntry
    def __init__(self, environment: _Optional[_Union[_common_pb2.Environment, _Mapping]] = ..., entry: _Optional[_Union[_common_pb2.HistoryEntry, _Mapping]] = ...) -> None: ...

class ListHistoryRequest(_message.Message):
    __slots__ = ("project", "environment", "page_size", "page_token")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    project: str
    environment: str
    page_size: int
    page_token: str
    def __init__(self, project: _Optional[str] = ..., environment: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListHistoryResponse(_message.Message):
    __slots__ = ("entries", "next_page_token")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[_common_pb2.HistoryEntry]
    next_page_token: str
    def __init__(self, entries: _Optional[_Iterable[_Union[_common_pb2.HistoryEntry, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ListBindingsRequest(_message.Message):
    __slots__ = ("project", "deployment_id", "environment", "page_size", "page_token")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    project: str
    deployment_id: str
    environment: str
    page_size: int
    page_token: str
    def __init__(self, project: _Optional[str] = ..., deployment_id: _Optional[str] = ..., environment: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListBindingsResponse(_message.Message):
    __slots__ = ("bindings", "next_page_token")
    BINDINGS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    bindings: _containers.RepeatedCompositeFieldContainer[_common_pb2.Binding]
    next_page_token: str
    def __init__(self, bindings: _Optional[_Iterable[_Union[_common_pb2.Binding, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ScaleBindingRequest(_message.Message):
    __slots__ = ("project", "deployment_id", "environment", "min_replicas", "max_replicas", "idle_pause_seconds", "idle_stop_seconds")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    MIN_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    IDLE_PAUSE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    IDLE_STOP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    project: str
    deployment_id: str
    environment: str
    min_replicas: int
    max_replicas: int
    idle_pause_seconds: int
    idle_stop_seconds: int
    def __init__(self, project: _Optional[str] = ..., deployment_id: _Optional[str] = ..., environment: _Optional[str] = ..., min_replicas: _Optional[int] = ..., max_replicas: _Optional[int] = ..., idle_pause_seconds: _Optional[int] = ..., idle_stop_seconds: _Optional[int] = ...) -> None: ...

class AdjustReplicasRequest(_message.Message):
    __slots__ = ("project", "deployment_id", "environment", "delta")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    project: str
    deployment_id: str
    environment: str
    delta: int
    def __init__(self, project: _Optional[str] = ..., deployment_id: _Optional[str] = ..., environment: _Optional[str] = ..., delta: _Optional[int] = ...) -> None: ...

class TerminateDeploymentRequest(_message.Message):
    __slots__ = ("project", "deployment_id")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    project: str
    deployment_id: str
    def __init__(self, project: _Optional[str] = ..., deployment_id: _Optional[str] = ...) -> None: ...

class StartDeploymentRequest(_message.Message):
    __slots__ = ("project", "deployment_id")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    project: str
    deployment_id: str
    def __init__(self, project: _Optional[str] = ..., deployment_id: _Optional[str] = ...) -> None: ...

class WatchEnvironmentsRequest(_message.Message):
    __slots__ = ("project", "since_revision")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    SINCE_REVISION_FIELD_NUMBER: _ClassVar[int]
    project: str
    since_revision: int
    def __init__(self, project: _Optional[str] = ..., since_revision: _Optional[int] = ...) -> None: ...

class EnvironmentEvent(_message.Message):
    __slots__ = ("revision", "environment", "moved", "created", "deleted", "binding", "snapshot_complete", "resumed")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    MOVED_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    BINDING_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_COMPLETE_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    revision: int
    environment: _common_pb2.Environment
    moved: PointerMove
    created: _common_pb2.Environment
    deleted: _common_pb2.Environment
    binding: _common_pb2.Binding
    snapshot_complete: bool
    resumed: bool
    def __init__(self, revision: _Optional[int] = ..., environment: _Optional[_Union[_common_pb2.Environment, _Mapping]] = ..., moved: _Optional[_Union[PointerMove, _Mapping]] = ..., created: _Optional[_Union[_common_pb2.Environment, _Mapping]] = ..., deleted: _Optional[_Union[_common_pb2.Environment, _Mapping]] = ..., binding: _Optional[_Union[_common_pb2.Binding, _Mapping]] = ..., snapshot_complete: _Optional[bool] = ..., resumed: _Optional[bool] = ...) -> None: ...

class PointerMove(_message.Message):
    __slots__ = ("environment", "entry")
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    environment: _common_pb2.Environment
    entry: _common_pb2.HistoryEntry
    def __init__(self, environment: _Optional[_Union[_common_pb2.Environment, _Mapping]] = ..., entry: _Optional[_Union[_common_pb2.HistoryEntry, _Mapping]] = ...) -> None: ...

class ExperimentCaseResult(_message.Message):
    __slots__ = ("name", "passed", "status", "latency_ms", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    passed: bool
    status: int
    latency_ms: float
    reason: str
    def __init__(self, name: _Optional[str] = ..., passed: _Optional[bool] = ..., status: _Optional[int] = ..., latency_ms: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class ExperimentRun(_message.Message):
    __slots__ = ("id", "project_id", "name", "deployment_id", "dataset_digest", "total", "passed", "pass_rate", "latency_p50_ms", "latency_p99_ms", "cases", "actor", "created_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    DATASET_DIGEST_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    PASS_RATE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P50_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P99_MS_FIELD_NUMBER: _ClassVar[int]
    CASES_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    project_id: str
    name: str
    deployment_id: str
    dataset_digest: str
    total: int
    passed: int
    pass_rate: float
    latency_p50_ms: float
    latency_p99_ms: float
    cases: _containers.RepeatedCompositeFieldContainer[ExperimentCaseResult]
    actor: str
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., project_id: _Optional[str] = ..., name: _Optional[str] = ..., deployment_id: _Optional[str] = ..., dataset_digest: _Optional[str] = ..., total: _Optional[int] = ..., passed: _Optional[int] = ..., pass_rate: _Optional[float] = ..., latency_p50_ms: _Optional[float] = ..., latency_p99_ms: _Optional[float] = ..., cases: _Optional[_Iterable[_Union[ExperimentCaseResult, _Mapping]]] = ..., actor: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RecordExperimentRunRequest(_message.Message):
    __slots__ = ("project", "name", "deployment_id", "dataset_digest", "cases")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    DATASET_DIGEST_FIELD_NUMBER: _ClassVar[int]
    CASES_FIELD_NUMBER: _ClassVar[int]
    project: str
    name: str
    deployment_id: str
    dataset_digest: str
    cases: _containers.RepeatedCompositeFieldContainer[ExperimentCaseResult]
    def __init__(self, project: _Optional[str] = ..., name: _Optional[str] = ..., deployment_id: _Optional[str] = ..., dataset_digest: _Optional[str] = ..., cases: _Optional[_Iterable[_Union[ExperimentCaseResult, _Mapping]]] = ...) -> None: ...

class ListExperimentRunsRequest(_message.Message):
    __slots__ = ("project", "deployment_id", "name", "page_size", "page_token")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    project: str
    deployment_id: str
    name: str
    page_size: int
    page_token: str
    def __init__(self, project: _Optional[str] = ..., deployment_id: _Optional[str] = ..., name: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListExperimentRunsResponse(_message.Message):
    __slots__ = ("runs", "next_page_token")
    RUNS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[ExperimentRun]
    next_page_token: str
    def __init__(self, runs: _Optional[_Iterable[_Union[ExperimentRun, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetExperimentRunRequest(_message.Message):
    __slots__ = ("project", "run_id")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    project: str
    run_id: str
    def __init__(self, project: _Optional[str] = ..., run_id: _Optional[str] = ...) -> None: ...

class EnvironmentGate(_message.Message):
    __slots__ = ("environment_id", "environment_name", "experiment", "threshold", "dataset_digest", "actor", "updated_at")
    ENVIRONMENT_ID_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_NAME_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    DATASET_DIGEST_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    environment_id: str
    environment_name: str
    experiment: str
    threshold: float
    dataset_digest: str
    actor: str
    updated_at: _timestamp_pb2.Timestamp
    def __init__(self, environment_id: _Optional[str] = ..., environment_name: _Optional[str] = ..., experiment: _Optional[str] = ..., threshold: _Optional[float] = ..., dataset_digest: _Optional[str] = ..., actor: _Optional[str] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class SetEnvironmentGateRequest(_message.Message):
    __slots__ = ("project", "environment", "experiment", "threshold", "dataset_digest")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    DATASET_DIGEST_FIELD_NUMBER: _ClassVar[int]
    project: str
    environment: str
    experiment: str
    threshold: float
    dataset_digest: str
    def __init__(self, project: _Optional[str] = ..., environment: _Optional[str] = ..., experiment: _Optional[str] = ..., threshold: _Optional[float] = ..., dataset_digest: _Optional[str] = ...) -> None: ...

class ClearEnvironmentGateRequest(_message.Message):
    __slots__ = ("project", "environment")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    project: str
    environment: str
    def __init__(self, project: _Optional[str] = ..., environment: _Optional[str] = ...) -> None: ...

class ClearEnvironmentGateResponse(_message.Message):
    __slots__ = ("cleared",)
    CLEARED_FIELD_NUMBER: _ClassVar[int]
    cleared: bool
    def __init__(self, cleared: _Optional[bool] = ...) -> None: ...

class ListEnvironmentGatesRequest(_message.Message):
    __slots__ = ("project",)
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    project: str
    def __init__(self, project: _Optional[str] = ...) -> None: ...

class ListEnvironmentGatesResponse(_message.Message):
    __slots__ = ("gates",)
    GATES_FIELD_NUMBER: _ClassVar[int]
    gates: _containers.RepeatedCompositeFieldContainer[EnvironmentGate]
    def __init__(self, gates: _Optional[_Iterable[_Union[EnvironmentGate, _Mapping]]] = ...) -> None: ...

class StartCanaryRequest(_message.Message):
    __slots__ = ("project", "deployment_id", "environment", "steps", "thresholds", "min_replicas", "max_replicas", "expected_sequence", "confirm", "reason", "skip_gate")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    MIN_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    CONFIRM_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SKIP_GATE_FIELD_NUMBER: _ClassVar[int]
    project: str
    deployment_id: str
    environment: str
    steps: _containers.RepeatedCompositeFieldContainer[_common_pb2.Canary.Step]
    thresholds: _common_pb2.Canary.Thresholds
    min_replicas: int
    max_replicas: int
    expected_sequence: int
    confirm: bool
    reason: str
    skip_gate: bool
    def __init__(self, project: _Optional[str] = ..., deployment_id: _Optional[str] = ..., environment: _Optional[str] = ..., steps: _Optional[_Iterable[_Union[_common_pb2.Canary.Step, _Mapping]]] = ..., thresholds: _Optional[_Union[_common_pb2.Canary.Thresholds, _Mapping]] = ..., min_replicas: _Optional[int] = ..., max_replicas: _Optional[int] = ..., expected_sequence: _Optional[int] = ..., confirm: _Optional[bool] = ..., reason: _Optional[str] = ..., skip_gate: _Optional[bool] = ...) -> None: ...

class GetCanaryRequest(_message.Message):
    __slots__ = ("project", "environment")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    project: str
    environment: str
    def __init__(self, project: _Optional[str] = ..., environment: _Optional[str] = ...) -> None: ...

class PauseCanaryRequest(_message.Message):
    __slots__ = ("project", "environment", "expected_sequence", "reason")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    project: str
    environment: str
    expected_sequence: int
    reason: str
    def __init__(self, project: _Optional[str] = ..., environment: _Optional[str] = ..., expected_sequence: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class ResumeCanaryRequest(_message.Message):
    __slots__ = ("project", "environment", "expected_sequence", "reason")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    project: str
    environment: str
    expected_sequence: int
    reason: str
    def __init__(self, project: _Optional[str] = ..., environment: _Optional[str] = ..., expected_sequence: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class AbortCanaryRequest(_message.Message):
    __slots__ = ("project", "environment", "expected_sequence", "reason")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    project: str
    environment: str
    expected_sequence: int
    reason: str
    def __init__(self, project: _Optional[str] = ..., environment: _Optional[str] = ..., expected_sequence: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class PromoteCanaryNowRequest(_message.Message):
    __slots__ = ("project", "environment", "expected_sequence", "reason", "confirm")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CONFIRM_FIELD_NUMBER: _ClassVar[int]
    project: str
    environment: str
    expected_sequence: int
    reason: str
    confirm: bool
    def __init__(self, project: _Optional[str] = ..., environment: _Optional[str] = ..., expected_sequence: _Optional[int] = ..., reason: _Optional[str] = ..., confirm: _Optional[bool] = ...) -> None: ...

class CanaryResponse(_message.Message):
    __slots__ = ("environment", "entry")
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    environment: _common_pb2.Environment
    entry: _common_pb2.HistoryEntry
    def __init__(self, environment: _Optional[_Union[_common_pb2.Environment, _Mapping]] = ..., entry: _Optional[_Union[_common_pb2.HistoryEntry, _Mapping]] = ...) -> None: ...
