"""Client snapshots: what `etcdctl snapshot save` receives, and restoring one.

`Maintenance.Snapshot` streams a consistent copy of one member's store as
etcd does: a bbolt database in etcd's schema (metastore.etcd_snapshot, written
by metastore.bbolt), followed by the sha256 of that database (32 bytes).
etcdctl 3.4 accepts a stream whose length is a multiple of 512 plus 32 (its
`hasChecksum` check); a bbolt file is whole pages of 4096 bytes. So etcd's
tools take a metastore snapshot for one of etcd's: `etcdctl snapshot status`
reads its hash, revision and key count, `etcdctl snapshot restore` makes an
etcd member of it.

`restore` builds a fresh metastore data dir from a snapshot, as `etcdctl
snapshot restore` does for etcd: the keys, their revisions and history are
kept, the cluster is new (its identity comes from the restore flags) and its
Raft log starts empty. It reads:
- snapshots saved from metastore (everything metastore keeps comes back:
  leases, liveness, drain, alarms, compaction marks);
- snapshots saved from etcd 3.4 or 3.5 (keys, history, leases and
  compaction marks; etcd's members, alarms and auth are not carried over);
- snapshots saved from metastore before it wrote etcd's format: its own
  row format, shaped the same way (MAGIC | u32 header length | JSON header |
  rows (metastore.rows) | zero padding to a multiple of 512 | sha256).
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
from typing import BinaryIO, Iterator

from metastore import bbolt, etcd_snapshot
from metastore import snapshot as raft_snapshot
from metastore.cluster import Membership
from metastore.config import ConfigError, ServerConfig
from metastore.fsutil import fsync_path, fsync_tree
from metastore.mvcc_layout import META_APPLIED, META_REVISION, unpack_u64
from metastore.rows import Row, RowFormatError, check_rows, read_rows as read_row_stream

MAGIC = b"METASTORE-DB-SNAPSHOT-1\n"  # the row format, read only
FORMAT_VERSION = 1
BLOCK = 512
SHA_SIZE = hashlib.sha256().digest_size  # 32

_LEN = struct.Struct("<I")
_READ_CHUNK = 1 << 20


class SnapshotError(Exception):
    """A snapshot file that cannot be restored; the message says why."""


# -- writing ---------------------------------------------------------------------
def write(path: str, header: dict, src: etcd_snapshot.RowSource) -> int:
    """Write a snapshot of the rows `src` holds to `path`: an etcd database
    and its sha256. Returns the file's size (a multiple of 4096, plus 32)."""
    size = bbolt.write(path, etcd_snapshot.buckets(src, header))
    sha = hashlib.sha256()
    with open(path, "r+b") as f:
        while chunk := f.read(_READ_CHUNK):
            sha.update(chunk)
        f.write(sha.digest())
    return size + SHA_SIZE


def revision_of(src: etcd_snapshot.RowSource) -> int:
    """The store revision `src` holds (1 for an empty store)."""
    return unpack_u64(src.get("meta", META_REVISION), 1)


# -- reading ---------------------------------------------------------------------
def _check_sha(path: str, f: BinaryIO, size: int) -> None:
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


