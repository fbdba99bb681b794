from metastore.api.pb import rpc_pb2 as _rpc_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MemberAttributes(_message.Message):
    __slots__ = ("member_id", "name", "client_urls")
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CLIENT_URLS_FIELD_NUMBER: _ClassVar[int]
    member_id: int
    name: str
    client_urls: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, member_id: _Optional[int] = ..., name: _Optional[str] = ..., client_urls: _Optional[_Iterable[str]] = ...) -> None: ...

class Proposal(_message.Message):
    __slots__ = ("request_id", "put", "delete_range", "txn", "compaction", "publish", "lease_grant", "lease_revoke", "lease_refresh", "alarm", "member_change", "liveness")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PUT_FIELD_NUMBER: _ClassVar[int]
    DELETE_RANGE_FIELD_NUMBER: _ClassVar[int]
    TXN_FIELD_NUMBER: _ClassVar[int]
    COMPACTION_FIELD_NUMBER: _ClassVar[int]
    PUBLISH_FIELD_NUMBER: _ClassVar[int]
    LEASE_GRANT_FIELD_NUMBER: _ClassVar[int]
    LEASE_REVOKE_FIELD_NUMBER: _ClassVar[int]
    LEASE_REFRESH_FIELD_NUMBER: _ClassVar[int]
    ALARM_FIELD_NUMBER: _ClassVar[int]
    MEMBER_CHANGE_FIELD_NUMBER: _ClassVar[int]
    LIVENESS_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    put: _rpc_pb2.PutRequest
    delete_range: _rpc_pb2.DeleteRangeRequest
    txn: _rpc_pb2.TxnRequest
    compaction: _rpc_pb2.CompactionRequest
    publish: MemberAttributes
    lease_grant: _rpc_pb2.LeaseGrantRequest
    lease_revoke: _rpc_pb2.LeaseRevokeRequest
    lease_refresh: LeaseRefresh
    alarm: _rpc_pb2.AlarmRequest
    member_change: MemberChange
    liveness: LivenessChange
    def __init__(self, request_id: _Optional[int] = ..., put: _Optional[_Union[_rpc_pb2.PutRequest, _Mapping]] = ..., delete_range: _Optional[_Union[_rpc_pb2.DeleteRangeRequest, _Mapping]] = ..., txn: _Optional[_Union[_rpc_pb2.TxnRequest, _Mapping]] = ..., compaction: _Optional[_Union[_rpc_pb2.CompactionRequest, _Mapping]] = ..., publish: _Optional[_Union[MemberAttributes, _Mapping]] = ..., lease_grant: _Optional[_Union[_rpc_pb2.LeaseGrantRequest, _Mapping]] = ..., lease_revoke: _Optional[_Union[_rpc_pb2.LeaseRevokeRequest, _Mapping]] = ..., lease_refresh: _Optional[_Union[LeaseRefresh, _Mapping]] = ..., alarm: _Optional[_Union[_rpc_pb2.AlarmRequest, _Mapping]] = ..., member_change: _Optional[_Union[MemberChange, _Mapping]] = ..., liveness: _Optional[_Union[LivenessChange, _Mapping]] = ...) -> None: ...

class LeaseRefresh(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class MemberChange(_message.Message):
    __slots__ = ("member_id", "peer_urls", "is_learner", "remove")
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_URLS_FIELD_NUMBER: _ClassVar[int]
    IS_LEARNER_FIELD_NUMBER: _ClassVar[int]
    REMOVE_FIELD_NUMBER: _ClassVar[int]
    member_id: int
    peer_urls: _containers.RepeatedScalarFieldContainer[str]
    is_learner: bool
    remove: bool
    def __init__(self, member_id: _Optional[int] = ..., peer_urls: _Optional[_Iterable[str]] = ..., is_learner: _Optional[bool] = ..., remove: _Optional[bool] = ...) -> None: ...

class ProposalBatch(_message.Message):
    __slots__ = ("origin", "proposals")
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    PROPOSALS_FIELD_NUMBER: _ClassVar[int]
    origin: int
    proposals: _containers.RepeatedCompositeFieldContainer[Proposal]
    def __init__(self, origin: _Optional[int] = ..., proposals: _Optional[_Iterable[_Union[Proposal, _Mapping]]] = ...) -> None: ...

class LivenessChange(_message.Message):
    __slots__ = ("op", "member_id", "session", "expect", "to", "start_time", "initial_workloads", "initial_subunits", "deadline")
    class Op(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        REGISTER: _ClassVar[LivenessChange.Op]
        ADVANCE: _ClassVar[LivenessChange.Op]
        DRAIN_START: _ClassVar[LivenessChange.Op]
        DRAIN_FINISH: _ClassVar[LivenessChange.Op]
        DRAIN_CANCEL: _ClassVar[LivenessChange.Op]
        RESET: _ClassVar[LivenessChange.Op]
    REGISTER: LivenessChange.Op
    ADVANCE: LivenessChange.Op
    DRAIN_START: LivenessChange.Op
    DRAIN_FINISH: LivenessChange.Op
    DRAIN_CANCEL: LivenessChange.Op
    RESET: LivenessChange.Op
    OP_FIELD_NUMBER: _ClassVar[int]
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    EXPECT_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    INITIAL_WORKLOADS_FIELD_NUMBER: _ClassVar[int]
    INITIAL_SUBUNITS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    op: LivenessChange.Op
    member_id: int
    session: int
    expect: int
    to: int
    start_time: float
    initial_workloads: int
    initial_subunits: int
    deadline: float
    def __init__(self, op: _Optional[_Union[LivenessChange.Op, str]] = ..., member_id: _Optional[int] = ..., session: _Optional[int] = ..., expect: _Optional[int] = ..., to: _Optional[int] = ..., start_time: _Optional[float] = ..., initial_workloads: _Optional[int] = ..., initial_subunits: _Optional[int] = ..., deadline: _Optional[float] = ...) -> None: ...
