"""The options of a RangeRequest: which keys, which of them, in what order.

Kept apart from storage so the rules (etcd's, some of them surprising) are in
one place and apply identically to current, historical and in-txn reads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from metastore.api.pb import kv_pb2, rpc_pb2
from metastore.mvcc_layout import HEADER_SIZE, RECORD, record_header
from metastore.mvcc_read import Item

_RR = rpc_pb2.RangeRequest


@dataclass(frozen=True)
class KeyRange:
    """[start, end) in user-key space; end None = unbounded. `single` marks a
    one-key range, which is served with a point lookup instead of a scan."""

    start: bytes
    end: bytes | None
    single: bool = False
    empty: bool = False

    def contains(self, key: bytes) -> bool:
        if self.empty:
            return False
        if self.single:
            return key == self.start
        return self.start <= key and (self.end is None or key < self.end)


def key_range(key: bytes, range_end: bytes) -> KeyRange:
    """etcd's reading of (key, range_end), shared by range/delete/compare/watch."""
    if not range_end:
        return KeyRange(key, key + b"\x00", single=True)
    if range_end == b"\x00":
        return KeyRange(key, None)
    if range_end <= key:
        return KeyRange(key, key, empty=True)
    return KeyRange(key, range_end)


def effective_sort(req: rpc_pb2.RangeRequest) -> tuple[int, int]:
    """(order, target). etcd sorts ASCEND when a non-KEY target is given with
    order NONE, because NONE would otherwise silently mean key order."""
    order, target = req.sort_order, req.sort_target
    if target != _RR.KEY and order == _RR.NONE:
        order = _RR.ASCEND
    return order, target


def revision_filter(req: rpc_pb2.RangeRequest) -> Callable[[bytes], bool] | None:
    """Predicate over a record for the min/max mod/create bounds (0 = no bound,
    bounds inclusive); None when no bound is set so callers can skip decoding."""
    min_mod, max_mod = req.min_mod_revision, req.max_mod_revision
    min_create, max_create = req.min_create_revision, req.max_create_revision
    if not (min_mod or max_mod or min_create or max_create):
        return None

    def keep(rec: bytes) -> bool:
        create, mod = RECORD.unpack_from(rec)[:2]
        if max_mod and mod > max_mod:
            return False
        if min_mod and mod < min_mod:
            return False
        if max_create and create > max_create:
            return False
        if min_create and create < min_create:
            return False
        return True

    return keep


_SORT_KEYS: dict[int, Callable[[Item], object]] = {
    _RR.VERSION: lambda it: RECORD.unpack_from(it[1])[3],
    _RR.CREATE: lambda it: RECORD.unpack_from(it[1])[0],
    _RR.MOD: lambda it: RECORD.unpack_from(it[1])[1],
    _RR.VALUE: lambda it: it[1][HEADER_SIZE:],
}


@dataclass
class Selection:
    items: list[Item]
    count: int
    more: bool


def select(items: Iterable[Item], req: rpc_pb2.RangeRequest) -> Selection:
    """Apply filters, sort and limit to `items` (all keys of the range, in key
    order, at the read revision).

    `count` is the number of keys in the range, NOT reduced by the min/max
    filters: etcd computes it before filtering and documents that it stays so
    (etcd-io/etcd#18267), and clients compare our answers with etcd's. `more`
    does reflect the filters: more filtered keys than `limit`.
    """
    limit = req.limit if req.limit > 0 else 0
    if req.count_only:
        return Selection([], sum(1 for _ in items), False)
    keep = revision_filter(req)
    order, target = effective_sort(req)

    if target == _RR.KEY and order != _RR.DESCEND:
        # Key order is storage order: stop collecting at limit+1, just count on.
        picked: list[Item] = []
        count = 0
        for item in items:
            count += 1
            if (not limit or len(picked) <= limit) and (keep is None or keep(item[1])):
                picked.append(item)
    else:
        everything = list(items)
        count = len(everything)
        picked = everything if keep is None else [it for it in everything if keep(it[1])]
        if target == _RR.KEY:
            picked.reverse()  # keys are unique: reversing is sorting descending
        else:
            # Stable sort: ties stay in key order (etcd leaves tie order unspecified).
            picked.sort(key=_SORT_KEYS[target], reverse=order == _RR.DESCEND)

    more = bool(limit) and len(picked) > limit
    if more:
        del picked[limit:]
    return Selection(picked, count, more)


def fill_kv(out: kv_pb2.KeyValue, key: bytes, rec: bytes, keys_only: bool = False) -> None:
    create, mod, _sub, version, lease = record_header(rec)
    out.key = key
    out.create_revision = create
    out.mod_revision = mod
    out.version = version
    out.lease = lease
    if not keys_only:
        out.value = rec[HEADER_SIZE:]


def fill_response(out: rpc_pb2.RangeResponse, sel: Selection, req: rpc_pb2.RangeRequest) -> None:
    keys_only = req.keys_only
    add = out.kvs.add
    for key, rec in sel.items:
        create, mod, _sub, version, lease = record_header(rec)
        if keys_only:
            add(key=key, create_revision=create, mod_revision=mod, version=version, lease=lease)
        else:
            add(
                key=key,
                create_revision=create,
                mod_revision=mod,
                version=version,
                lease=lease,
                value=rec[HEADER_SIZE:],
            )
    out.count = sel.count
    out.more = sel.more
