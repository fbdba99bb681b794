"""A store's rows in etcd's database schema, and back.

Client snapshots (`etcdctl snapshot save`) are bbolt files laid out as etcd
3.4 lays out its own, so that etcd's tools read them (`etcdctl snapshot
status`), etcd restores them (`etcdctl snapshot restore`), and metastore
restores etcd's (`metastore snapshot restore`, a way to move from etcd).

etcd's buckets, as metastore writes and reads them:
- ``key``: every revision of every key still in the history, keyed by
  revision: main (u64 big-endian), ``_``, sub-revision (u64), and ``t`` after
  that for a delete; the value is the mvccpb.KeyValue as of that revision
  (only its key for a delete).
- ``lease``: lease id (i64 big-endian) -> leasepb.Lease {ID, TTL}.
- ``meta``: ``finishedCompactRev`` / ``scheduledCompactRev`` (revisions in the
  ``key`` bucket's encoding) and ``consistent_index`` (u64, the member's
  applied Raft index; etcd's restore replaces it).
- ``cluster`` (``clusterVersion``), and ``members``, ``members_removed``,
  ``alarm``: empty, since a restore builds a new cluster.
- ``metastore``: what etcd's schema has no place for: ``header`` (JSON: who
  took the snapshot, when, at which revision) and ``meta/`` + each row of
  metastore's own `meta` table (revision, compaction marks, member liveness,
  drain, alarms). etcd ignores the bucket; a restore by metastore takes
  its rows over, so nothing is lost in a metastore-to-metastore round trip.

Rows in metastore's tables (metastore.mvcc_layout) are derived from the
``key`` bucket: a key's newest revision is its current record (or, for a
delete, the tombstone in its history), older revisions its history, and
every revision since the last finished compaction is listed in `rev`.
"""
from __future__ import annotations

import json
from bisect import bisect_left
import struct
from typing import Callable, Iterable, Iterator, Protocol

from metastore.api.pb import kv_pb2, lease_pb2
from metastore.mvcc_layout import (
    LAYOUT_VERSION, META_APPLIED, META_COMPACT_FINISHED, META_COMPACT_REVISION, META_LAYOUT, META_REVISION,
    TOMBSTONE, encode_record, hist_key, pack_rev, pack_u64, record_header, record_value, split_hist_key,
    unpack_rev, unpack_u64)
from metastore.mvcc_lease import attach_key, lease_key, pack_ttl
from metastore.rows import Row

KEY = b"key"
META = b"meta"
LEASE = b"lease"
METASTORE = b"metastore"
HEADER = b"header"
META_PREFIX = b"meta/"
EMPTY_BUCKETS = (b"alarm", b"members", b"members_removed")
CLUSTER_VERSION = b"3.4.0"

_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")
_MARK = b"_"
_DELETE = b"t"
_FINISHED = b"finishedCompactRev"
_SCHEDULED = b"scheduledCompactRev"
_CONSISTENT_INDEX = b"consistent_index"


class SchemaError(Exception):
    """A bbolt file whose content is not etcd's schema."""


class RowSource(Protocol):
    """A consistent, unchanging view of a store's backend rows."""

    def get(self, table: str, key: bytes) -> bytes | None: ...

    def scan(self, table: str, start: bytes, end: bytes | None) -> Iterator[tuple[bytes, bytes]]: ...


class RowsView:
    """A RowSource over rows held in memory (a backend that can only list
    its rows)."""

    def __init__(self, rows: Iterable[Row]) -> None:
        self._tables: dict[str, dict[bytes, bytes]] = {}
        for table, key, value in rows:
            self._tables.setdefault(table, {})[key] = value
        self._sorted = {table: sorted(rows) for table, rows in self._tables.items()}

    def get(self, table: str, key: bytes) -> bytes | None:
        return self._tables.get(table, {}).get(key)

    def scan(self, table: str, start: bytes, end: bytes | None) -> Iterator[tuple[bytes, bytes]]:
        keys = self._sorted.get(table, [])
        rows = self._tables.get(table, {})
        for key in keys[bisect_left(keys, start):len(keys) if end is None else bisect_left(keys, end)]:
            yield key, rows[key]


def revision_key(main: int, sub: int, delete: bool = False) -> bytes:
    return _U64.pack(main) + _MARK + _U64.pack(sub) + (_DELETE if delete else b"")


