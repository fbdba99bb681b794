"""Client snapshots: what `etcdctl snapshot save` receives, and restoring one.

`Maintenance.Snapshot` streams a consistent copy of one member's store.
etcdctl 3.4 saves whatever bytes arrive but accepts the stream only if its
length is a multiple of 512 plus 32 (etcd sends a bbolt file, whose size is a
multiple of its page size, followed by the sha256 of that file; etcdctl's
`hasChecksum` checks exactly `size % 512 == 32`). metastore's store is not a
bbolt file, so the payload is metastore's own format, shaped the same way:

    MAGIC | u32 header length | JSON header
    | rows: (u8 table | u32 key length | u32 value length | key | value)* | 0xFF
    | zero padding up to a multiple of 512
    | sha256 of everything before it (32 bytes)

(lengths little-endian; tables numbered as in `metastore.backend.TABLES`,
like `metastore.snapshot`'s row format). Every backend row is included --
keys, history, leases, alarms, revision and compaction marks -- so a store
rebuilt from it answers every read the source member answered at that point.
`etcdctl snapshot status` opens the file as a bbolt database and therefore
fails on it; `metastore snapshot restore` is the tool that reads it.

`restore` builds a fresh data dir from such a file, as `etcdctl snapshot
restore` does for etcd: the keys, their revisions and history are kept, the
cluster is new (its identity comes from the restore flags) and its Raft log
starts empty.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import struct
import tempfile
import time
from types import SimpleNamespace
from typing import BinaryIO, Iterable, Iterator

from metastore import snapshot as raft_snapshot
from metastore.cluster import Membership
from metastore.config import ConfigError, ServerConfig
from metastore.fsutil import fsync_path, fsync_tree
from metastore.mvcc_layout import META_APPLIED, META_REVISION, unpack_u64
from metastore.rows import Row, RowFormatError, check_rows, read_rows as read_row_stream, write_rows

MAGIC = b"METASTORE-DB-SNAPSHOT-1\n"
FORMAT_VERSION = 1
BLOCK = 512
SHA_SIZE = hashlib.sha256().digest_size  # 32

_LEN = struct.Struct("<I")
_READ_CHUNK = 1 << 20



class SnapshotError(Exception):
    """A snapshot file that cannot be restored; the message says why."""


# -- writing ---------------------------------------------------------------------
class _HashingWriter:
    """Writes to a file while hashing and counting what was written."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self._f.write(data)
        self.sha.update(data)
        self.size += len(data)


def write(path: str, header: dict, rows: Iterable[Row]) -> int:
    """Write a snapshot of `rows` to `path`; returns its size in bytes
    (a multiple of 512, plus the 32-byte sha256)."""
    head = json.dumps(dict(header, format_version=FORMAT_VERSION), sort_keys=True).encode()
    with open(path, "wb") as f:
        w = _HashingWriter(f)
        w.write(MAGIC)
        w.write(_LEN.pack(len(head)))
        w.write(head)
        write_rows(w.write, rows)
        pad = -w.size % BLOCK
        if pad:
            w.write(bytes(pad))
        f.write(w.sha.digest())
        return w.size + SHA_SIZE


def revision_of(rows: Iterable[Row]) -> int:
    """The store revision recorded in a copy's rows (1 for an empty store)."""
    for table, key, value in rows:
        if table == "meta" and key == META_REVISION:
            return unpack_u64(value, 1)
    return 1


# -- reading ---------------------------------------------------------------------
def verify(path: str) -> dict:
    """Check that `path` is an intact metastore snapshot and return its
    header. Raises SnapshotError, with a message a person can act on, for a
    damaged file (sha256 mismatch) or a file that is not one (an etcd bbolt
    snapshot, anything else)."""
    try:
        size = os.path.getsize(path)
        f = open(path, "rb")
    except OSError as exc:
        raise SnapshotError(f"cannot read snapshot {path}: {exc.strerror or exc}") from None
    with f:
        if size < BLOCK + SHA_SIZE or size % BLOCK != SHA_SIZE:
            raise SnapshotError(
                f"{path} is not a snapshot saved by `etcdctl snapshot save` from metastore: its size "
                f"({size} bytes) is not a multiple of {BLOCK} followed by a {SHA_SIZE}-byte sha256")
        sha = hashlib.sha256()
        left = size - SHA_SIZE
        while left:
            chunk = f.read(min(left, _READ_CHUNK))
            if not chunk:
                raise SnapshotError(f"{path} was truncated while being read")
            sha.update(chunk)
            left -= len(chunk)
        expected = f.read(SHA_SIZE)
        if sha.digest() != expected:
            raise SnapshotError(
                f"{path} is damaged: sha256 checksum mismatch (the file says {expected.hex()}, its "
                f"content hashes to {sha.hexdigest()}); nothing was restored")
        f.seek(0)
        header = read_header(f, path)
        if header.get("format_version") != FORMAT_VERSION:
            raise SnapshotError(f"{path}: snapshot format version {header.get('format_version')!r} is not "
                                f"supported by this build (it reads version {FORMAT_VERSION})")
        # Walk the rows by their lengths (no data kept) to the end mark, so a
        # well-hashed but malformed body is refused before anything is written.
        body_end = size - SHA_SIZE
        try:
            check_rows(f, body_end)
        except RowFormatError as exc:
            raise SnapshotError(f"{path}: {exc}") from None
        if f.tell() > body_end or any(f.read(body_end - f.tell())):
            raise SnapshotError(f"{path}: unexpected bytes after the rows")
        return header


