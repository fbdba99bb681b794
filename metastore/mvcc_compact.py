"""Physical compaction: drop the history no read at or after `target` needs.

After compacting at C a key needs only its newest version at or below C (and
only if that is not a delete) plus everything newer. Only keys written since
the previous compaction can have anything to drop -- older keys were already
reduced to that one version -- and the `rev` table lists exactly those writes,
in revision order, so compaction walks `rev` up to C instead of all keys.
The rows of C itself stay (a watch may start at C and replays them), but the
keys they name are reclaimed too.

The work is cut into batches so no lock is held for a whole compaction of
millions of rows. Each batch below C removes the `rev` rows it walked
together with the history they led to, which makes the walk resumable: after
a crash, or after writes slipped in between two batches, compacting again
simply continues with the rows still there. C's own rows stay; looking at
them again only finds nothing more to drop, so a walk over them that a crash
cut short simply starts over. `metastore.mvcc.MVCCStore` runs the
batches on a background thread (`Compactor`), as etcd compacts in the
background once the compaction is recorded.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from itertools import islice
from typing import Callable

from metastore.backend import Backend, WriteBatch, scan_ranges
from metastore.mvcc_layout import TOMBSTONE, hist_key_for, hist_prefix, pack_rev, record_mod

# `rev` rows walked per batch. Compaction runs beside the apply thread and
# holds the store's write lock for one batch at a time, so a batch bounds
# how long an apply can wait behind it (etcd's compaction-batch-limit is
# 1,000 too).
CHUNK_ROWS = 1_000
# Pause between two batches, so the apply thread (which competes for the
# GIL, not just the lock) gets its turn; etcd sleeps 10 ms.
BATCH_PAUSE = 0.002
# After a failed batch (the disk, say), the compactor tries again this much later.
RETRY_AFTER = 1.0

log = logging.getLogger(__name__)


class ReclaimedKeys:
    """Keys one walk toward a compaction target has reclaimed below it.

    The walk meets a key once per change `rev` lists: a key put below the
    target and deleted at it (every key of a prefix delete, check perf's
    200k) is reclaimed when the walk meets its put, and meeting its delete
    at the target then finds nothing more to drop -- once a key is
    reclaimed, the only row at or below the target that can still appear
    is its current record being superseded, the one row a read at the
    target needs and a second look keeps. Remembering them spares that
    second look (half the work of such a compaction). Kept as 16-byte
    digests, at most MAX_KEYS, for the current walk only: forgetting them
    (a restart, a newer target) costs the second looks again, nothing else.
    """

    MAX_KEYS = 500_000  # ~50 MB of digests in a set, for the walk's length

    def __init__(self) -> None:
        self._seen: set[bytes] = set()
        self._pending: set[bytes] = set()

    def note(self, keys: set[bytes]) -> None:
        """Keys the batch being made reclaims; they count once it is written
        (confirm). A batch whose write failed is made again, and its keys
        noted again."""
        self._pending = set(map(_digest, keys)) if len(self._seen) < self.MAX_KEYS else set()

    def confirm(self) -> None:
        """The batch last noted was written."""
        self._seen |= self._pending
        self._pending = set()

    def __contains__(self, key: bytes) -> bool:
        return _digest(key) in self._seen


def _digest(key: bytes) -> bytes:
    return hashlib.blake2b(key, digest_size=16).digest()


def next_compaction_batch(backend: Backend, target: int, chunk: int = CHUNK_ROWS, start: bytes = b"",
                          reclaimed: ReclaimedKeys | None = None) -> tuple[WriteBatch, bytes] | None:
    """The next batch towards compacting history at `target` and where the
    walk goes on after it (pass it as `start` next time), or None once
    nothing is left to drop.

    Resumable: every call looks at what the backend holds now, so the caller
    may write the batch, let other writes in, and call again -- or crash and
    call again after a restart with `start` b"". Each batch must be written
    before the next call. `start` only skips `rev` rows already deleted (a
    RocksDB scan would otherwise step over all their tombstones each time)
    or, past `target`'s own rows, rows already looked at; nothing is ever
    added below it, since new rows come after the current revision.
    `reclaimed`, kept by the caller across the calls of one walk, spares
    looking twice at a key met both below and at the target.
    """
    # The changes made at `target` itself stay listed: etcd lets a watch
    # start at the compacted revision, and it replays them from `rev`.
    stop = pack_rev(target, 0)
    if start < stop:
        rows = list(islice(backend.scan("rev", start, stop), chunk))
        if rows:
            batch = WriteBatch()
            for rk, _key in rows:
                batch.delete("rev", rk)
            keys = {key for _rk, key in rows}
            _reclaim_keys(backend, keys, target, batch)
            if reclaimed is not None:
                reclaimed.note(keys)
            return batch, rows[-1][0] + b"\x00"
        start = stop
    # Keys written at `target` may leave older versions nobody reads any
    # more. Their `rev` rows stay, so the walk goes on from `start`, a chunk
    # at a time like the rows before (a DeleteRange at target lists 200k).
    rows = list(islice(backend.scan("rev", start, pack_rev(target + 1, 0)), chunk))
    if not rows:
        return None
    batch = WriteBatch()
    keys = {key for _rk, key in rows}
    if reclaimed is not None:
        keys = {key for key in keys if key not in reclaimed}
    _reclaim_keys(backend, keys, target, batch)
    return batch, rows[-1][0] + b"\x00"


def _reclaim_keys(backend: Backend, keys: set[bytes], target: int, batch: WriteBatch) -> None:
    """Delete the `hist` rows of `keys` that no read at or after `target`
    needs. Their rows are looked up in key order, all in one scan_ranges."""
    ordered = sorted(keys)
    prefixes = [hist_prefix(key) for key in ordered]
    ranges = [(prefix, hist_key_for(prefix, target + 1, 0)) for prefix in prefixes]
    for key, rows in zip(ordered, scan_ranges(backend, "hist", ranges)):
        if not rows:
            continue
        cur = backend.get("kv", key)
        # The newest row at or below target is what a read at target sees,
        # unless the current record is itself old enough to answer that read.
        newest_needed = (cur is None or record_mod(cur) > target) and rows[-1][1] != TOMBSTONE
        for hk, _rec in rows[:-1] if newest_needed else rows:
            batch.delete("hist", hk)


class Compactor:
    """A daemon thread that runs `step` until it returns False, each time it
    is woken, pausing BATCH_PAUSE between steps.

    `step` does one batch under the store's locks and says whether there may
    be more; the thread owns no state of its own, so a wake-up that finds
    nothing to do is harmless."""

    def __init__(self, step: Callable[[], bool], name: str = "metastore-compactor") -> None:
        self._step = step
        self._name = name
        self._wanted = threading.Event()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def wake(self) -> None:
        with self._start_lock:
            if self._stopped:
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        self._wanted.set()

    def stop(self) -> None:
        """Stop after the current step; returns without waiting for it (the
        step checks the store's closed flag under the store's lock)."""
        with self._start_lock:
            self._stopped = True
        self._wanted.set()

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            while not self._stopped:
                try:
                    more = self._step()
                except Exception:
                    log.exception("background compaction failed; retrying in %.0f s", RETRY_AFTER)
                    time.sleep(RETRY_AFTER)
                    continue
                if not more:
                    break
                time.sleep(BATCH_PAUSE)
            if self._stopped:
                return
