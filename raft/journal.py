"""A Raft log that is on disk before anyone counts on it.

pysyncobj's own FileJournal writes into an mmap and never fsyncs, so an
acknowledged write could vanish with a power cut. `DurableJournal` keeps the
same interface (pysyncobj.journal.Journal) but:

- appends are buffered in memory, and `sync()` writes them after the records
  on disk and fsyncs once for everything appended since the last sync (group
  commit: one fsync per batch of entries, not per entry);
- a write or fsync that fails (appending, rewriting the file for a log
  compaction, storing term and vote) leaves the journal failed: every later
  `sync()` raises, so nothing appended after the failure is ever reported
  durable (after a failed fsync the kernel may have dropped the pages, and
  a second fsync can succeed without them: PostgreSQL's "fsyncgate"), and
  `on_failure` is told, once, so that the member stops;
- the Raft adapter calls `sync()` before this member acknowledges entries to a
  leader and before the leader's own tick can count its entries toward commit
  (see raft/node.py), so an entry is committed only once a majority has it on
  disk;
- term and vote are written and fsynced before any message that depends on
  them leaves (pysyncobj sends the vote right after setCurrentTerm);
- the commit index is not on the write path: Raft does not need it durable
  (a restarted member learns it from the leader again), so it is stored at
  most once a second, never in `sync()` -- which keeps a group commit at one
  fsync instead of three (log, meta file, directory);
- every record carries a CRC, so a torn tail after a crash is detected and cut
  off instead of being replayed;
- the file is allocated ahead of the records, PREALLOCATE bytes at a time,
  and synced with fdatasync (as etcd preallocates its WAL segments): an fsync
  that also grows the file commits a metadata transaction in the
  filesystem's journal every time, which on ext4 here made it take about
  twice as long (~170 us against ~110 us) -- and a follower's fsync is on
  every write's path. The space after the last record reads as zeros, which
  the loader takes as the end of the log.

File format (little-endian): records of
    u32 length-of-body | u32 crc32(body) | body = u64 index | u64 term | command
"""
from __future__ import annotations

import contextlib
import logging
import os
import struct
import threading
import time
import zlib
from typing import Any, Callable, Iterator

from pysyncobj.journal import Journal

from metastore import heap
from metastore.fsutil import datasync, fsync_path

log = logging.getLogger("metastore.raft.journal")

_HEADER = struct.Struct("<II")
_ENTRY = struct.Struct("<QQ")
_META = struct.Struct("<QQ")  # term, commit index; then votedFor as utf-8

# Bytes allocated at a time ahead of the records (etcd's WAL segments: 64 MB).
PREALLOCATE = 16 << 20

# Dropping at least this many bytes of entries (a snapshot after a bulk load)
# hands the freed memory back to the system (metastore.heap).
RELEASE_MEMORY_FROM = 64 << 20


