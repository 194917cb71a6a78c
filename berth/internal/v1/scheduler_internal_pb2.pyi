from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WatchEndpointsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EndpointSet(_message.Message):
    __slots__ = ("project_id", "environment_id", "deployment_id", "addresses", "status")
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_ID_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    project_id: str
    environment_id: str
    deployment_id: str
    addresses: _containers.RepeatedScalarFieldContainer[str]
    status: str
    def __init__(self, project_id: _Optional[str] = ..., environment_id: _Optional[str] = ..., deployment_id: _Optional[str] = ..., addresses: _Optional[_Iterable[str]] = ..., status: _Optional[str] = ...) -> None: ...

class EndpointSnapshot(_message.Message):
    __slots__ = ("sets",)
    SETS_FIELD_NUMBER: _ClassVar[int]
    sets: _containers.RepeatedCompositeFieldContainer[EndpointSet]
    def __init__(self, sets: _Optional[_Iterable[_Union[EndpointSet, _Mapping]]] = ...) -> None: ...

class BindingLoad(_message.Message):
    __slots__ = ("project_id", "environment_id", "deployment_id", "in_flight", "requests", "last_minute", "last_five_minutes")
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_ID_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    LAST_MINUTE_FIELD_NUMBER: _ClassVar[int]
    LAST_FIVE_MINUTES_FIELD_NUMBER: _ClassVar[int]
    project_id: str
    environment_id: str
    deployment_id: str
    in_flight: int
    requests: int
    last_minute: RequestWindow
    last_five_minutes: RequestWindow
    def __init__(self, project_id: _Optional[str] = ..., environment_id: _Optional[str] = ..., deployment_id: _Optional[str] = ..., in_flight: _Optional[int] = ..., requests: _Optional[int] = ..., last_minute: _Optional[_Union[RequestWindow, _Mapping]] = ..., last_five_minutes: _Optional[_Union[RequestWindow, _Mapping]] = ...) -> None: ...

class RequestWindow(_message.Message):
    __slots__ = ("requests", "responses_2xx", "responses_3xx", "responses_4xx", "responses_5xx", "latency_sum_seconds", "latency_buckets", "latency_bounds")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_2XX_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_3XX_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_4XX_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_5XX_FIELD_NUMBER: _ClassVar[int]
    LATENCY_SUM_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_BUCKETS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_BOUNDS_FIELD_NUMBER: _ClassVar[int]
    requests: int
    responses_2xx: int
    responses_3xx: int
    responses_4xx: int
    responses_5xx: int
    latency_sum_seconds: float
    latency_buckets: _containers.RepeatedScalarFieldContainer[int]
    latency_bounds: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, requests: _Optional[int] = ..., responses_2xx: _Optional[int] = ..., responses_3xx: _Optional[int] = ..., responses_4xx: _Optional[int] = ..., responses_5xx: _Optional[int] = ..., latency_sum_seconds: _Optional[float] = ..., latency_buckets: _Optional[_Iterable[int]] = ..., latency_bounds: _Optional[_Iterable[float]] = ...) -> None: ...

class ReportLoadRequest(_message.Message):
    __slots__ = ("bindings", "reporter", "router", "revision", "loaded")
    BINDINGS_FIELD_NUMBER: _ClassVar[int]
    REPORTER_FIELD_NUMBER: _ClassVar[int]
    ROUTER_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    bindings: _containers.RepeatedCompositeFieldContainer[BindingLoad]
    reporter: str
    router: str
    revision: int
    loaded: bool
    def __init__(self, bindings: _Optional[_Iterable[_Union[BindingLoad, _Mapping]]] = ..., reporter: _Optional[str] = ..., router: _Optional[str] = ..., revision: _Optional[int] = ..., loaded: _Optional[bool] = ...) -> None: ...

class ReportLoadResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ActivateRequest(_message.Message):
    __slots__ = ("project_id", "environment_id", "deployment_id")
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_ID_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    project_id: str
    environment_id: str
    deployment_id: str
    def __init__(self, project_id: _Optional[str] = ..., environment_id: _Optional[str] = ..., deployment_id: _Optional[str] = ...) -> None: ...

class ActivateResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: str
    def __init__(self, status: _Optional[str] = ...) -> None: ...

class ListRoutersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RouterProcess(_message.Message):
    __slots__ = ("router", "reporter", "revision", "loaded", "seconds_since_report")
    ROUTER_FIELD_NUMBER: _ClassVar[int]
    REPORTER_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_REPORT_FIELD_NUMBER: _ClassVar[int]
    router: str
    reporter: str
    revision: int
    loaded: bool
    seconds_since_report: float
    def __init__(self, router: _Optional[str] = ..., reporter: _Optional[str] = ..., revision: _Optional[int] = ..., loaded: _Optional[bool] = ..., seconds_since_report: _Optional[float] = ...) -> None: ...

class ListRoutersResponse(_message.Message):
    __slots__ = ("routers", "live_window_seconds", "listening_seconds")
    ROUTERS_FIELD_NUMBER: _ClassVar[int]
    LIVE_WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LISTENING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    routers: _containers.RepeatedCompositeFieldContainer[RouterProcess]
    live_window_seconds: float
    listening_seconds: float
    def __init__(self, routers: _Optional[_Iterable[_Union[RouterProcess, _Mapping]]] = ..., live_window_seconds: _Optional[float] = ..., listening_seconds: _Optional[float] = ...) -> None: ...