def parse_revision_key(raw: bytes) -> tuple[int, int, bool]:
    """(main, sub, is a delete) of a ``key`` bucket key."""
    if len(raw) not in (17, 18) or raw[8:9] != _MARK or (len(raw) == 18 and raw[17:] != _DELETE):
        raise SchemaError(f"not a revision in etcd's key bucket: {raw.hex()}")
    return _U64.unpack_from(raw)[0], _U64.unpack_from(raw, 9)[0], len(raw) == 18


# -- metastore rows -> etcd buckets ----------------------------------------------------
def buckets(src: RowSource, header: dict) -> list[tuple[bytes, Iterable[tuple[bytes, bytes]]]]:
    """The buckets of an etcd database holding `src`, each with its items in
    key order, produced as they are written (pass to bbolt.write)."""
    meta = dict(src.scan("meta", b"", None))
    compacted = unpack_u64(meta.get(META_COMPACT_REVISION), 0)
    finished = unpack_u64(meta.get(META_COMPACT_FINISHED), 0)
    applied = meta.get(META_APPLIED)
    etcd_meta = {_CONSISTENT_INDEX: _U64.pack(_U64.unpack_from(applied)[0] if applied else 0)}
    if finished:
        etcd_meta[_FINISHED] = revision_key(finished, 0)
    if compacted:
        etcd_meta[_SCHEDULED] = revision_key(compacted, 0)
    own = {HEADER: json.dumps(header, sort_keys=True).encode()}
    own.update((META_PREFIX + k, v) for k, v in meta.items() if k != META_APPLIED)
    out: list[tuple[bytes, Iterable[tuple[bytes, bytes]]]] = [
        (b"cluster", [(b"clusterVersion", CLUSTER_VERSION)]),
        (KEY, _key_bucket(src)),
        (LEASE, _lease_bucket(src)),
        (META, sorted(etcd_meta.items())),
        (METASTORE, sorted(own.items())),
    ]
    out += [(name, []) for name in EMPTY_BUCKETS]
    return sorted(out, key=lambda bucket: bucket[0])


def _key_value(key: bytes, record: bytes) -> bytes:
    create, mod, _sub, version, lease = record_header(record)
    return kv_pb2.KeyValue(key=key, create_revision=create, mod_revision=mod, version=version,
                           value=record_value(record), lease=lease).SerializeToString()


def _deleted(key: bytes) -> bytes:
    return kv_pb2.KeyValue(key=key).SerializeToString()


def _key_bucket(src: RowSource) -> Iterator[tuple[bytes, bytes]]:
    """Every revision in the history, in revision order.

    The `rev` table lists every change from some revision on, in order:
    compaction removes its rows from the oldest up. What is older survived
    compactions (a key's newest version at the compacted revision) and has
    no `rev` row; those few are found by scanning the current records and the
    history, and sorted."""
    first = next(iter(src.scan("rev", b"", None)), None)
    listed_from = first[0] if first else None

    def before(main: int, sub: int) -> bool:
        return listed_from is None or pack_rev(main, sub) < listed_from

    older: list[tuple[bytes, str, bytes]] = []
    for key, record in src.scan("kv", b"", None):
        _create, mod, sub, _version, _lease = record_header(record)
        if before(mod, sub):
            older.append((pack_rev(mod, sub), "kv", key))
    for hk, record in src.scan("hist", b"", None):
        _key, main, sub = split_hist_key(hk)
        if before(main, sub):
            older.append((pack_rev(main, sub), "hist", hk))
    older.sort()
    for rev, table, lookup in older:
        main, sub = unpack_rev(rev)
        record = src.get(table, lookup)
        key = lookup if table == "kv" else split_hist_key(lookup)[0]
        if record == TOMBSTONE:
            yield revision_key(main, sub, True), _deleted(key)
        elif record is not None:
            yield revision_key(main, sub), _key_value(key, record)
    if listed_from is None:
        return
    for rev, key in src.scan("rev", b"", None):
        main, sub = unpack_rev(rev)
        current = src.get("kv", key)
        if current is not None and record_header(current)[1:3] == (main, sub):
            yield revision_key(main, sub), _key_value(key, current)
            continue
        record = src.get("hist", hist_key(key, main, sub))
        if record is None:
            raise SchemaError(f"revision {main}.{sub} of key {key!r} is listed but not stored")
        if record == TOMBSTONE:
            yield revision_key(main, sub, True), _deleted(key)
        else:
            yield revision_key(main, sub), _key_value(key, record)


