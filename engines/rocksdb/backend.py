"""RocksDBBackend: the Backend tables as column families of one RocksDB.

One column family per table of `metastore.backend.TABLES`, all in raw mode
(bytes in, bytes out). A `WriteBatch` of the store becomes one RocksDB write
batch, which RocksDB applies atomically across column families, so a crash
never leaves `kv` at one revision and `meta` at another. Only a big batch's
`ahead` rows (history no read reaches yet, see WriteBatch) are written before
it, in writes of their own.

Durability: with the WAL on (`wal`, the default), a killed process never
loses a batch that `write` returned for; whether each write is also fsynced
is the `sync` flag. A member runs with the WAL off (`wal=False`): the Raft
journal, fsynced before a request is acknowledged, already holds every
request, and after a restart the requests past the store's applied position
are applied again from it (a Raft snapshot's checkpoint flushes the
memtables first, so the journal always reaches back far enough). The
WAL would write every byte a second time -- 3x the data for a big
DeleteRange, where it cost a 3-member cluster on one disk a third of the
apply time. Without it a crash loses the writes since RocksDB's last flush,
never part of one: atomic flush persists every column family at the same
batch, so the store reopens at an earlier applied position, consistently --
what an unsynced WAL lost to a power cut leaves, too. close() flushes.

Threading: MVCCStore serializes writes and never writes while it iterates.
The maintenance calls (`compact`, `checkpoint`) may come from other threads;
they exclude `close` but not reads or writes (RocksDB allows both meanwhile).
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import threading
import time
import weakref
from typing import Iterable, Iterator

from rocksdict import (
    BottommostLevelCompaction,
    Checkpoint,
    CompactOptions,
    Options,
    Rdict,
    ReadOptions,
    WriteBatch as RocksBatch,
    WriteOptions,
)

from metastore.backend import TABLES, RangeEnd, WriteBatch
from metastore.engines.rocksdb.marker import (
    ROCKSDB_CURRENT,
    ForeignDirectoryError,
    has_marker,
    prepare_dir,
    write_marker,
)
from metastore.engines.rocksdb.options import open_options
from metastore.fsutil import fsync_path, fsync_tree

# rocksdict holds the interpreter lock through a whole write (measured: 0.7 s
# for 300k ops), so while a huge batch is written no other thread of the
# member runs -- not Raft's heartbeats either. A batch's `ahead` puts bigger
# than this go in writes of their own of about this size (a few ms each).
AHEAD_CHUNK_BYTES = 1 << 20
AHEAD_CHUNK_OPS = 5000
AHEAD_INLINE_OPS = 1000  # up to this many ops in all: one write, as usual
# size() reads RocksDB's figures at most this often (seconds).
SIZE_REFRESH = 0.1

_INCOMING = ".incoming"  # a checkpoint being moved into place
_REPLACED = ".replaced"  # the database a checkpoint replaces, until deleted

_Item = tuple[bytes, bytes]


class BackendClosedError(RuntimeError):
    """The backend was used after close()."""


class _Tables(dict):
    """Table name -> column family; a miss names the real problem: an unknown
    table, or a backend that was closed (the map is emptied then)."""

    closed = False

    def __missing__(self, name: str):
        if self.closed:
            raise BackendClosedError("RocksDB backend is closed")
        raise KeyError(f"unknown table {name!r}")


class RocksDBBackend:
    """The Backend protocol (metastore.backend.Backend) on RocksDB."""

    # A RangeEnd op is one RocksDB range deletion (instead of a delete per key).
    deletes_ranges = True

    def __init__(self, path: str, *, sync: bool = False, wal: bool = True) -> None:
        if sync and not wal:
            raise ValueError("sync needs the WAL: there is nothing to fsync without it")
        path = os.path.abspath(path)
        _finish_swap(path)
        create = prepare_dir(path)
        names = list(TABLES)
        if not create:
            # RocksDB refuses to open a database without naming every column
            # family it holds: open any a newer build added, too.
            known = set(names) | {"default"}
            names += [n for n in Rdict.list_cf(path, Options(raw_mode=True)) if n not in known]
        opts, cf_opts = open_options(names)
        opts.create_if_missing(create)
        self._path = path
        self._sync = sync
        self._db = Rdict(path, opts, column_families=cf_opts)
        self._cfs: _Tables = _Tables({name: self._db.get_column_family(name) for name in TABLES})
        self._handles: _Tables = _Tables({name: self._db.get_column_family_handle(name) for name in TABLES})
        self._wo = WriteOptions()
        self._wo.sync = sync  # a property in rocksdict, not a method
        self._wo.disable_wal = not wal
        self._wal = wal
        # Open iterators keep the database open (and its LOCK held) after
        # close(); close() ends the ones still alive.
        self._scans: weakref.WeakSet[Iterator[_Item]] = weakref.WeakSet()
        # compact() and checkpoint() (long, GIL released) run side by side --
        # a Raft snapshot's checkpoint must not wait behind the full
        # compaction that follows an MVCC compaction -- and close() waits
        # until neither runs.
        self._admin = _SharedUse()
        # What write() put into the memtables since RocksDB last flushed,
        # for size(): RocksDB reports memtable memory in arena blocks of
        # about 1 MB, far too coarse to show a single write.
        self._acct = threading.Lock()
        self._mem_entries = 0
        self._mem_bytes = 0
        # RocksDB's own figures for size(), and when to read them again.
        self._sst = (0, 0)
        self._props_due = 0.0
        self._closed = False

    # -- Backend protocol ---------------------------------------------------------
    def get(self, table: str, key: bytes) -> bytes | None:
        return self._cfs[table].get(key)

    def scan(self, table: str, start: bytes, end: bytes | None, reverse: bool = False) -> Iterator[_Item]:
        """Items with start <= key < end in key order (descending if reverse).

        The iterator is created here, so the scan reads the database as of
        this call. Two rocksdict 0.3.29 traps shape this:
        - set_iterate_lower_bound is broken (it sets the upper bound), so the
          lower end comes from seeking to `start` (forward) or from stopping
          below it (reverse);
        - the iterator keeps only a pointer to the upper bound: once the
          ReadOptions or the bound's bytes are freed, a later step reads
          garbage and the scan ends early. The generator holds both for as
          long as the iterator lives.
        """
        cf = self._cfs[table]
        if end is not None and end <= start:
            return iter(())
        ro = ReadOptions()
        if end is not None:
            ro.set_iterate_upper_bound(end)
        if reverse:
            # Seeking to the last key honours the upper bound: the walk
            # starts at the greatest key < end.
            gen = _down_to(cf.items(backwards=True, read_opt=ro), start, (ro, end))
        else:
            gen = _all(cf.items(from_key=start, read_opt=ro), (ro, end))
        self._scans.add(gen)
        return gen

    def scan_ranges(self, table: str, ranges: Iterable[tuple[bytes, bytes]]) -> Iterator[list[_Item]]:
        """metastore.backend.scan_ranges on RocksDB: an iterator per range
        made straight from the binding (~10 us here against ~17 for scan()).
        Each has the range's end as its upper bound: one iterator sought
        from range to range would be cheaper still, but with nothing to
        stop it a seek into deleted rows walks every tombstone up to the
        next live row -- after a compaction dropped the history of 100k
        keys, that made compacting again quadratic."""
        gen = _each_range(self._cfs[table], ranges)
        self._scans.add(gen)
        return gen

    def write(self, batch: WriteBatch) -> None:
        """Apply the batch: its ops in one atomic RocksDB write, after its
        `ahead` puts (in the same write when the batch is small; else in
        writes of at most about AHEAD_CHUNK_BYTES or AHEAD_CHUNK_OPS, see
        WriteBatch)."""
        if len(batch) <= AHEAD_INLINE_OPS:
            self._write_ops(batch.all_ops())
            return
        # One pass over the ahead rows, each chunk's RocksDB batch built as
        # it is sized: a DeleteRange of 200k keys puts 600k rows ahead.
        rb = RocksBatch(raw_mode=True)
        put = rb.put
        count = size = 0
        for table, rows in batch.ahead.items():
            handle = self._handles[table]
            for key, value in rows:
                put(key, value, handle)
                count += 1
                size += len(key) + len(value)  # cheaper than asking the batch
                if count >= AHEAD_CHUNK_OPS or size >= AHEAD_CHUNK_BYTES:
                    self._write_batch(rb, count)
                    rb, count, size = RocksBatch(raw_mode=True), 0, 0
                    put = rb.put
        if count:
            self._write_batch(rb, count)
        self._write_ops(batch.ops)

    def _write_ops(self, ops: list[tuple[str, bytes, bytes | None]]) -> None:
        """One atomic RocksDB write. Resolving the tables while building
        means a bad table name fails before anything is written."""
        if not ops:
            return
        rb = RocksBatch(raw_mode=True)
        handles = self._handles
        for table, key, value in ops:
            if value is None:
                rb.delete(key, handles[table])
            elif value.__class__ is RangeEnd:
                rb.delete_range(key, bytes(value), handles[table])
            else:
                rb.put(key, value, handles[table])
        self._write_batch(rb, len(ops))

    def _write_batch(self, rb: RocksBatch, count: int) -> None:
        nbytes = rb.size_in_bytes()  # before write(): it consumes the batch
        self._db.write(rb, self._wo)
        with self._acct:
            self._mem_entries += count
            self._mem_bytes += nbytes

    def size(self) -> tuple[int, int]:
        """(bytes occupied, bytes in use), summed over every column family.

        Occupied: the SST files plus what the memtables hold (the same bytes
        are in the WAL on disk). In use: RocksDB's estimate of live SST data
        plus the memtables. Deleted and overwritten data stops counting as
        in use once compaction drops it (see compact()).

        RocksDB's figures are read at most every SIZE_REFRESH seconds (and
        after every flush or compaction asked here): reading them costs ~20
        us, and the quota check asks on every Put. Between readings the
        memtable bytes come from write()'s own count, so what is written
        still shows at once.
        """
        with self._acct:
            self._check_open()
            now = time.monotonic()
            if now >= self._props_due:
                self._sst, mem_entries = self._read_props()
                self._props_due = now + SIZE_REFRESH
                if mem_entries < self._mem_entries:
                    # Some of what we wrote was flushed to SST files (and
                    # counts there now): keep the unflushed share.
                    self._mem_bytes = self._mem_bytes * mem_entries // self._mem_entries
                    self._mem_entries = mem_entries
            sst, live = self._sst
            mem = self._mem_bytes
        occupied = sst + mem
        return occupied, min(live + mem, occupied)

    def _read_props(self) -> tuple[tuple[int, int], int]:
        """((SST bytes, live SST bytes), memtable entries) as RocksDB reports them."""
        sst = live = mem_entries = 0
        for cf in (self._db, *self._cfs.values()):
            sst += _prop(cf, "rocksdb.total-sst-files-size")
            live += _prop(cf, "rocksdb.estimate-live-data-size")
            mem_entries += _prop(cf, "rocksdb.num-entries-active-mem-table")
            mem_entries += _prop(cf, "rocksdb.num-entries-imm-mem-tables")
        return (sst, live), mem_entries

    def close(self) -> None:
        """Release the database (and its LOCK file) so it can be opened again,
        in this process or another. Idempotent."""
        self._close(flush=True)

    def _close(self, flush: bool) -> None:
        with self._admin.exclusive(), self._acct:
            if self._closed:
                return
            self._closed = True
            if flush and not self._wal:
                self._flush_all()  # what only the memtables hold
            for gen in list(self._scans):
                try:
                    gen.close()  # type: ignore[attr-defined]
                except ValueError:  # running in another thread: nothing to do
                    pass
            cfs = list(self._cfs.values())
            for table in (self._cfs, self._handles):
                table.clear()
                table.closed = True
            for cf in cfs:
                cf.close()
            del cfs
            self._db.close()

    # -- maintenance ------------------------------------------------------------------
    @property
    def path(self) -> str:
        return self._path

    @property
    def sync(self) -> bool:
        return self._sync

    def compact(self, tables: Iterable[str] | None = None) -> None:
        """Full manual compaction of `tables` (default: every table): flush the
        memtables and rewrite every level, dropping deleted and overwritten
        data. This is how space freed by an MVCC compaction or a defragment
        is actually given back; RocksDB alone would do it only when enough
        new data arrives to trigger its own compactions. Reads and writes
        continue meanwhile (the GIL is released)."""
        names = list(TABLES if tables is None else tables)
        with self._admin.shared():
            self._check_open()
            cfs = [self._cfs[name] for name in names]
            # Flush every table, not just these: cheap, and with the
            # memtables empty size() counts exactly again.
            self._flush_all()
            opts = CompactOptions()
            opts.set_bottommost_level_compaction(BottommostLevelCompaction.force())
            for cf in cfs:
                cf.compact_range(None, None, opts)
            self._size_changed()

    def flush_memtables(self) -> None:
        """Flush every memtable, all tables at once. A checkpoint flushes
        the memtables itself, on its caller's thread, for as long as that
        takes (~100 ms for 60k puts here, more on a busy machine): asked a
        little ahead of one (on a thread of its own), this leaves it little
        to flush."""
        with self._admin.shared():
            self._check_open()
            self._flush_all()
            self._size_changed()

    def _size_changed(self) -> None:
        """The next size() reads RocksDB's figures again (after a flush or a
        compaction asked here). Under the lock: a size() running meanwhile
        must not set the next reading later again after reading old figures."""
        with self._acct:
            self._props_due = 0.0

    def _flush_all(self) -> None:
        """One atomic flush of every table. RocksDB's own flushes, a
        checkpoint's and a manual compaction's flush every column family
        together (atomic flush), but the binding's flush() of one family
        flushes that family alone: without the WAL, a crash after it would
        reopen `meta` at one batch and `kv` at another. A compaction of the
        default family (empty: no table lives there) is how the binding
        asks for the atomic flush."""
        self._db.compact_range(None, None)

    def checkpoint(self, target_dir: str) -> None:
        """A consistent copy of the whole database in `target_dir` (which must
        not exist yet), made of hard links where the filesystem allows, and
        openable as a RocksDBBackend (it carries the engine marker)."""
        target = os.path.abspath(target_dir)
        with self._admin.shared():
            self._check_open()
            if os.path.lexists(target):
                raise FileExistsError(f"checkpoint target {target} already exists")
            Checkpoint(self._db).create_checkpoint(target)
            self._size_changed()  # it flushed the memtables
            write_marker(target)

    def replace_with_checkpoint(self, checkpoint_dir: str) -> "RocksDBBackend":
        """Close this backend and return its database replaced by the
        checkpoint (see from_checkpoint); how a snapshot is installed."""
        self._close(flush=False)  # what it holds is being replaced
        return type(self).from_checkpoint(checkpoint_dir, self._path, sync=self._sync, wal=self._wal)

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str, path: str, *, sync: bool = False,
                        wal: bool = True) -> "RocksDBBackend":
        """Replace the database at `path` with the checkpoint and open it.

        The checkpoint directory is moved (renamed, or copied when it lives on
        another filesystem), not kept. Any backend open on `path` must be
        closed first. The swap is crash-safe: a restart in the middle opens
        either the old database or the new one, never an empty directory.
        """
        src, path = os.path.abspath(checkpoint_dir), os.path.abspath(path)
        if not (has_marker(src) and os.path.exists(os.path.join(src, ROCKSDB_CURRENT))):
            raise ForeignDirectoryError(f"{src} is not a checkpoint of the RocksDB engine")
        if os.path.exists(path) and os.listdir(path) and not has_marker(path):
            raise ForeignDirectoryError(f"{path} was not created by the RocksDB engine; refusing to replace it")
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        incoming, replaced = path + _INCOMING, path + _REPLACED
        shutil.rmtree(incoming, ignore_errors=True)
        _move_dir(src, incoming)
        shutil.rmtree(replaced, ignore_errors=True)
        if os.path.exists(path):
            os.rename(path, replaced)
        os.rename(incoming, path)
        fsync_path(parent)
        shutil.rmtree(replaced, ignore_errors=True)
        return cls(path, sync=sync, wal=wal)

    def _check_open(self) -> None:
        if self._closed:
            raise BackendClosedError("RocksDB backend is closed")


# -- helpers ----------------------------------------------------------------------
def _all(items: Iterable[_Item], keep_alive: object) -> Iterator[_Item]:
    """`keep_alive` (the ReadOptions and its bound) must outlive `items`.

    A loop rather than `yield from`: delegating to rocksdict's iterator never
    returns to the interpreter loop, so list() over a long scan would keep
    the interpreter lock throughout (measured: 0.4 s for 120k rows, with
    Raft's tick thread waiting)."""
    for item in items:
        yield item


def _down_to(items: Iterable[_Item], start: bytes, keep_alive: object) -> Iterator[_Item]:
    for item in items:
        if item[0] < start:
            return
        yield item


def _each_range(cf: Rdict, ranges: Iterable[tuple[bytes, bytes]]) -> Iterator[list[_Item]]:
    for start, end in ranges:
        ro = ReadOptions()
        ro.set_iterate_upper_bound(end)  # both must outlive the iterator (see scan())
        it = cf.iter(ro)
        it.seek(start)
        rows = []
        while it.valid():
            rows.append((it.key(), it.value()))
            it.next()
        del it
        yield rows


def _prop(cf: Rdict, name: str) -> int:
    return cf.property_int_value(name) or 0


def _finish_swap(path: str) -> None:
    """Settle a from_checkpoint swap a crash interrupted. The checkpoint is
    complete under `.incoming` before the old database is moved away, so a
    missing `path` next to it means: finish the swap."""
    incoming, replaced = path + _INCOMING, path + _REPLACED
    if not os.path.exists(path) and os.path.isdir(incoming) and has_marker(incoming):
        os.rename(incoming, path)
        fsync_path(os.path.dirname(path))
    if os.path.exists(path):
        # Leftovers: the database a finished swap replaced, or a checkpoint
        # whose swap never began (the old database stays, i.e. a roll back).
        for stale in (replaced, incoming):
            if os.path.isdir(stale) and has_marker(stale):
                shutil.rmtree(stale, ignore_errors=True)


def _move_dir(src: str, dst: str) -> None:
    """Rename src to dst; across filesystems copy it (under a temporary name,
    fsyncing every file, so `dst` never exists half-copied), then remove src.
    Either way dst is durable before this returns."""
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        partial = dst + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(src, partial)
        fsync_tree(partial)
        os.rename(partial, dst)
        shutil.rmtree(src)
    fsync_path(os.path.dirname(dst))


class _SharedUse:
    """Any number of shared users at once; `exclusive` waits until there are
    none and keeps new ones out while it runs."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._users = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._users += 1
        try:
            yield
        finally:
            with self._cond:
                self._users -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: self._users == 0)
            yield
