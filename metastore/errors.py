"""etcd's errors, with the gRPC code and exact message text etcd uses.

Go clients match on code *and* message text (clientv3's rpctypes), so these
strings are part of the protocol. Every layer raises `EtcdError`; the gRPC
layer turns it into the status the client sees, and nothing else needs to know
about gRPC.
"""
from __future__ import annotations

from grpc import StatusCode


class EtcdError(Exception):
    """A request failure that reaches the client as (code, message)."""

    def __init__(self, code: StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __reduce__(self):  # picklable, so it can cross the Raft forwarding path
        return (EtcdError, (self.code, self.message))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EtcdError) and (self.code, self.message) == (other.code, other.message)

    def __hash__(self) -> int:
        return hash((self.code, self.message))


def _e(code: StatusCode, message: str) -> EtcdError:
    return EtcdError(code, "etcdserver: " + message)


# Request validation
EMPTY_KEY = _e(StatusCode.INVALID_ARGUMENT, "key is not provided")
KEY_NOT_FOUND = _e(StatusCode.INVALID_ARGUMENT, "key not found")
VALUE_PROVIDED = _e(StatusCode.INVALID_ARGUMENT, "value is provided")
LEASE_PROVIDED = _e(StatusCode.INVALID_ARGUMENT, "lease is provided")
TOO_MANY_OPS = _e(StatusCode.INVALID_ARGUMENT, "too many operations in txn request")
DUPLICATE_KEY = _e(StatusCode.INVALID_ARGUMENT, "duplicate key given in txn request")
INVALID_SORT_OPTION = _e(StatusCode.INVALID_ARGUMENT, "invalid sort option")
REQUEST_TOO_LARGE = _e(StatusCode.INVALID_ARGUMENT, "request is too large")

# MVCC
COMPACTED = _e(StatusCode.OUT_OF_RANGE, "mvcc: required revision has been compacted")
FUTURE_REV = _e(StatusCode.OUT_OF_RANGE, "mvcc: required revision is a future revision")
NO_SPACE = _e(StatusCode.RESOURCE_EXHAUSTED, "mvcc: database space exceeded")

# Leases
LEASE_NOT_FOUND = _e(StatusCode.NOT_FOUND, "requested lease not found")
LEASE_EXISTS = _e(StatusCode.FAILED_PRECONDITION, "lease already exists")
LEASE_TTL_TOO_LARGE = _e(StatusCode.OUT_OF_RANGE, "too large lease TTL")

# Cluster / Raft
NO_LEADER = _e(StatusCode.UNAVAILABLE, "no leader")
NOT_LEADER = _e(StatusCode.FAILED_PRECONDITION, "not leader")
LEADER_CHANGED = _e(StatusCode.UNAVAILABLE, "leader changed")
TIMEOUT = _e(StatusCode.UNAVAILABLE, "request timed out")
TIMEOUT_LEADER_FAIL = _e(StatusCode.UNAVAILABLE, "request timed out, possibly due to previous leader failure")
TOO_MANY_REQUESTS = _e(StatusCode.RESOURCE_EXHAUSTED, "too many requests")
STOPPED = _e(StatusCode.UNAVAILABLE, "server stopped")
MEMBER_NOT_FOUND = _e(StatusCode.NOT_FOUND, "member not found")
PEER_URL_EXISTS = _e(StatusCode.FAILED_PRECONDITION, "Peer URLs already exists")
MEMBER_BAD_URLS = _e(StatusCode.INVALID_ARGUMENT, "given member URLs are invalid")
MEMBERSHIP_CHANGE_IN_PROGRESS = _e(StatusCode.FAILED_PRECONDITION,
                                   "another membership change is in progress; retry when it is done")
BAD_LEADER_TRANSFEREE = _e(StatusCode.FAILED_PRECONDITION, "bad leader transferee")
TIMEOUT_LEADER_TRANSFER = _e(StatusCode.UNAVAILABLE, "request timed out, leader transfer took too long")
NOT_CAPABLE = _e(StatusCode.UNAVAILABLE, "not capable")
PERMISSION_DENIED = _e(StatusCode.PERMISSION_DENIED, "permission denied")

# Authentication (always disabled: see api/auth.py)
AUTH_NOT_ENABLED = _e(StatusCode.FAILED_PRECONDITION, "authentication is not enabled")
ROOT_USER_NOT_EXIST = _e(StatusCode.FAILED_PRECONDITION, "root user does not exist")
USER_NOT_FOUND = _e(StatusCode.FAILED_PRECONDITION, "user name not found")
ROLE_NOT_FOUND = _e(StatusCode.FAILED_PRECONDITION, "role name not found")
USERS_NOT_SUPPORTED = EtcdError(StatusCode.UNIMPLEMENTED,
                                "metastore: users and roles are not supported; authentication stays disabled")