class DurableJournal(Journal):
    def __init__(self, path: str, *, fsync: bool = True) -> None:
        self.path = path
        self.meta_path = path + ".meta"
        self.fsync_enabled = fsync
        self.fsync_count = 0
        self.fsync_seconds = 0.0  # total time spent in fsync (for metrics)
        self.on_fsync: Callable[[float], None] | None = None  # each fsync's duration (metrics)
        self._lock = threading.Lock()
        self._entries: list[tuple[bytes, int, int]] = []
        self._offsets: list[int] = []  # file offset of each entry's record
        self._pending: list[bytes] = []
        self._size = 0  # bytes of the records, including pending ones
        self._written = 0  # bytes of the records written to the file
        self._allocated = 0  # bytes the file is allocated (records, then zeros)
        self._durable_index = 0  # highest log index known to be on disk
        # Entries pysyncobj deleted from the tail but that are still in the
        # file: ((command, idx, term), offset, end offset). pysyncobj deletes
        # and re-adds identical entries whenever a leader resends overlapping
        # ones; re-adding the same entry re-attaches its durable record
        # instead of cutting the file (which would un-persist entries this
        # member already acknowledged). The file is cut only at the first
        # entry that really diverges, in the next sync.
        self._detached: list[tuple[tuple[bytes, int, int], int, int]] = []
        self._failure: OSError | None = None  # the write or fsync that failed (see sync)
        self._reported = False  # on_failure was told
        # Told once, from the thread that hit it, when a write or fsync fails
        # (the member then stops: raft.node, metastore.node).
        self.on_failure: Callable[[OSError], None] | None = None
        self._term, self._commit, self._voted_for = self._load_meta()
        self._meta_dirty = False
        self._load()

    # -- recovery ------------------------------------------------------------
    def _load_meta(self) -> tuple[int, int, str | None]:
        try:
            with open(self.meta_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return 0, 1, None
        body, crc = data[:-4], data[-4:]
        if len(data) < _META.size + 4 or zlib.crc32(body).to_bytes(4, "little") != crc:
            raise RuntimeError(f"Raft metadata {self.meta_path} is corrupt; refusing to start")
        term, commit = _META.unpack_from(body)
        voted = body[_META.size:].decode() or None
        return term, max(commit, 1), voted

    def _load(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path + ".tmp")  # a rewrite a crash interrupted: never in use
        if not os.path.exists(self.path):
            with open(self.path, "wb") as f:
                _preallocate(f.fileno(), PREALLOCATE)
                f.flush()
                os.fsync(f.fileno())
            _fsync_parent(self.path)
        with open(self.path, "rb") as f:
            data = f.read()
        pos = 0
        while pos + _HEADER.size <= len(data):
            length, crc = _HEADER.unpack_from(data, pos)
            body = data[pos + _HEADER.size: pos + _HEADER.size + length]
            if len(body) != length or length < _ENTRY.size or zlib.crc32(body) != crc:
                break  # torn or never-synced tail
            idx, term = _ENTRY.unpack_from(body)
            self._entries.append((bytes(body[_ENTRY.size:]), idx, term))
            self._offsets.append(pos)
            pos += _HEADER.size + length
        self._fd = os.open(self.path, os.O_RDWR)
        self._allocated = len(data)
        torn = data[pos:].rstrip(b"\0")  # past the records: zeros, unless a write was torn
        if torn:
            log.warning("Raft log %s: dropping %d bytes of incomplete tail after index %s", self.path,
                        len(torn), self._entries[-1][1] if self._entries else 0)
            self._cut(pos)
            os.fsync(self._fd)
        del data, torn
        self._size = self._written = pos
        self._durable_index = self._entries[-1][1] if self._entries else 0

    # -- group commit --------------------------------------------------------
    def needs_sync(self) -> bool:
        return bool(self._pending) or bool(self._detached) or self._failure is not None

    @property
    def failed(self) -> bool:
        """A write or fsync failed: nothing appended since will ever be durable."""
        return self._failure is not None

    @property
    def durable_index(self) -> int:
        """Highest index written and fsynced (only what a peer may be told)."""
        return self._durable_index

    def sync(self) -> None:
        """Write everything appended so far and fsync it, once. Raises if
        this or any earlier write or fsync failed (see the module docstring)."""
        with self._writing():
            if self._failure is not None:
                raise OSError(f"Raft log {self.path} failed earlier: {self._failure}") from self._failure
            self._write_and_sync()
            self._durable_index = self._entries[-1][1] if self._entries else 0

    def _write_and_sync(self) -> None:
        if self._detached:
            # Deleted entries that were not re-added: gone for good.
            self._detached.clear()
            self._cut(self._size - sum(len(r) for r in self._pending))
            if not self._pending:
                self._fsync(self._fd)
        if self._pending:
            data = b"".join(self._pending)
            end = self._written + len(data)
            if end > self._allocated:
                self._allocated = _preallocate(self._fd, end + PREALLOCATE)
            _write_at(self._fd, data, self._written)
            self._pending.clear()
            self._written = end
            self._fsync(self._fd)

    def _cut(self, size: int) -> None:
        """Drop the file's bytes from `size` on, keeping the space allocated
        (it reads as zeros again, so nothing stale follows the records)."""
        os.ftruncate(self._fd, size)
        self._written = size
        self._allocated = _preallocate(self._fd, max(self._allocated, size + PREALLOCATE))

    def _fsync(self, fd: int) -> None:
        if not self.fsync_enabled:
            return
        t0 = time.perf_counter()
        datasync(fd)
        elapsed = time.perf_counter() - t0
        self.fsync_seconds += elapsed
        self.fsync_count += 1
        if self.on_fsync is not None:
            self.on_fsync(elapsed)

    # -- pysyncobj's Journal interface ---------------------------------------
    def add(self, command: bytes, idx: int, term: int) -> None:
        if self._detached:
            if not self._pending and self._detached[0][0] == (command, idx, term):
                entry, offset, end = self._detached.pop(0)
                self._entries.append(entry)
                self._offsets.append(offset)
                self._size = end
                return
            # Divergence: the rest of the detached tail is dropped at sync;
            # this entry is written from the current end.
        body = _ENTRY.pack(idx, term) + command
        record = _HEADER.pack(len(body), zlib.crc32(body)) + body
        self._entries.append((command, idx, term))
        self._offsets.append(self._size)
        self._pending.append(record)
        self._size += len(record)

    def clear(self) -> None:
        self._rewrite([])

    def deleteEntriesFrom(self, entryFrom: int) -> None:
        """Drop entries at positions >= entryFrom (a conflicting tail)."""
        if entryFrom >= len(self._entries):
            return
        self.sync()  # everything before is on disk, nothing pending
        ends = self._offsets[entryFrom + 1:] + [self._size]
        self._detached = [(e, off, end) for e, off, end in
                          zip(self._entries[entryFrom:], self._offsets[entryFrom:], ends)]
        self._size = self._offsets[entryFrom]
        del self._entries[entryFrom:]
        del self._offsets[entryFrom:]

    def deleteEntriesTo(self, entryTo: int) -> None:
        """Drop entries at positions < entryTo (covered by a snapshot)."""
        offsets = self._offsets
        dropped = ((offsets[entryTo] if entryTo < len(offsets) else self._size) - offsets[0]) if offsets else 0
        self._rewrite(self._entries[entryTo:])
        if dropped >= RELEASE_MEMORY_FROM:
            heap.release_free_memory_soon()  # see metastore.heap

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """The lock, for a write to disk: an OSError inside fails the
        journal, and on_failure is told (once) after the lock is released,
        so the callback may do anything but wait for this thread."""
        try:
            with self._lock:
                try:
                    yield
                except OSError as exc:
                    if self._failure is None:
                        self._failure = exc
                        log.critical("Raft log %s: a write or fsync failed (%s); this member acknowledges "
                                     "no more entries", self.path, exc)
                    raise
        finally:
            if self._failure is not None and not self._reported:
                self._reported = True
                if self.on_failure is not None:
                    self.on_failure(self._failure)

    def _rewrite(self, entries: list[tuple[bytes, int, int]]) -> None:
        """Replace the file with exactly `entries`, atomically and durably.
        Any failure is the journal's failure (as etcd takes a failed WAL
        cut): pysyncobj calls this in the middle of a tick, between
        appending entries and syncing them, so a failure that let ticks go
        on could have a leader count entries that were never written."""
        with self._writing():
            self._rewrite_locked(entries)

    def _rewrite_locked(self, entries: list[tuple[bytes, int, int]]) -> None:
        if self._failure is not None:
            raise OSError(f"Raft log {self.path} failed earlier: {self._failure}") from self._failure
        tmp = self.path + ".tmp"
        offsets, pos = [], 0
        try:
            with open(tmp, "wb") as f:
                for command, idx, term in entries:
                    body = _ENTRY.pack(idx, term) + command
                    record = _HEADER.pack(len(body), zlib.crc32(body)) + body
                    f.write(record)
                    offsets.append(pos)
                    pos += len(record)
                f.flush()
                allocated = _preallocate(f.fileno(), pos + PREALLOCATE)
                self._fsync(f.fileno())
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)  # on a full disk it holds a copy of the whole log
            raise
        os.replace(tmp, self.path)
        if self.fsync_enabled:
            _fsync_parent(self.path)
        old_fd, self._fd = self._fd, os.open(self.path, os.O_RDWR)
        _close_soon(old_fd)
        # Only now: until the new file is open for writing, the old one is the log.
        self._pending.clear()
        self._detached.clear()
        self._entries = list(entries)
        self._offsets = offsets
        self._size = self._written = pos
        self._allocated = allocated
        self._durable_index = entries[-1][1] if entries else 0

    def __getitem__(self, item: Any) -> Any:
        return self._entries[item]

    def __len__(self) -> int:
        return len(self._entries)

    def _destroy(self) -> None:  # noqa: D401 - pysyncobj's name
        try:
            if self.failed:
                return  # nothing more can be made durable; what is on disk stays as it is
            self.sync()
            if self._meta_dirty:
                with self._writing():
                    self._store_meta()
        finally:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:
        if raftCommitIndex != self._commit:
            self._commit = raftCommitIndex
            self._meta_dirty = True

    def getRaftCommitIndex(self) -> int:
        return self._commit

    def setCurrentTerm(self, term: int, votedForNodeId: Any) -> None:
        # Raft: term and vote must be durable before the vote is sent, and
        # pysyncobj sends it right after this returns: store synchronously.
        self._term = term
        self._voted_for = votedForNodeId
        with self._writing():
            self._store_meta()

    def getCurrentTerm(self) -> int:
        return self._term

    def getVotedForNodeId(self) -> Any:
        return self._voted_for

    def onOneSecondTimer(self) -> None:
        if self._meta_dirty:
            with self._writing():
                self._store_meta()

    def _store_meta(self) -> None:
        """Write term, vote and commit index durably (under _writing: a
        failure is the journal's, since a member that cannot record its term
        and vote cannot take part in elections, and the disk is failing)."""
        # The commit index stored never exceeds what is durable in the log.
        commit = min(self._commit, max(self._durable_index, 1))
        body = _META.pack(self._term, commit) + (self._voted_for or "").encode()
        tmp = self.meta_path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(body + zlib.crc32(body).to_bytes(4, "little"))
            f.flush()
            self._fsync(f.fileno())
        os.replace(tmp, self.meta_path)
        if self.fsync_enabled:
            _fsync_parent(self.meta_path)
        self._meta_dirty = False