def verify(path: str, skip_hash_check: bool = False) -> dict:
    """Check that `path` is an intact snapshot and return its header (for
    an etcd snapshot, one made up from the file: its revision). Raises
    SnapshotError, with a message a person can act on, for a damaged file
    (sha256 mismatch, broken pages) or a file that is not one.

    `skip_hash_check` (etcdctl's flag of that name) accepts a database
    without the sha256 after it, such as etcd's `member/snap/db` copied
    from a data dir."""
    try:
        size = os.path.getsize(path)
        f = open(path, "rb")
    except OSError as exc:
        raise SnapshotError(f"cannot read snapshot {path}: {exc.strerror or exc}") from None
    with f:
        has_sha = size % BLOCK == SHA_SIZE and size > SHA_SIZE
        if not has_sha and not skip_hash_check:
            raise SnapshotError(
                f"{path} is not a snapshot saved by `etcdctl snapshot save`: its size ({size} bytes) is not "
                f"a multiple of {BLOCK} followed by a {SHA_SIZE}-byte sha256 (a database copied from a data "
                f"dir has none: pass --skip-hash-check)")
        if has_sha and not skip_hash_check:
            _check_sha(path, f, size)
        f.seek(0)
        if f.read(len(MAGIC)) == MAGIC:
            return _verify_rows(path, f, size)
    if not bbolt.is_bbolt(path):
        raise SnapshotError(f"{path} has a valid checksum but is not a snapshot (neither an etcd database "
                            f"nor metastore's own format)" if has_sha and not skip_hash_check
                            else f"{path} is not a snapshot (neither an etcd database nor metastore's own format)")
    try:
        with bbolt.Reader(path, size - SHA_SIZE if has_sha else size) as db:
            # Every page and every record once: a database that is damaged
            # or does not convert is refused before anything is written.
            for name in db.buckets():
                for _item in db.items(name):
                    pass
            return _header(etcd_snapshot.Database(db.items))
    except (bbolt.BoltError, etcd_snapshot.SchemaError) as exc:
        raise SnapshotError(f"{path}: {exc}") from None


def _header(db: etcd_snapshot.Database) -> dict:
    """The header of an etcd-format snapshot: metastore's, or for one etcd
    took (or wrote to since), one that says so."""
    header = dict(db.header) if db.header is not None else {"source": "etcd"}
    header["revision"] = db.revision
    return header


def _verify_rows(path: str, f: BinaryIO, size: int) -> dict:
    """The rest of verify() for a file in metastore's old row format."""
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
    """The header at the start of an old-format snapshot file `f`."""
    if f.read(len(MAGIC)) != MAGIC:
        raise SnapshotError(f"{path} is not a metastore snapshot in the row format")
    try:
        (length,) = _LEN.unpack(f.read(_LEN.size))
        return json.loads(f.read(length))
    except (struct.error, ValueError) as exc:
        raise SnapshotError(f"{path}: unreadable snapshot header ({exc})") from None


def header(path: str) -> dict:
    """A saved snapshot's header, read without checking the whole file:
    who took it and at which revision (an etcd snapshot has only its
    revision)."""
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) == MAGIC:
            f.seek(0)
            return read_header(f, path)
    try:
        with _open_database(path) as db:
            return _header(etcd_snapshot.Database(db.items))
    except (bbolt.BoltError, etcd_snapshot.SchemaError) as exc:
        raise SnapshotError(f"{path}: {exc}") from None


def _open_database(path: str) -> bbolt.Reader:
    """The etcd database of a snapshot `verify` accepted (the sha256 after
    it, if there is one, is not part of it)."""
    size = os.path.getsize(path)
    return bbolt.Reader(path, size - SHA_SIZE if size % BLOCK == SHA_SIZE else size)


def read_rows(path: str) -> Iterator[Row]:
    """The rows of a snapshot `verify` accepted, streamed from the file."""
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) == MAGIC:
            (length,) = _LEN.unpack(f.read(_LEN.size))
            f.seek(length, os.SEEK_CUR)
            yield from read_row_stream(f)
            return
    with _open_database(path) as db:
        yield from etcd_snapshot.Database(db.items).rows()


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


def restore(path: str, cfg: ServerConfig, skip_hash_check: bool = False) -> dict:
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
    header = verify(path, skip_hash_check)
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
    if "member_id" not in header:
        return f"revision {header.get('revision', '?')}, saved from etcd"
    when = header.get("created")
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(when)) + " UTC" if when else "unknown time"
    return (f"revision {header.get('revision', '?')}, taken from member {header.get('member_id', '?')} "
            f"of cluster {header.get('cluster_id', '?')} at {stamp}")
