"""Raft snapshots of a member's state machine (the Store plus the member table).

pysyncobj compacts its log by asking for a snapshot file and, on a follower
too far behind, ships that file and loads it there. The state is frozen on
the applier thread right after the entry at the snapshot's index, where
nothing else is applied meanwhile, so the copy is consistent; freezing is
quick (later entries wait for it), and writing the file from the frozen copy
runs in the background (`PendingSnapshot`).

The body comes in one of two formats, named in the header:
- ``rows``: every backend row, streamed (the memory engine, from a frozen
  copy of its tables that shares the rows' bytes);
- ``rocksdb-checkpoint``: the files of a RocksDB checkpoint (hard links, made
  in milliseconds), packed one after the other.
Either format loads into either engine: members of one cluster may run
different engines, and a checkpoint received by a memory member is read row
by row.

File: MAGIC | u32 header length | pickled header | body.
rows body: metastore.rows' row stream.
checkpoint body: (u16 name length | u64 size | name | content)* | u16 0.
"""
from __future__ import annotations

import os
import pickle
import shutil
import struct
import time
from typing import Any, BinaryIO, Callable, Iterable, Protocol

from metastore.backend import TABLES
from metastore.cluster import Membership
from metastore.fsutil import datasync, fsync_tree
from metastore.rows import Row, RowFormatError, check_rows, read_rows, write_rows
from metastore.store import Store

MAGIC = b"METASTORE-SNAPSHOT-2\n"
ROWS = "rows"
CHECKPOINT = "rocksdb-checkpoint"

_LEN = struct.Struct("<I")
_FILE = struct.Struct("<HQ")
_COPY_CHUNK = 1 << 20

# How long a snapshot being written waits at a time for a long apply.
MAX_YIELD_SECONDS = 1.0
# A snapshot file is made durable every this many bytes while it is written,
# not only at the end. Every member writes its snapshot at about the same
# time, and one fsync of the whole file (hundreds of MB for the memory
# engine after etcdctl check perf's writes) kept the disk busy long enough
# to hold the Raft journals' fsyncs -- and so every commit in the cluster --
# ~0.6 s behind it: that was the slowest request of check perf --load=l.
SYNC_EVERY = 8 << 20


class _Writable(Protocol):
    def write(self, data: bytes, /) -> object: ...


