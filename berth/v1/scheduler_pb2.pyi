import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from berth.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetDeploymentStatusRequest(_message.Message):
    __slots__ = ("project", "deployment_id", "environment", "latest")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    LATEST_FIELD_NUMBER: _ClassVar[int]
    project: str
    deployment_id: str
    environment: str
    latest: bool
    def __init__(self, project: _Optional[str] = ..., deployment_id: _Optional[str] = ..., environment: _Optional[str] = ..., latest: _Optional[bool] = ...) -> None: ...

class Replica(_message.Message):
    __slots__ = ("id", "name", "index", "state", "started_at", "restarts", "address", "node")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Replica.State]
        STATE_PENDING: _ClassVar[Replica.State]
        STATE_STARTING: _ClassVar[Replica.State]
        STATE_READY: _ClassVar[Replica.State]
        STATE_UNHEALTHY: _ClassVar[Replica.State]
        STATE_EXITED: _ClassVar[Replica.State]
        STATE_FAILED: _ClassVar[Replica.State]
        STATE_STOPPING: _ClassVar[Replica.State]
        STATE_PAUSED: _ClassVar[Replica.State]
    STATE_UNSPECIFIED: Replica.State
    STATE_PENDING: Replica.State
    STATE_STARTING: Replica.State
    STATE_READY: Replica.State
    STATE_UNHEALTHY: Replica.State
    STATE_EXITED: Replica.State
    STATE_FAILED: Replica.State
    STATE_STOPPING: Replica.State
    STATE_PAUSED: Replica.State
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    index: int
    state: Replica.State
    started_at: _timestamp_pb2.Timestamp
    restarts: int
    address: str
    node: str
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., index: _Optional[int] = ..., state: _Optional[_Union[Replica.State, str]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., restarts: _Optional[int] = ..., address: _Optional[str] = ..., node: _Optional[str] = ...) -> None: ...

class BindingStatus(_message.Message):
    __slots__ = ("environment_id", "environment", "status", "min_replicas", "max_replicas", "serving", "replicas", "desired_replicas", "requests")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[BindingStatus.Status]
        STATUS_DEPLOYING: _ClassVar[BindingStatus.Status]
        STATUS_RUNNING: _ClassVar[BindingStatus.Status]
        STATUS_DEGRADED: _ClassVar[BindingStatus.Status]
        STATUS_FAILED: _ClassVar[BindingStatus.Status]
        STATUS_SCALED_TO_ZERO: _ClassVar[BindingStatus.Status]
        STATUS_TERMINATED: _ClassVar[BindingStatus.Status]
    STATUS_UNSPECIFIED: BindingStatus.Status
    STATUS_DEPLOYING: BindingStatus.Status
    STATUS_RUNNING: BindingStatus.Status
    STATUS_DEGRADED: BindingStatus.Status
    STATUS_FAILED: BindingStatus.Status
    STATUS_SCALED_TO_ZERO: BindingStatus.Status
    STATUS_TERMINATED: BindingStatus.Status
    ENVIRONMENT_ID_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MIN_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    DESIRED_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    environment_id: str
    environment: str
    status: BindingStatus.Status
    min_replicas: int
    max_replicas: int
    serving: bool
    replicas: _containers.RepeatedCompositeFieldContainer[Replica]
    desired_replicas: int
    requests: RequestMetrics
    def __init__(self, environment_id: _Optional[str] = ..., environment: _Optional[str] = ..., status: _Optional[_Union[BindingStatus.Status, str]] = ..., min_replicas: _Optional[int] = ..., max_replicas: _Optional[int] = ..., serving: _Optional[bool] = ..., replicas: _Optional[_Iterable[_Union[Replica, _Mapping]]] = ..., desired_replicas: _Optional[int] = ..., requests: _Optional[_Union[RequestMetrics, _Mapping]] = ...) -> None: ...

