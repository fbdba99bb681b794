"""Request checks made before a request is proposed to Raft, as etcd does.

They depend on the request alone, never on the store, so a bad request fails
fast on the member that received it without costing a log entry; what needs
the state (KEY_NOT_FOUND for ignore_value, compacted revisions) is decided by
the store when the entry is applied.
"""
from __future__ import annotations

from typing import Iterable

from metastore import errors
from metastore.api.pb import rpc_pb2

DEFAULT_MAX_TXN_OPS = 128

_SORT_ORDERS = frozenset(rpc_pb2.RangeRequest.SortOrder.values())
_SORT_TARGETS = frozenset(rpc_pb2.RangeRequest.SortTarget.values())


def validate_range(req: rpc_pb2.RangeRequest) -> None:
    if not req.key:
        raise errors.EMPTY_KEY
    if req.sort_order not in _SORT_ORDERS or req.sort_target not in _SORT_TARGETS:
        raise errors.INVALID_SORT_OPTION


def validate_put(req: rpc_pb2.PutRequest) -> None:
    if not req.key:
        raise errors.EMPTY_KEY
    if req.ignore_value and req.value:
        raise errors.VALUE_PROVIDED
    if req.ignore_lease and req.lease != 0:
        raise errors.LEASE_PROVIDED


def validate_delete_range(req: rpc_pb2.DeleteRangeRequest) -> None:
    if not req.key:
        raise errors.EMPTY_KEY


def validate_txn(req: rpc_pb2.TxnRequest, max_ops: int = DEFAULT_MAX_TXN_OPS) -> None:
    """Every op checked (recursively), op counts bounded, then no key written
    twice on one path through the txn."""
    _check_txn(req, max_ops)
    _writes(req.success)
    _writes(req.failure)


def _check_txn(req: rpc_pb2.TxnRequest, max_ops: int) -> None:
    # etcd counts the longest of compare/success/failure against the limit,
    # and a nested txn gets what its parent left of the budget.
    ops = max(len(req.compare), len(req.success), len(req.failure))
    if ops > max_ops:
        raise errors.TOO_MANY_OPS
    for c in req.compare:
        if not c.key:
            raise errors.EMPTY_KEY
    for op in (*req.success, *req.failure):
        _check_op(op, max_ops - ops)


def _check_op(op: rpc_pb2.RequestOp, max_ops: int) -> None:
    which = op.WhichOneof("request")
    if which == "request_range":
        validate_range(op.request_range)
    elif which == "request_put":
        validate_put(op.request_put)
    elif which == "request_delete_range":
        validate_delete_range(op.request_delete_range)
    elif which == "request_txn":
        _check_txn(op.request_txn, max_ops)
    else:
        raise errors.KEY_NOT_FOUND  # an empty op: etcd answers exactly this


class _Deletes:
    """Key intervals deleted on a path, as etcd's duplicate check sees them.

    An empty range_end is a single key; any other range_end is taken
    literally as an exclusive bound, so "\\0" (meaning "to the end" for the
    delete itself) matches no key here -- etcd's check does the same, and
    matching it keeps the same txns accepted.
    """

    def __init__(self) -> None:
        self.intervals: list[tuple[bytes, bytes | None]] = []

    def add(self, key: bytes, range_end: bytes) -> None:
        self.intervals.append((key, range_end) if range_end else (key, key + b"\x00"))

    def extend(self, other: "_Deletes") -> None:
        self.intervals.extend(other.intervals)

    def covers(self, key: bytes) -> bool:
        return any(start <= key < end for start, end in self.intervals)  # type: ignore[operator]


def _writes(ops: Iterable[rpc_pb2.RequestOp]) -> tuple[set[bytes], _Deletes]:
    """(keys put, intervals deleted) on this branch and the nested txns in it;
    DUPLICATE_KEY when a key is put twice or put inside a deleted interval.
    The two branches of one nested txn may put the same key: only one runs."""
    ops = list(ops)
    dels = _Deletes()
    for op in ops:
        if op.WhichOneof("request") == "request_delete_range":
            dels.add(op.request_delete_range.key, op.request_delete_range.range_end)

    puts: set[bytes] = set()
    for op in ops:
        if op.WhichOneof("request") != "request_txn":
            continue
        then_puts, then_dels = _writes(op.request_txn.success)
        else_puts, else_dels = _writes(op.request_txn.failure)
        for key in then_puts:
            if key in puts or dels.covers(key):
                raise errors.DUPLICATE_KEY
            puts.add(key)
        for key in else_puts:
            if (key in puts and key not in then_puts) or dels.covers(key):
                raise errors.DUPLICATE_KEY
            puts.add(key)
        dels.extend(then_dels)
        dels.extend(else_dels)

    for op in ops:
        if op.WhichOneof("request") != "request_put":
            continue
        key = op.request_put.key
        if key in puts or dels.covers(key):
            raise errors.DUPLICATE_KEY
        puts.add(key)
    return puts, dels


def txn_is_read_only(req: rpc_pb2.TxnRequest) -> bool:
    """No put or delete on any branch, however nested: such a txn is a read
    (served behind a read barrier, never written to the Raft log)."""
    for op in (*req.success, *req.failure):
        which = op.WhichOneof("request")
        if which in ("request_put", "request_delete_range"):
            return False
        if which == "request_txn" and not txn_is_read_only(op.request_txn):
            return False
    return True
