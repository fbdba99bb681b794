from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class GetRaftStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetRaftStatusResponse(_message.Message):
    __slots__ = ("node_id", "term", "leader_id", "state", "applied", "commit", "liveness", "http_urls")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    LIVENESS_FIELD_NUMBER: _ClassVar[int]
    HTTP_URLS_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    term: int
    leader_id: int
    state: str
    applied: int
    commit: int
    liveness: str
    http_urls: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node_id: _Optional[int] = ..., term: _Optional[int] = ..., leader_id: _Optional[int] = ..., state: _Optional[str] = ..., applied: _Optional[int] = ..., commit: _Optional[int] = ..., liveness: _Optional[str] = ..., http_urls: _Optional[_Iterable[str]] = ...) -> None: ...