class _SteadyWriter:
    """A file's write() that syncs what it wrote every SYNC_EVERY bytes
    (see SYNC_EVERY), so that little is left for the final fsync."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._unsynced = 0

    def write(self, data: bytes) -> None:
        self._f.write(data)
        self._unsynced += len(data)
        if self._unsynced >= SYNC_EVERY:
            self._f.flush()
            datasync(self._f.fileno())
            self._unsynced = 0


class PendingSnapshot:
    """A snapshot frozen at one applied index, not yet written to its file.

    Freezing is quick and runs on the applier thread, between two applies, so
    the copy is consistent: the memory engine copies its sorted key lists
    and keeps the old row of whatever changes until the copy is written, the
    RocksDB engine makes a checkpoint (hard links). Writing the file -- the
    slow part, proportional to the data -- then runs on any thread while
    Raft goes on (raft.node runs it in the background)."""

    def __init__(self, header: dict[str, Any], rows: Iterable[Row] | None, checkpoint_dir: str | None,
                 busy: Callable[[], bool] | None = None) -> None:
        self._header = header
        self._rows = rows
        self._checkpoint_dir = checkpoint_dir
        self._busy = busy
        self._cpu_at_pause = 0.0  # this thread's CPU time at the last pause

    def write(self, path: str) -> None:
        """Write the file at `path` and fsync it (the caller renames it into place)."""
        try:
            header = pickle.dumps(self._header)
            with open(path, "wb") as f:
                f.write(MAGIC)
                f.write(_LEN.pack(len(header)))
                f.write(header)
                out = _SteadyWriter(f)
                if self._checkpoint_dir is not None:
                    _pack_dir(out, self._checkpoint_dir)
                else:
                    assert self._rows is not None
                    self._cpu_at_pause = time.thread_time()
                    write_rows(out.write, self._rows, pause=self._pause)
                f.flush()
                os.fsync(f.fileno())
        finally:
            self._discard()

    def _discard(self) -> None:
        """Drop what the frozen copy holds (a checkpoint's hard links; the
        old rows the memory engine keeps for it)."""
        rows, self._rows = self._rows, None
        close = getattr(rows, "close", None)
        if close is not None:
            close()
        if self._checkpoint_dir is not None:
            shutil.rmtree(self._checkpoint_dir, ignore_errors=True)

    def _pause(self) -> None:
        """Between two chunks of rows: rest as long as the chunk took, and,
        while `busy` (an entry has been applying for a while, e.g. the
        DeleteRange that follows etcdctl check perf, all of whose writes
        made the snapshot due), step aside for it: a client waits for that
        apply, nobody for the snapshot. At most a second at a time, so a
        stream of long applies still lets the snapshot progress.

        Resting keeps the writer to about half a core: every member writes
        its snapshot at once, and three writers at full speed took most of
        a 2-core machine from the requests for a couple of seconds (check
        perf --load=l, memory engine: slowest request 415-476 ms with a
        0.1 ms pause, 327-515 ms with this; the 1M-key snapshot of
        bench/scale.py still peaks at ~900 MiB). Without `busy` (no member
        runs beside it: snapshot restore, tests) it only lets go of the GIL."""
        if self._busy is None:
            time.sleep(0.0001)
            return
        spent = time.thread_time() - self._cpu_at_pause
        time.sleep(max(0.0001, spent))
        self._cpu_at_pause = time.thread_time()
        waited = 0.0
        while waited < MAX_YIELD_SECONDS and self._busy():
            time.sleep(0.005)
            waited += 0.005


def freeze(staging: str, store: Store, membership: Membership, raft_data: Any,
           busy: Callable[[], bool] | None = None) -> PendingSnapshot:
    """Freeze the state for a snapshot (applier thread: nothing is applied
    meanwhile). `staging` is a scratch path for a RocksDB checkpoint;
    `busy` says when writing the rows should step aside (PendingSnapshot)."""
    shutil.rmtree(staging, ignore_errors=True)
    rows = store.frozen_copy(staging)
    header = {"format": ROWS if rows is not None else CHECKPOINT, "raft_data": raft_data,
              "members": membership.export(), "revision": store.revision, "applied": store.applied_position}
    return PendingSnapshot(header, rows, None if rows is not None else staging, busy)


def save(path: str, store: Store, membership: Membership, raft_data: Any) -> None:
    """Freeze and write in one go (snapshot restore, tests); fsynced on return."""
    freeze(path + ".checkpoint", store, membership, raft_data).write(path)


def load(path: str, store: Store, membership: Membership) -> Any:
    """Load a snapshot into the store (unless the store, being persistent,
    already holds everything it covers); returns pysyncobj's raft data."""
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise RuntimeError(f"{path} is not a metastore snapshot")
        (length,) = _LEN.unpack(f.read(_LEN.size))
        header = pickle.loads(f.read(length))
        raft_data = header["raft_data"]
        snapshot_index = raft_data[0][1]
        membership.restore(header["members"])
        # A persistent engine that already holds all of it (not just part of
        # the snapshot's last entry: its requests are written one by one) is
        # left alone. Its newest writes may still be only in memory (RocksDB
        # without its WAL): a crash then reopens it behind the snapshot, and
        # the next load installs the snapshot.
        # (A restored snapshot records applied (0, 0) for all its rows: the
        # index counts too.)
        if store.applied_position >= tuple(header["applied"]) and store.applied_position[0] >= snapshot_index:
            return raft_data
        if header["format"] == ROWS:
            body = f.tell()
            try:
                check_rows(f, os.fstat(f.fileno()).st_size)  # a damaged file leaves the store as it was
            except RowFormatError as exc:
                raise RuntimeError(f"snapshot {path}: {exc}") from None
            f.seek(body)
            store.import_items(read_rows(f))
        else:
            staging = path + ".unpacked"
            shutil.rmtree(staging, ignore_errors=True)
            try:
                _unpack_dir(f, staging, path)
                if not store.install_checkpoint(staging):
                    _import_checkpoint_rows(store, staging)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return raft_data


# -- checkpoint files -----------------------------------------------------------------
def _pack_dir(f: _Writable, root: str) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root).encode()
            with open(full, "rb") as src:
                size = os.fstat(src.fileno()).st_size
                f.write(_FILE.pack(len(rel), size))
                f.write(rel)
                _copy(src, f, size, full)
    f.write(_FILE.pack(0, 0))


def _unpack_dir(f: BinaryIO, root: str, path: str) -> None:
    """Recreate the packed files under `root`, durably."""
    os.makedirs(root)
    base = os.path.realpath(root)
    while True:
        head = f.read(_FILE.size)
        if len(head) != _FILE.size:
            raise RuntimeError(f"snapshot {path} is truncated")
        name_len, size = _FILE.unpack(head)
        if name_len == 0:
            break
        rel = f.read(name_len).decode()
        target = os.path.realpath(os.path.join(root, rel))
        if os.path.isabs(rel) or not target.startswith(base + os.sep):
            raise RuntimeError(f"snapshot {path} names a file outside its directory: {rel!r}")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as out:
            _copy(f, out, size, path)
    fsync_tree(root)  # RocksDB takes these files over as its database


def _copy(src: BinaryIO, dst: _Writable, size: int, name: str) -> None:
    left = size
    while left:
        chunk = src.read(min(left, _COPY_CHUNK))
        if not chunk:
            raise RuntimeError(f"{name} ended early (truncated snapshot or file)")
        dst.write(chunk)
        left -= len(chunk)


def _import_checkpoint_rows(store: Store, checkpoint_dir: str) -> None:
    """A RocksDB checkpoint loaded into an engine that cannot adopt it."""
    from metastore.engines.rocksdb import RocksDBBackend

    backend = RocksDBBackend(checkpoint_dir)
    try:
        store.import_items((table, k, v) for table in TABLES for k, v in backend.scan(table, b"", None))
    finally:
        backend.close()