class DeploymentStatus(_message.Message):
    __slots__ = ("deployment", "bindings", "scheduler_leader")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    BINDINGS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_LEADER_FIELD_NUMBER: _ClassVar[int]
    deployment: _common_pb2.Deployment
    bindings: _containers.RepeatedCompositeFieldContainer[BindingStatus]
    scheduler_leader: SchedulerLeader
    def __init__(self, deployment: _Optional[_Union[_common_pb2.Deployment, _Mapping]] = ..., bindings: _Optional[_Iterable[_Union[BindingStatus, _Mapping]]] = ..., scheduler_leader: _Optional[_Union[SchedulerLeader, _Mapping]] = ...) -> None: ...

class ListDeploymentErrorsRequest(_message.Message):
    __slots__ = ("project", "deployment_id", "page_size", "page_token", "latest")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    LATEST_FIELD_NUMBER: _ClassVar[int]
    project: str
    deployment_id: str
    page_size: int
    page_token: str
    latest: bool
    def __init__(self, project: _Optional[str] = ..., deployment_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., latest: _Optional[bool] = ...) -> None: ...

class DeploymentError(_message.Message):
    __slots__ = ("kind", "message", "deployment_id", "environment_id", "environment", "replica", "count", "first_seen", "last_seen")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[DeploymentError.Kind]
        KIND_IMAGE_PULL_ERROR: _ClassVar[DeploymentError.Kind]
        KIND_SCHEDULING_FAILURE: _ClassVar[DeploymentError.Kind]
        KIND_CRASH_LOOP: _ClassVar[DeploymentError.Kind]
        KIND_OOM_KILLED: _ClassVar[DeploymentError.Kind]
        KIND_HEALTH_CHECK_FAILED: _ClassVar[DeploymentError.Kind]
        KIND_NODE_DOWN: _ClassVar[DeploymentError.Kind]
        KIND_CANARY_ABORTED: _ClassVar[DeploymentError.Kind]
    KIND_UNSPECIFIED: DeploymentError.Kind
    KIND_IMAGE_PULL_ERROR: DeploymentError.Kind
    KIND_SCHEDULING_FAILURE: DeploymentError.Kind
    KIND_CRASH_LOOP: DeploymentError.Kind
    KIND_OOM_KILLED: DeploymentError.Kind
    KIND_HEALTH_CHECK_FAILED: DeploymentError.Kind
    KIND_NODE_DOWN: DeploymentError.Kind
    KIND_CANARY_ABORTED: DeploymentError.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_ID_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEEN_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    kind: DeploymentError.Kind
    message: str
    deployment_id: str
    environment_id: str
    environment: str
    replica: str
    count: int
    first_seen: _timestamp_pb2.Timestamp
    last_seen: _timestamp_pb2.Timestamp
    def __init__(self, kind: _Optional[_Union[DeploymentError.Kind, str]] = ..., message: _Optional[str] = ..., deployment_id: _Optional[str] = ..., environment_id: _Optional[str] = ..., environment: _Optional[str] = ..., replica: _Optional[str] = ..., count: _Optional[int] = ..., first_seen: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_seen: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListDeploymentErrorsResponse(_message.Message):
    __slots__ = ("errors", "next_page_token")
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    errors: _containers.RepeatedCompositeFieldContainer[DeploymentError]
    next_page_token: str
    def __init__(self, errors: _Optional[_Iterable[_Union[DeploymentError, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class SchedulerLeader(_message.Message):
    __slots__ = ("instance", "epoch")
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    instance: str
    epoch: int
    def __init__(self, instance: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class StreamDeploymentLogsRequest(_message.Message):
    __slots__ = ("project", "deployment_id", "latest", "environment", "replica", "since", "tail", "follow")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    LATEST_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    TAIL_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    project: str
    deployment_id: str
    latest: bool
    environment: str
    replica: str
    since: _timestamp_pb2.Timestamp
    tail: int
    follow: bool
    def __init__(self, project: _Optional[str] = ..., deployment_id: _Optional[str] = ..., latest: _Optional[bool] = ..., environment: _Optional[str] = ..., replica: _Optional[str] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., tail: _Optional[int] = ..., follow: _Optional[bool] = ...) -> None: ...

class LogLine(_message.Message):
    __slots__ = ("time", "replica_id", "replica_index", "environment_id", "environment", "stream", "text", "dropped", "archived")
    class Stream(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STREAM_UNSPECIFIED: _ClassVar[LogLine.Stream]
        STREAM_STDOUT: _ClassVar[LogLine.Stream]
        STREAM_STDERR: _ClassVar[LogLine.Stream]
    STREAM_UNSPECIFIED: LogLine.Stream
    STREAM_STDOUT: LogLine.Stream
    STREAM_STDERR: LogLine.Stream
    TIME_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICA_INDEX_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_ID_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    ARCHIVED_FIELD_NUMBER: _ClassVar[int]
    time: _timestamp_pb2.Timestamp
    replica_id: str
    replica_index: int
    environment_id: str
    environment: str
    stream: LogLine.Stream
    text: str
    dropped: int
    archived: bool
    def __init__(self, time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., replica_id: _Optional[str] = ..., replica_index: _Optional[int] = ..., environment_id: _Optional[str] = ..., environment: _Optional[str] = ..., stream: _Optional[_Union[LogLine.Stream, str]] = ..., text: _Optional[str] = ..., dropped: _Optional[int] = ..., archived: _Optional[bool] = ...) -> None: ...

class RequestMetrics(_message.Message):
    __slots__ = ("last_minute", "last_five_minutes", "history")
    LAST_MINUTE_FIELD_NUMBER: _ClassVar[int]
    LAST_FIVE_MINUTES_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    last_minute: RequestWindowStats
    last_five_minutes: RequestWindowStats
    history: _containers.RepeatedCompositeFieldContainer[RequestMetricsPoint]
    def __init__(self, last_minute: _Optional[_Union[RequestWindowStats, _Mapping]] = ..., last_five_minutes: _Optional[_Union[RequestWindowStats, _Mapping]] = ..., history: _Optional[_Iterable[_Union[RequestMetricsPoint, _Mapping]]] = ...) -> None: ...

class RequestWindowStats(_message.Message):
    __slots__ = ("window_seconds", "requests", "requests_per_second", "responses_2xx", "responses_3xx", "responses_4xx", "responses_5xx", "error_rate", "p50_seconds", "p99_seconds")
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_2XX_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_3XX_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_4XX_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_5XX_FIELD_NUMBER: _ClassVar[int]
    ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    P50_SECONDS_FIELD_NUMBER: _ClassVar[int]
    P99_SECONDS_FIELD_NUMBER: _ClassVar[int]
    window_seconds: float
    requests: int
    requests_per_second: float
    responses_2xx: int
    responses_3xx: int
    responses_4xx: int
    responses_5xx: int
    error_rate: float
    p50_seconds: float
    p99_seconds: float
    def __init__(self, window_seconds: _Optional[float] = ..., requests: _Optional[int] = ..., requests_per_second: _Optional[float] = ..., responses_2xx: _Optional[int] = ..., responses_3xx: _Optional[int] = ..., responses_4xx: _Optional[int] = ..., responses_5xx: _Optional[int] = ..., error_rate: _Optional[float] = ..., p50_seconds: _Optional[float] = ..., p99_seconds: _Optional[float] = ...) -> None: ...

class RequestMetricsPoint(_message.Message):
    __slots__ = ("time", "requests", "requests_per_second", "error_rate", "p99_seconds")
    TIME_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    P99_SECONDS_FIELD_NUMBER: _ClassVar[int]
    time: _timestamp_pb2.Timestamp
    requests: int
    requests_per_second: float
    error_rate: float
    p99_seconds: float
    def __init__(self, time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., requests: _Optional[int] = ..., requests_per_second: _Optional[float] = ..., error_rate: _Optional[float] = ..., p99_seconds: _Optional[float] = ...) -> None: ...
