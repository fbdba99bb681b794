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
  took the snapshot, when, at which revision), ``meta/`` + each row of
  metastore's own `meta` table (member liveness, drain, alarms, ...), and a
  ``fingerprint`` of the ``key`` and ``meta`` buckets it was written with.
  etcd ignores the bucket (and keeps it); a restore by metastore takes its
  rows over only while the fingerprint still matches, so nothing is lost in
  a metastore-to-metastore round trip, and a file etcd has since written to
  is read as etcd's. The revision and the compaction marks always come from
  etcd's buckets.

Rows in metastore's tables (metastore.mvcc_layout) are derived from the
``key`` bucket: a key's newest revision is its current record (or, for a
delete, the tombstone in its history), older revisions its history, and
every revision since the last finished compaction is listed in `rev`;
deletes up to that compaction leave no history row, as compaction leaves
none.
"""
from __future__ import annotations

import hashlib
import json
import struct
from bisect import bisect_left
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
FINGERPRINT = b"fingerprint"
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
class _Fingerprint:
    """What a ``key`` and a ``meta`` bucket hold, in brief: the number of
    revisions, the last one, the compaction marks. Written into metastore's
    bucket, it tells a reader whether etcd's buckets are still those the
    bucket was written with (etcd keeps a bucket it does not know; a
    snapshot restored into etcd and saved again after etcd wrote to it must
    be read as etcd's)."""

    def __init__(self) -> None:
        self._count = 0
        self._last = b""

    def count(self, items: Iterable[tuple[bytes, bytes]]) -> Iterator[tuple[bytes, bytes]]:
        for key, value in items:
            self._count += 1
            self._last = key
            yield key, value

    def digest(self, etcd_meta: dict[bytes, bytes]) -> bytes:
        h = hashlib.sha256(_U64.pack(self._count) + self._last)
        for name in (_FINISHED, _SCHEDULED):
            h.update(b"|" + etcd_meta.get(name, b""))
        return h.hexdigest().encode()


def buckets(src: RowSource, header: dict) -> list[tuple[bytes, Iterable[tuple[bytes, bytes]]]]:
    """The buckets of an etcd database holding `src`, each with its items in
    key order, produced as they are written, in name order (pass them to
    bbolt.write in this order: metastore's bucket is made last)."""
    meta = dict(src.scan("meta", b"", None))
    compacted = unpack_u64(meta.get(META_COMPACT_REVISION), 0)
    finished = unpack_u64(meta.get(META_COMPACT_FINISHED), 0)
    applied = meta.get(META_APPLIED)
    etcd_meta = {_CONSISTENT_INDEX: _U64.pack(_U64.unpack_from(applied)[0] if applied else 0)}
    if finished:
        etcd_meta[_FINISHED] = revision_key(finished, 0)
    if compacted:
        etcd_meta[_SCHEDULED] = revision_key(compacted, 0)
    fingerprint = _Fingerprint()

    def own() -> Iterator[tuple[bytes, bytes]]:  # after the key bucket was written
        rows = {FINGERPRINT: fingerprint.digest(etcd_meta), HEADER: json.dumps(header, sort_keys=True).encode()}
        rows.update((META_PREFIX + k, v) for k, v in meta.items() if k != META_APPLIED)
        yield from sorted(rows.items())

    out: list[tuple[bytes, Iterable[tuple[bytes, bytes]]]] = [
        (b"cluster", [(b"clusterVersion", CLUSTER_VERSION)]),
        (KEY, fingerprint.count(_key_bucket(src, compacted))),
        (LEASE, _lease_bucket(src)),
        (META, sorted(etcd_meta.items())),
        (METASTORE, own()),
    ]
    out += [(name, []) for name in EMPTY_BUCKETS]
    out.sort(key=lambda bucket: bucket[0])  # b"key" < b"metastore": own() runs after the key bucket
    return out


def _key_value(key: bytes, record: bytes) -> bytes:
    create, mod, _sub, version, lease = record_header(record)
    return kv_pb2.KeyValue(key=key, create_revision=create, mod_revision=mod, version=version,
                           value=record_value(record), lease=lease).SerializeToString()


def _deleted(key: bytes) -> bytes:
    return kv_pb2.KeyValue(key=key).SerializeToString()


def _key_bucket(src: RowSource, compacted: int) -> Iterator[tuple[bytes, bytes]]:
    """Every revision in the history, in revision order.

    The `rev` table lists every change from some revision on, in order:
    compaction removes its rows from the oldest up. What is older survived
    compactions (a key's newest version at the compacted revision) and has
    no `rev` row; those are found by scanning the current records and the
    history, and sorted (after a compaction at the current revision, that is
    one small tuple per key).

    A `rev` row may outlive its record: compaction reclaims a key's whole
    history up to the compacted revision at once, while the `rev` rows go
    batch by batch, and those at the compacted revision stay. Below the
    compacted revision such a row is dropped history; at it, it is a delete
    (a put there is the version the compaction keeps)."""
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
            if main < compacted:
                continue
            if main > compacted:
                raise SchemaError(f"revision {main}.{sub} of key {key!r} is listed but not stored")
            record = TOMBSTONE
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
_U32_MAX = 0xFFFFFFFF
_OWN_U64_ROWS = (META_REVISION, META_COMPACT_REVISION, META_COMPACT_FINISHED)


class Database:
    """An etcd database read as metastore's rows.

    Made with a function that lists a bucket's items (bbolt.Reader.items);
    reads the ``key`` bucket once to learn each key's newest revision and
    to check every record, so that a file that does not convert fails here,
    with a SchemaError, before anything is written. `rows()` reads it again.
    Holds each key's newest revision in memory."""

    def __init__(self, items: Items) -> None:
        self._items = items
        etcd_meta = dict(items(META))
        self.finished = self._mark(etcd_meta, _FINISHED)
        self.compacted = self._mark(etcd_meta, _SCHEDULED) or self.finished
        self._newest: dict[bytes, bytes] = {}
        fingerprint = _Fingerprint()
        newest_main = 1
        for raw, value in fingerprint.count(items(KEY)):
            main, _sub, _delete, kv = _record(raw, value)
            self._newest[kv.key] = raw
            newest_main = max(newest_main, main)
        # etcd's own rule for the revision a restored member starts at.
        self.revision = max(newest_main, self.compacted)
        self.leases: dict[int, int] = {}
        for raw, value in items(LEASE):
            try:
                lease = lease_pb2.Lease.FromString(value)
            except Exception as exc:  # protobuf's DecodeError
                raise SchemaError(f"lease {raw.hex()}: not a leasepb.Lease ({exc})") from None
            self.leases[lease.ID] = lease.TTL
        own = dict(items(METASTORE))
        self.header: dict | None = None
        self._own_meta: dict[bytes, bytes] = {}
        if own.get(FINGERPRINT) == fingerprint.digest(etcd_meta):
            self.header = _json_object(own.get(HEADER, b"{}"))
            self._own_meta = {k[len(META_PREFIX):]: v for k, v in own.items() if k.startswith(META_PREFIX)}
            self._own_meta.pop(META_APPLIED, None)
            for name in _OWN_U64_ROWS:
                if name in self._own_meta and len(self._own_meta[name]) != 8:
                    raise SchemaError(f"metastore's {name.decode()} row is damaged")

    @staticmethod
    def _mark(etcd_meta: dict[bytes, bytes], name: bytes) -> int:
        if name not in etcd_meta:
            return 0
        return parse_revision_key(etcd_meta[name])[0]

    def rows(self) -> Iterator[Row]:
        """metastore's backend rows for this database."""
        for lease, ttl in self.leases.items():
            yield "lease", lease_key(lease), pack_ttl(ttl)
        finished = self.finished
        for raw, value in self._items(KEY):
            main, sub, delete, kv = _record(raw, value)
            newest = self._newest[kv.key] == raw
            if main >= finished:  # compaction leaves no `rev` row below its revision
                yield "rev", pack_rev(main, sub), kv.key
            if delete:
                if main > finished:  # a finished compaction drops deletes up to its revision
                    yield "hist", hist_key(kv.key, main, sub), TOMBSTONE
                continue
            record = encode_record(kv.create_revision, kv.mod_revision, sub, kv.version, kv.lease, kv.value)
            if not newest:
                yield "hist", hist_key(kv.key, main, sub), record
                continue
            yield "kv", kv.key, record
            if kv.lease and kv.lease in self.leases:
                yield "lease", attach_key(kv.lease, kv.key), b""
        if self._own_meta:
            for k, v in self._own_meta.items():
                if k not in _OWN_U64_ROWS:  # those come from etcd's buckets, below
                    yield "meta", k, v
        else:
            yield "meta", META_LAYOUT, LAYOUT_VERSION
        yield "meta", META_REVISION, pack_u64(self.revision)
        if self.compacted:
            yield "meta", META_COMPACT_REVISION, pack_u64(self.compacted)
        if self.finished:
            yield "meta", META_COMPACT_FINISHED, pack_u64(self.finished)


def _record(raw: bytes, value: bytes) -> tuple[int, int, bool, kv_pb2.KeyValue]:
    """(main, sub, is a delete, record) of one ``key`` bucket item, checked."""
    main, sub, delete = parse_revision_key(raw)
    try:
        kv = kv_pb2.KeyValue.FromString(value)
    except Exception as exc:  # protobuf's DecodeError, and anything else a damaged value raises
        raise SchemaError(f"revision {main}.{sub}: not an mvccpb.KeyValue ({exc})") from None
    if not kv.key:
        raise SchemaError(f"revision {main}.{sub}: a record without a key")
    if sub > _U32_MAX:
        raise SchemaError(f"revision {main}.{sub}: sub-revision out of range")
    if not delete and kv.mod_revision != main:
        raise SchemaError(f"revision {main}.{sub}: its record says it was written at {kv.mod_revision}")
    return main, sub, delete, kv


def _json_object(raw: bytes) -> dict:
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise SchemaError(f"metastore's snapshot header is damaged ({exc})") from None
    if not isinstance(value, dict):
        raise SchemaError("metastore's snapshot header is damaged (not an object)")
    return value