def read_header(f: BinaryIO, path: str) -> dict:
    """The header at the start of snapshot file `f` (only the header is read;
    `verify` checks the whole file)."""
    if f.read(len(MAGIC)) != MAGIC:
        raise SnapshotError(
            f"{path} has a valid checksum but is not a metastore snapshot (an etcd snapshot is a "
            f"bbolt database: restore it with etcd's own tools)")
    try:
        (length,) = _LEN.unpack(f.read(_LEN.size))
        return json.loads(f.read(length))
    except (struct.error, ValueError) as exc:
        raise SnapshotError(f"{path}: unreadable snapshot header ({exc})") from None


def read_rows(path: str) -> Iterator[Row]:
    """The rows of a snapshot `verify` accepted, streamed from the file."""
    with open(path, "rb") as f:
        f.seek(len(MAGIC))
        (length,) = _LEN.unpack(f.read(_LEN.size))
        f.seek(length, os.SEEK_CUR)
        yield from read_row_stream(f)


# -- restore ---------------------------------------------------------------------
def _initial_raft_data(membership: Membership) -> tuple:
    """pysyncobj's part of a Raft snapshot for a cluster whose log is new:
    (last entry, the entry before it, cluster nodes), entries being
    (command, index, term). Two no-op entries at indexes 1 and 2, term 0,
    identical on every member restored from the same file, so their logs
    agree from the start; the store's content comes with the snapshot."""
    from pysyncobj.node import TCPNode
    from pysyncobj.syncobj import _COMMAND_TYPE

    noop = struct.pack("B", _COMMAND_TYPE.NO_OP)
    nodes = {TCPNode(m.raft_address) for m in membership.members()}
    return ((noop, 2, 0), (noop, 1, 0), nodes)


def restore(path: str, cfg: ServerConfig) -> dict:
    """Build `cfg.data_dir` from the snapshot at `path` for a new cluster
    (`cfg`: name, initial cluster, token, advertised peer URLs, engine), from
    which `metastore serve` with the same flags starts holding the snapshot's
    keys at their revisions. Returns the snapshot's header.

    Nothing is written unless the file checks out, and the target must be
    absent or empty. The data dir is assembled next to the target and
    renamed into place at the end, so a failure leaves no half-restored
    directory behind. What goes in:
    - `metastore.json`, the marker naming engine, member and cluster, exactly
      as the member writes it on a fresh start;
    - the rows, minus the source member's applied Raft position (the new log
      starts again at 1: an old position would make the new member skip its
      first entries);
    - memory engine: `member/raft.snapshot`, the Raft snapshot a memory
      member loads its store from when it starts;
      RocksDB engine: the database under `rocksdb/` (no Raft snapshot needed).
    """
    from metastore.engines import open_store
    from metastore.node import Node

    try:
        cfg = cfg.resolved()
    except ConfigError as exc:
        raise SnapshotError(str(exc)) from None
    header = verify(path)
    target = os.path.abspath(cfg.data_dir)
    if os.path.lexists(target) and (not os.path.isdir(target) or os.listdir(target)):
        raise SnapshotError(f"data dir {cfg.data_dir} already exists and is not empty; restore into a new "
                            f"directory (refusing to overwrite a member's data)")
    membership = Membership(cfg.initial_cluster_token, cfg.initial_members())
    me = next(m for m in membership.members() if m.name == cfg.name)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=os.path.basename(target) + ".restoring-", dir=parent)
    try:
        staged = dataclasses.replace(cfg, data_dir=staging)
        # The marker is written by the very code a starting member checks it
        # with, so the two can never disagree on its fields.
        Node._prepare_data_dir(SimpleNamespace(cfg=staged, member_id=me.id,  # type: ignore[arg-type]
                                               cluster_id=membership.cluster_id))
        store = open_store(cfg.engine, staging, me.id)
        try:
            store.import_items(row for row in read_rows(path)
                               if not (row[0] == "meta" and row[1] == META_APPLIED))
            if cfg.engine == "memory":
                raft_snapshot.save(os.path.join(staged.member_dir, "raft.snapshot"), store, membership,
                                   _initial_raft_data(membership))
        finally:
            store.close()
        fsync_tree(staging)
        if os.path.isdir(target):
            os.rmdir(target)  # empty (checked above)
        os.rename(staging, target)
        fsync_path(parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return header


def describe(header: dict) -> str:
    """One line about a snapshot, for the restore command's output."""
    when = header.get("created")
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(when)) + " UTC" if when else "unknown time"
    return (f"revision {header.get('revision', '?')}, taken from member {header.get('member_id', '?')} "
            f"of cluster {header.get('cluster_id', '?')} at {stamp}")
