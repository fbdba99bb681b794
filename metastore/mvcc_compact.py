"""Physical compaction: drop the history no read at or after `target` needs.

After compacting at C a key needs only its newest version at or below C (and
only if that is not a delete) plus everything newer. Only keys written since
the previous compaction can have anything to drop -- older keys were already
reduced to that one version -- and the `rev` table lists exactly those writes,
in revision order, so compaction walks `rev` up to C instead of all keys.
The rows of C itself stay (a watch may start at C and replays them), but the
keys they name are reclaimed too.

The work is cut into batches so the store lock is never held for a whole
compaction of millions of rows. Each batch removes the `rev` rows it walked
together with the history they led to, which makes the walk resumable: after
a crash, compacting again simply continues with the rows still there.
"""
from __future__ import annotations

from itertools import islice
from typing import Iterator

from metastore.backend import Backend, WriteBatch
from metastore.mvcc_layout import TOMBSTONE, hist_key_for, hist_prefix, pack_rev, record_mod

CHUNK_ROWS = 10_000


def compaction_batches(backend: Backend, target: int, chunk: int = CHUNK_ROWS) -> Iterator[WriteBatch]:
    """Batches that together compact history at `target`.

    The caller must write each batch before asking for the next: every chunk
    is found again from the start of `rev`, which only works once the rows of
    the previous chunk are gone.
    """
    # The changes made at `target` itself stay listed: etcd lets a watch
    # start at the compacted revision, and it replays them from `rev`.
    stop = pack_rev(target, 0)
    while True:
        rows = list(islice(backend.scan("rev", b"", stop), chunk))
        if not rows:
            break
        batch = WriteBatch()
        touched: set[bytes] = set()
        for rk, key in rows:
            batch.delete("rev", rk)
            touched.add(key)
        for key in sorted(touched):
            _reclaim_key(backend, key, target, batch)
        yield batch
    # Keys written at `target` may leave older versions nobody reads any more.
    at_target = {key for _rk, key in backend.scan("rev", stop, pack_rev(target + 1, 0))}
    batch = WriteBatch()
    for key in sorted(at_target):
        _reclaim_key(backend, key, target, batch)
    if len(batch):
        yield batch


def _reclaim_key(backend: Backend, key: bytes, target: int, batch: WriteBatch) -> None:
    prefix = hist_prefix(key)
    rows = list(backend.scan("hist", prefix, hist_key_for(prefix, target + 1, 0)))
    if not rows:
        return
    cur = backend.get("kv", key)
    # The newest row at or below target is what a read at target sees, unless
    # the current record is itself old enough to answer that read.
    newest_needed = (cur is None or record_mod(cur) > target) and rows[-1][1] != TOMBSTONE
    for hk, _rec in rows[:-1] if newest_needed else rows:
        batch.delete("hist", hk)
