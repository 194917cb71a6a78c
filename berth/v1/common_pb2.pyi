import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Project(_message.Message):
    __slots__ = ("id", "name", "created_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Resources(_message.Message):
    __slots__ = ("memory_bytes", "cpus")
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    memory_bytes: int
    cpus: float
    def __init__(self, memory_bytes: _Optional[int] = ..., cpus: _Optional[float] = ...) -> None: ...

class WorkerConfig(_message.Message):
    __slots__ = ("port", "command", "health_path", "variables", "resources")
    class VariablesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PORT_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    HEALTH_PATH_FIELD_NUMBER: _ClassVar[int]
    VARIABLES_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    port: int
    command: _containers.RepeatedScalarFieldContainer[str]
    health_path: str
    variables: _containers.ScalarMap[str, str]
    resources: Resources
    def __init__(self, port: _Optional[int] = ..., command: _Optional[_Iterable[str]] = ..., health_path: _Optional[str] = ..., variables: _Optional[_Mapping[str, str]] = ..., resources: _Optional[_Union[Resources, _Mapping]] = ...) -> None: ...

class Deployment(_message.Message):
    __slots__ = ("id", "project_id", "image", "image_id", "config", "state", "created_at", "created_by")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Deployment.State]
        STATE_ACTIVE: _ClassVar[Deployment.State]
        STATE_TERMINATED: _ClassVar[Deployment.State]
    STATE_UNSPECIFIED: Deployment.State
    STATE_ACTIVE: Deployment.State
    STATE_TERMINATED: Deployment.State
    ID_FIELD_NUMBER: _ClassVar[int]
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    id: str
    project_id: str
    image: str
    image_id: str
    config: WorkerConfig
    state: Deployment.State
    created_at: _timestamp_pb2.Timestamp
    created_by: str
    def __init__(self, id: _Optional[str] = ..., project_id: _Optional[str] = ..., image: _Optional[str] = ..., image_id: _Optional[str] = ..., config: _Optional[_Union[WorkerConfig, _Mapping]] = ..., state: _Optional[_Union[Deployment.State, str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., created_by: _Optional[str] = ...) -> None: ...

class Environment(_message.Message):
    __slots__ = ("id", "project_id", "project_name", "name", "deployment_id", "sequence", "protected", "created_at", "previous_deployment_id", "canary")
    ID_FIELD_NUMBER: _ClassVar[int]
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    PROJECT_NAME_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    PROTECTED_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    CANARY_FIELD_NUMBER: _ClassVar[int]
    id: str
    project_id: str
    project_name: str
    name: str
    deployment_id: str
    sequence: int
    protected: bool
    created_at: _timestamp_pb2.Timestamp
    previous_deployment_id: str
    canary: Canary
    def __init__(self, id: _Optional[str] = ..., project_id: _Optional[str] = ..., project_name: _Optional[str] = ..., name: _Optional[str] = ..., deployment_id: _Optional[str] = ..., sequence: _Optional[int] = ..., protected: _Optional[bool] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., previous_deployment_id: _Optional[str] = ..., canary: _Optional[_Union[Canary, _Mapping]] = ...) -> None: ...

class Binding(_message.Message):
    __slots__ = ("project_id", "project_name", "environment_id", "environment_name", "deployment", "min_replicas", "max_replicas", "state", "serving", "updated_at", "idle_pause_seconds", "idle_stop_seconds")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Binding.State]
        STATE_ACTIVE: _ClassVar[Binding.State]
        STATE_TERMINATED: _ClassVar[Binding.State]
    STATE_UNSPECIFIED: Binding.State
    STATE_ACTIVE: Binding.State
    STATE_TERMINATED: Binding.State
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    PROJECT_NAME_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_ID_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_NAME_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    MIN_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    IDLE_PAUSE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    IDLE_STOP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    project_id: str
    project_name: str
    environment_id: str
    environment_name: str
    deployment: Deployment
    min_replicas: int
    max_replicas: int
    state: Binding.State
    serving: bool
    updated_at: _timestamp_pb2.Timestamp
    idle_pause_seconds: int
    idle_stop_seconds: int
    def __init__(self, project_id: _Optional[str] = ..., project_name: _Optional[str] = ..., environment_id: _Optional[str] = ..., environment_name: _Optional[str] = ..., deployment: _Optional[_Union[Deployment, _Mapping]] = ..., min_replicas: _Optional[int] = ..., max_replicas: _Optional[int] = ..., state: _Optional[_Union[Binding.State, str]] = ..., serving: _Optional[bool] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., idle_pause_seconds: _Optional[int] = ..., idle_stop_seconds: _Optional[int] = ...) -> None: ...

class HistoryEntry(_message.Message):
    __slots__ = ("environment_id", "sequence", "kind", "deployment_id", "previous_deployment_id", "min_replicas", "max_replicas", "actor", "created_at", "reason")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[HistoryEntry.Kind]
        KIND_DEPLOY: _ClassVar[HistoryEntry.Kind]
        KIND_PROMOTE: _ClassVar[HistoryEntry.Kind]
        KIND_ROLLBACK: _ClassVar[HistoryEntry.Kind]
        KIND_CANARY: _ClassVar[HistoryEntry.Kind]
    KIND_UNSPECIFIED: HistoryEntry.Kind
    KIND_DEPLOY: HistoryEntry.Kind
    KIND_PROMOTE: HistoryEntry.Kind
    KIND_ROLLBACK: HistoryEntry.Kind
    KIND_CANARY: HistoryEntry.Kind
    ENVIRONMENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    MIN_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    environment_id: str
    sequence: int
    kind: HistoryEntry.Kind
    deployment_id: str
    previous_deployment_id: str
    min_replicas: int
    max_replicas: int
    actor: str
    created_at: _timestamp_pb2.Timestamp
    reason: str
    def __init__(self, environment_id: _Optional[str] = ..., sequence: _Optional[int] = ..., kind: _Optional[_Union[HistoryEntry.Kind, str]] = ..., deployment_id: _Optional[str] = ..., previous_deployment_id: _Optional[str] = ..., min_replicas: _Optional[int] = ..., max_replicas: _Optional[int] = ..., actor: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class ApiKeyInfo(_message.Message):
    __slots__ = ("id", "project_id", "name", "prefix", "created_at", "revoked_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    project_id: str
    name: str
    prefix: str
    created_at: _timestamp_pb2.Timestamp
    revoked_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., project_id: _Optional[str] = ..., name: _Optional[str] = ..., prefix: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revoked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Canary(_message.Message):
    __slots__ = ("stable_deployment_id", "candidate_deployment_id", "candidate_weight", "steps", "step", "step_started_at", "state", "thresholds", "last_analysis", "last_analysis_at", "reason", "actor")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Canary.State]
        STATE_RUNNING: _ClassVar[Canary.State]
        STATE_PAUSED: _ClassVar[Canary.State]
        STATE_ABORTED: _ClassVar[Canary.State]
        STATE_PROMOTED: _ClassVar[Canary.State]
    STATE_UNSPECIFIED: Canary.State
    STATE_RUNNING: Canary.State
    STATE_PAUSED: Canary.State
    STATE_ABORTED: Canary.State
    STATE_PROMOTED: Canary.State
    class Step(_message.Message):
        __slots__ = ("weight", "bake_seconds")
        WEIGHT_FIELD_NUMBER: _ClassVar[int]
        BAKE_SECONDS_FIELD_NUMBER: _ClassVar[int]
        weight: int
        bake_seconds: int
        def __init__(self, weight: _Optional[int] = ..., bake_seconds: _Optional[int] = ...) -> None: ...
    class Thresholds(_message.Message):
        __slots__ = ("max_error_rate_increase", "max_latency_ratio", "min_requests")
        MAX_ERROR_RATE_INCREASE_FIELD_NUMBER: _ClassVar[int]
        MAX_LATENCY_RATIO_FIELD_NUMBER: _ClassVar[int]
        MIN_REQUESTS_FIELD_NUMBER: _ClassVar[int]
        max_error_rate_increase: float
        max_latency_ratio: float
        min_requests: int
        def __init__(self, max_error_rate_increase: _Optional[float] = ..., max_latency_ratio: _Optional[float] = ..., min_requests: _Optional[int] = ...) -> None: ...
    STABLE_DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STEP_STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    LAST_ANALYSIS_FIELD_NUMBER: _ClassVar[int]
    LAST_ANALYSIS_AT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    stable_deployment_id: str
    candidate_deployment_id: str
    candidate_weight: int
    steps: _containers.RepeatedCompositeFieldContainer[Canary.Step]
    step: int
    step_started_at: _timestamp_pb2.Timestamp
    state: Canary.State
    thresholds: Canary.Thresholds
    last_analysis: str
    last_analysis_at: _timestamp_pb2.Timestamp
    reason: str
    actor: str
    def __init__(self, stable_deployment_id: _Optional[str] = ..., candidate_deployment_id: _Optional[str] = ..., candidate_weight: _Optional[int] = ..., steps: _Optional[_Iterable[_Union[Canary.Step, _Mapping]]] = ..., step: _Optional[int] = ..., step_started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state: _Optional[_Union[Canary.State, str]] = ..., thresholds: _Optional[_Union[Canary.Thresholds, _Mapping]] = ..., last_analysis: _Optional[str] = ..., last_analysis_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reason: _Optional[str] = ..., actor: _Optional[str] = ...) -> None: ...