def holds_entries(path: str) -> bool:
    """Whether the journal file at `path` has a record (a member that has
    run before), without loading it: a new one is empty or all zeros."""
    try:
        with open(path, "rb") as f:
            header = f.read(_HEADER.size)
    except FileNotFoundError:
        return False
    return len(header) == _HEADER.size and _HEADER.unpack(header)[0] > 0


def _close_soon(fd: int) -> None:
    """Close the replaced log's descriptor on a short thread of its own. It
    is the last reference to a file already unlinked, so closing it frees
    the whole old log on disk -- 50-160 ms for ~130 MB here (check perf
    --load=l's log at a snapshot), time the tick thread, holding up every
    commit, would otherwise spend in close()."""
    try:
        threading.Thread(target=os.close, args=(fd,), name="raft-log-release", daemon=True).start()
    except RuntimeError:  # no thread to be had: pay for it here
        os.close(fd)


def _preallocate(fd: int, size: int) -> int:
    """Allocate the file up to `size` bytes (zeros past its data); returns
    the size it has. Where the filesystem cannot (or the disk is full), the
    file just grows as it is written."""
    have = os.fstat(fd).st_size
    if size <= have:
        return have
    try:
        os.posix_fallocate(fd, have, size - have)
    except (AttributeError, OSError):
        return have
    return size


def _write_at(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _fsync_parent(path: str) -> None:
    """Make a file's creation or rename durable: fsync its directory."""
    fsync_path(os.path.dirname(os.path.abspath(path)))