def _lease_bucket(src: RowSource) -> Iterator[tuple[bytes, bytes]]:
    for k, v in src.scan("lease", b"L", b"M"):
        (lease,) = _I64.unpack_from(k, 1)
        (ttl,) = _I64.unpack(v)
        yield _I64.pack(lease), lease_pb2.Lease(ID=lease, TTL=ttl).SerializeToString()


# -- etcd buckets -> metastore rows ----------------------------------------------------
Items = Callable[[bytes], Iterator[tuple[bytes, bytes]]]


def header_of(items: Items) -> dict | None:
    """The header metastore wrote into a snapshot; None for etcd's own."""
    for k, v in items(METASTORE):
        if k == HEADER:
            return json.loads(v)
    return None


def revision_of(items: Items) -> int:
    """The store revision a database holds (1 for an empty one), as etcd
    counts it: its newest revision, or the compacted one if that is newer."""
    own = dict(items(METASTORE)).get(META_PREFIX + META_REVISION)
    if own is not None:
        return unpack_u64(own, 1)
    newest = 1
    for k, _v in items(KEY):
        newest = max(newest, parse_revision_key(k)[0])
    meta = dict(items(META))
    for name in (_FINISHED, _SCHEDULED):
        if name in meta:
            newest = max(newest, parse_revision_key(meta[name])[0])
    return newest


def rows(items: Items) -> Iterator[Row]:
    """metastore's backend rows for the database whose buckets `items` reads
    (called once per bucket and pass). Holds each key's newest revision in
    memory (one pass finds them, the second writes the rows)."""
    etcd_meta = dict(items(META))
    finished = parse_revision_key(etcd_meta[_FINISHED])[0] if _FINISHED in etcd_meta else 0
    scheduled = parse_revision_key(etcd_meta[_SCHEDULED])[0] if _SCHEDULED in etcd_meta else finished
    own = {k[len(META_PREFIX):]: v for k, v in items(METASTORE) if k.startswith(META_PREFIX)}
    own.pop(META_APPLIED, None)
    if own:
        finished = unpack_u64(own.get(META_COMPACT_FINISHED), 0)

    newest: dict[bytes, bytes] = {}
    last = 1
    for raw, value in items(KEY):
        main, sub, _delete = parse_revision_key(raw)
        key = _decode(value, raw).key
        newest[key] = raw
        last = max(last, main)
    leases = {}
    for raw, value in items(LEASE):
        lease = lease_pb2.Lease.FromString(value)
        leases[lease.ID] = lease.TTL
        yield "lease", lease_key(lease.ID), pack_ttl(lease.TTL)

    for raw, value in items(KEY):
        main, sub, delete = parse_revision_key(raw)
        kv = _decode(value, raw)
        if main >= finished:
            yield "rev", pack_rev(main, sub), kv.key
        if delete:
            yield "hist", hist_key(kv.key, main, sub), TOMBSTONE
            continue
        record = encode_record(kv.create_revision, kv.mod_revision, sub, kv.version, kv.lease, kv.value)
        if newest[kv.key] != raw:
            yield "hist", hist_key(kv.key, main, sub), record
            continue
        yield "kv", kv.key, record
        if kv.lease and kv.lease in leases:
            yield "lease", attach_key(kv.lease, kv.key), b""

    if own:
        for k, v in own.items():
            yield "meta", k, v
        return
    yield "meta", META_LAYOUT, LAYOUT_VERSION
    yield "meta", META_REVISION, pack_u64(max(last, scheduled))
    if scheduled:
        yield "meta", META_COMPACT_REVISION, pack_u64(scheduled)
    if finished:
        yield "meta", META_COMPACT_FINISHED, pack_u64(finished)


def _decode(value: bytes, raw: bytes) -> kv_pb2.KeyValue:
    try:
        return kv_pb2.KeyValue.FromString(value)
    except Exception as exc:  # protobuf's DecodeError, and anything else a damaged value raises
        raise SchemaError(f"revision {raw.hex()}: not an mvccpb.KeyValue ({exc})") from None

