from berth.v1 import common_pb2 as _common_pb2
from berth.v1 import registry_pb2 as _registry_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AuthenticateRequest(_message.Message):
    __slots__ = ("api_key",)
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    api_key: str
    def __init__(self, api_key: _Optional[str] = ...) -> None: ...

class Principal(_message.Message):
    __slots__ = ("project_id", "project_name", "key_name", "admin")
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    PROJECT_NAME_FIELD_NUMBER: _ClassVar[int]
    KEY_NAME_FIELD_NUMBER: _ClassVar[int]
    ADMIN_FIELD_NUMBER: _ClassVar[int]
    project_id: str
    project_name: str
    key_name: str
    admin: bool
    def __init__(self, project_id: _Optional[str] = ..., project_name: _Optional[str] = ..., key_name: _Optional[str] = ..., admin: _Optional[bool] = ...) -> None: ...

class ResolveImageRequest(_message.Message):
    __slots__ = ("deployment_id", "image_id")
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    deployment_id: str
    image_id: str
    def __init__(self, deployment_id: _Optional[str] = ..., image_id: _Optional[str] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("since_revision",)
    SINCE_REVISION_FIELD_NUMBER: _ClassVar[int]
    since_revision: int
    def __init__(self, since_revision: _Optional[int] = ...) -> None: ...

class WatchEvent(_message.Message):
    __slots__ = ("revision", "environment", "binding", "environment_deleted", "snapshot_complete", "resumed")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    BINDING_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_DELETED_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_COMPLETE_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    revision: int
    environment: _common_pb2.Environment
    binding: _common_pb2.Binding
    environment_deleted: str
    snapshot_complete: bool
    resumed: bool
    def __init__(self, revision: _Optional[int] = ..., environment: _Optional[_Union[_common_pb2.Environment, _Mapping]] = ..., binding: _Optional[_Union[_common_pb2.Binding, _Mapping]] = ..., environment_deleted: _Optional[str] = ..., snapshot_complete: _Optional[bool] = ..., resumed: _Optional[bool] = ...) -> None: ...

class AdvanceCanaryRequest(_message.Message):
    __slots__ = ("project", "environment", "expected_sequence", "step", "action", "analysis")
    class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ACTION_UNSPECIFIED: _ClassVar[AdvanceCanaryRequest.Action]
        ACTION_ADVANCE: _ClassVar[AdvanceCanaryRequest.Action]
        ACTION_ABORT: _ClassVar[AdvanceCanaryRequest.Action]
        ACTION_RECORD: _ClassVar[AdvanceCanaryRequest.Action]
    ACTION_UNSPECIFIED: AdvanceCanaryRequest.Action
    ACTION_ADVANCE: AdvanceCanaryRequest.Action
    ACTION_ABORT: AdvanceCanaryRequest.Action
    ACTION_RECORD: AdvanceCanaryRequest.Action
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    ANALYSIS_FIELD_NUMBER: _ClassVar[int]
    project: str
    environment: str
    expected_sequence: int
    step: int
    action: AdvanceCanaryRequest.Action
    analysis: str
    def __init__(self, project: _Optional[str] = ..., environment: _Optional[str] = ..., expected_sequence: _Optional[int] = ..., step: _Optional[int] = ..., action: _Optional[_Union[AdvanceCanaryRequest.Action, str]] = ..., analysis: _Optional[str] = ...) -> None: ...
