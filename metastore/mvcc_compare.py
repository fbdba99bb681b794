"""Txn compares, and which branch of a (nested) txn runs.

etcd decides every branch of a txn -- nested ones included -- against the
state *before* the txn, then applies the chosen ops. So compares of a nested
txn do not see writes made earlier in the outer txn (reads do); `txn_path`
reproduces that by evaluating all compares up front on one view.
"""
from __future__ import annotations

from typing import Iterator

from metastore.api.pb import rpc_pb2
from metastore.mvcc_layout import HEADER_SIZE, RECORD
from metastore.mvcc_range import key_range
from metastore.mvcc_read import View

_C = rpc_pb2.Compare

# (create, mod, version, lease, value) of a key that does not exist.
_MISSING = (0, 0, 0, 0, b"")


def _target_value(c: rpc_pb2.Compare) -> int | bytes:
    """The compared-against value; a union set for another target counts as
    zero/empty, as in etcd (the client sent nothing for this target)."""
    which = c.WhichOneof("target_union")
    t = c.target
    if t == _C.VALUE:
        return c.value if which == "value" else b""
    if t == _C.VERSION:
        return c.version if which == "version" else 0
    if t == _C.CREATE:
        return c.create_revision if which == "create_revision" else 0
    if t == _C.MOD:
        return c.mod_revision if which == "mod_revision" else 0
    if t == _C.LEASE:
        return c.lease if which == "lease" else 0
    return 0


def _field(c: rpc_pb2.Compare, create: int, mod: int, version: int, lease: int, value: bytes) -> int | bytes:
    t = c.target
    if t == _C.VALUE:
        return value
    if t == _C.VERSION:
        return version
    if t == _C.CREATE:
        return create
    if t == _C.MOD:
        return mod
    if t == _C.LEASE:
        return lease
    return 0


def _holds(c: rpc_pb2.Compare, actual: int | bytes, wanted: int | bytes) -> bool:
    r = c.result
    if r == _C.EQUAL:
        return actual == wanted
    if r == _C.NOT_EQUAL:
        return actual != wanted
    if r == _C.GREATER:
        return actual > wanted  # type: ignore[operator]
    if r == _C.LESS:
        return actual < wanted  # type: ignore[operator]
    return True  # unknown result: etcd treats it as satisfied


def _record_fields(rec: bytes) -> tuple[int, int, int, int, bytes]:
    create, mod, _sub, version, lease = RECORD.unpack_from(rec)
    return create, mod, version, lease, rec[HEADER_SIZE:]


def compare(view: View, c: rpc_pb2.Compare) -> bool:
    """True when every key of the compare's range satisfies it.

    No key at all compares as a zero KeyValue, except that a VALUE compare
    then fails: an absent value cannot be told apart from an empty one.
    """
    wanted = _target_value(c)
    kr = key_range(c.key, c.range_end)
    if kr.single:
        rec = view.get(kr.start)
        records = [] if rec is None else [rec]
    elif kr.empty:
        records = []
    else:
        records = (rec for _key, rec in view.scan(kr.start, kr.end))
    seen = False
    for rec in records:
        seen = True
        if not _holds(c, _field(c, *_record_fields(rec)), wanted):
            return False
    if seen:
        return True
    if c.target == _C.VALUE:
        return False
    return _holds(c, _field(c, *_MISSING), wanted)


def txn_path(view: View, req: rpc_pb2.TxnRequest) -> list[bool]:
    """Outcome of this txn and of every nested txn on the chosen branches, in
    pre-order: the order in which applying the txn meets them."""
    ok = all(compare(view, c) for c in req.compare)
    path = [ok]
    for op in req.success if ok else req.failure:
        if op.WhichOneof("request") == "request_txn":
            path.extend(txn_path(view, op.request_txn))
    return path


def chosen_ops(req: rpc_pb2.TxnRequest, path: Iterator[bool]) -> tuple[bool, list[rpc_pb2.RequestOp]]:
    """Consume this txn's outcome from `path`; (succeeded, ops to run)."""
    ok = next(path)
    return ok, list(req.success if ok else req.failure)
