"""MVCCStore: etcd's MVCC key-value semantics over any Backend, written once.

Both engines (memory, RocksDB) only provide a Backend; revisions, history,
compaction, range options and transactions all live here so the two engines
cannot drift apart. The bytes layout is in `metastore.mvcc_layout`; the store
keeps no per-key Python objects, only a few integers, so its footprint is the
backend's.

Locking. Mutations come from the Raft apply loop one at a time (see
`metastore.store`); `_write_lock` serializes them anyway so misuse cannot
interleave two requests. A mutation builds its whole WriteBatch without the
read lock -- nobody else writes meanwhile -- and takes `_lock` only to apply
the batch and move the revision. Readers take `_lock` while they walk the
backend, so they never iterate a table being modified and always see one
committed revision; protobuf building happens after the lock is released.
"""
from __future__ import annotations

import contextlib
import heapq
import struct
import logging
import threading
import time
import zlib
from itertools import islice
from typing import Iterable, Iterator, Sequence

from metastore import errors
from metastore.errors import EtcdError
from metastore.api.pb import rpc_pb2
from metastore.backend import TABLES, Backend, WriteBatch
from metastore.mvcc_compact import Compactor, ReclaimedKeys, next_compaction_batch
from metastore.mvcc_compare import chosen_ops, txn_path
from metastore.mvcc_events import LazyEvents, RevisionEvents, read_events
from metastore.mvcc_layout import (
    LAYOUT_VERSION,
    META_APPLIED,
    META_COMPACT_FINISHED,
    META_COMPACT_REVISION,
    META_LAYOUT,
    META_REVISION,
    pack_rev,
    pack_u64,
    record_header,
    record_value,
    split_hist_key,
    unpack_u64,
)
from metastore.mvcc_lease import attached_keys, lease_key, load_leases, pack_ttl
from metastore.mvcc_range import (
    KeyRange,
    Selection,
    effective_sort,
    fill_kv,
    fill_response,
    key_range,
    revision_filter,
    select,
)
from metastore.mvcc_read import CurrentView, HistoricalView, View
from metastore.mvcc_write import Change, WriteTxn, unfinished_rows
from metastore.store import EventListener
from metastore.types import RaftRole, RaftStatus, RaftStatusSource
from metastore.validate import txn_is_read_only

log = logging.getLogger(__name__)

_RR = rpc_pb2.RangeRequest
# Changes read per lock hold when replaying history for a watcher.
REPLAY_ROWS = 1_000

# Tables a compaction leaves garbage in: the history it deleted (see
# mvcc_compact) and meta, whose few rows are overwritten on every write.
COMPACTED_TABLES = ("hist", "rev", "meta")
_APPLIED = struct.Struct(">QQ")


class MVCCStore:
    """The Store protocol (metastore.store.Store) over a Backend."""

    def __init__(self, backend: Backend, node_id: int = 0) -> None:
        self._backend = backend
        self._node_id = node_id
        self._lock = threading.Lock()
        # Reentrant: listeners run under it and may call back into the store.
        self._write_lock = threading.RLock()
        self._listeners: list[EventListener] = []
        self._raft: RaftStatusSource | None = None
        self._leases: dict[int, int] = {}  # the lease table's L rows: id -> TTL
        # Physical compaction runs behind the recorded one (see compact()):
        # _compact_finished is the compaction whose rows are gone (the meta
        # row), _compact_done the one whose space is also reclaimed; waiters
        # on _compacted are woken when _compact_done moves.
        self._compact_finished = 0
        self._compact_cursor = b""
        self._compact_reclaimed = ReclaimedKeys()  # of the walk under way
        self._compact_done = 0
        self._compacted = threading.Condition()
        self._compactor = Compactor(self._compact_step)
        self._closed = False
        # Moves once the meta rows write_meta writes (alarms, liveness) may
        # have changed -- after they changed -- so a reader can keep what it
        # derived from them until it moves (metastore.alarms does).
        self.meta_generation = 0

        layout = backend.get("meta", META_LAYOUT)
        if layout is None:
            first = WriteBatch()
            first.put("meta", META_LAYOUT, LAYOUT_VERSION)
            backend.write(first)
        elif layout != LAYOUT_VERSION:
            raise RuntimeError(f"unsupported MVCC layout {layout!r} (this build: {LAYOUT_VERSION!r})")
        self._position = (0, 0)
        self._load_meta()
        self._drop_unfinished()  # a crash cut a request's write short
        if self._compact_finished < self._compact_rev:
            # A crash interrupted a compaction: finish it before serving.
            while self._compact_step(reclaim=False):
                pass

    def _drop_unfinished(self) -> None:
        """Delete rows a request put ahead of a write that never landed
        (mvcc_write.unfinished_rows); usually there are none."""
        batch = unfinished_rows(self._backend, self._rev)
        if len(batch):
            log.warning("dropping %d rows of an unfinished request above revision %d", len(batch), self._rev)
            try:
                self._backend.write(batch)
            except Exception:
                log.exception("could not drop the rows of an unfinished request")

    def _load_meta(self) -> None:
        backend = self._backend
        self._rev = unpack_u64(backend.get("meta", META_REVISION), 1)
        self._compact_rev = unpack_u64(backend.get("meta", META_COMPACT_REVISION), 0)
        self._compact_finished = unpack_u64(backend.get("meta", META_COMPACT_FINISHED), 0)
        self._compact_cursor = b""  # where the compaction walk of `rev` goes on
        self._compact_reclaimed = ReclaimedKeys()
        with self._compacted:
            self._compact_done = self._compact_finished
            self._compacted.notify_all()
        applied = backend.get("meta", META_APPLIED)
        self._applied = _APPLIED.unpack(applied) if applied else (0, 0)
        self._leases = load_leases(backend)
        self.meta_generation += 1  # a snapshot or checkpoint loaded: any meta row may differ

    # -- Raft bookkeeping -------------------------------------------------------
    @property
    def applied_position(self) -> tuple[int, int]:
        """(raft index, position in batch) of the last request whose writes
        this store holds -- durable with the writes for a persistent backend."""
        return self._applied

    def set_apply_position(self, index: int, position: int) -> None:
        """Tag the next mutation's writes with the request's place in the Raft log."""
        self._position = (index, position)

    # -- snapshots ----------------------------------------------------------------
    def export_items(self) -> Iterator[tuple[str, bytes, bytes]]:
        """Every (table, key, value) of the backend as of now (a copy, so
        neither applies nor the background compactor change it under the
        caller). Raft and client snapshots use the cheaper frozen_copy."""
        with self._write_lock, self._lock:
            return iter(self._all_rows())

    def _all_rows(self) -> list[tuple[str, bytes, bytes]]:
        return [(table, key, value) for table in TABLES for key, value in self._backend.scan(table, b"", None)]

    def import_items(self, items: Iterator[tuple[str, bytes, bytes]], batch_rows: int = 10_000) -> None:
        """Replace the whole content with a snapshot's items.

        Crash-safe on a persistent engine: the applied position is dropped
        first and written last, so a restart in the middle finds the store
        behind the snapshot and loads it again, never a half-loaded store
        that claims to hold it."""
        with self._write_lock:
            with self._lock:
                forget = WriteBatch()
                forget.delete("meta", META_APPLIED)
                self._backend.write(forget)
                for table in TABLES:
                    keys = [k for k, _ in self._backend.scan(table, b"", None)]
                    for i in range(0, len(keys), batch_rows):
                        batch = WriteBatch()
                        for key in keys[i:i + batch_rows]:
                            batch.delete(table, key)
                        self._backend.write(batch)
                applied: bytes | None = None
                batch = WriteBatch()
                for table, key, value in items:
                    if table == "meta" and key == META_APPLIED:
                        applied = value
                        continue
                    batch.put(table, key, value)
                    if len(batch) >= batch_rows:
                        self._backend.write(batch)
                        batch = WriteBatch()
                if applied is not None:
                    batch.put("meta", META_APPLIED, applied)
                self._backend.write(batch)
                self._load_meta()
            self._notify_reset()
        self._compactor.wake()  # the snapshot may carry an unfinished compaction

    def _notify_reset(self) -> None:
        """Tell listeners the content was replaced (a snapshot was loaded):
        revision jumped with no events of its own; they catch up from history."""
        for listener in list(self._listeners):
            try:
                listener(self._rev, [])
            except Exception:
                log.exception("store listener failed after a snapshot load")

    def checkpoint(self, target_dir: str) -> bool:
        """Write the engine's own consistent copy of the data to `target_dir`
        if it has one (RocksDB: a hard-linked checkpoint); False if not.
        Same caller rule as export_items."""
        make = getattr(self._backend, "checkpoint", None)
        if make is None:
            return False
        make(target_dir)
        return True

    def install_checkpoint(self, checkpoint_dir: str) -> bool:
        """Swap the backend for a checkpoint made by `checkpoint` on an
        engine of the same kind (the directory is consumed); False, with
        nothing changed, if this engine cannot install checkpoints."""
        if getattr(self._backend, "replace_with_checkpoint", None) is None:
            return False
        with self._write_lock:
            with self._lock:
                self._backend = self._backend.replace_with_checkpoint(checkpoint_dir)  # type: ignore[attr-defined]
                self._load_meta()
            self._notify_reset()
        self._compactor.wake()  # the checkpoint may carry an unfinished compaction
        return True

    # -- properties -----------------------------------------------------------
    @property
    def revision(self) -> int:
        return self._rev

    @property
    def compact_revision(self) -> int:
        return self._compact_rev

    @property
    def backend(self) -> Backend:
        return self._backend

    @property
    def node_id(self) -> int:
        return self._node_id

    # -- reads ------------------------------------------------------------------
    def range(self, req: rpc_pb2.RangeRequest) -> rpc_pb2.RangeResponse:
        with self._lock:
            cur = self._rev
            rev = self._read_revision(req.revision, cur)
            if rev == cur:
                sel = self._select_current(req)
            else:
                sel = _select(HistoricalView(self._backend, rev), req)
        resp = rpc_pb2.RangeResponse()
        resp.header.revision = cur
        fill_response(resp, sel, req)
        return resp

    def _read_revision(self, requested: int, cur: int) -> int:
        if requested <= 0:
            return cur
        if requested > cur:
            raise errors.FUTURE_REV
        if requested < self._compact_rev:  # etcd: reading AT the compaction is fine
            raise errors.COMPACTED
        return requested

    def _select_current(self, req: rpc_pb2.RangeRequest) -> Selection:
        """Like _select on the current state, but lets a backend that can count
        a range directly skip walking the keys that `limit` will not return."""
        count = getattr(self._backend, "count", None)
        kr = key_range(req.key, req.range_end)
        plain = (
            count is not None
            and not kr.single
            and not kr.empty
            and revision_filter(req) is None
            and effective_sort(req) in ((_RR.NONE, _RR.KEY), (_RR.ASCEND, _RR.KEY))
        )
        if plain and req.count_only:
            return Selection([], count("kv", kr.start, kr.end), False)
        if plain and req.limit > 0:
            picked = list(islice(self._backend.scan("kv", kr.start, kr.end), req.limit))
            total = count("kv", kr.start, kr.end)
            return Selection(picked, total, total > req.limit)
        return _select(CurrentView(self._backend), req)

    # -- mutations ----------------------------------------------------------------
    def put(self, req: rpc_pb2.PutRequest) -> rpc_pb2.PutResponse:
        with self._write_lock:
            w = WriteTxn(self._backend, self._rev)
            resp = rpc_pb2.PutResponse()
            self._put(w, req, resp)
            self._commit(w)
        return resp

    def put_many(self, requests: Sequence[tuple[tuple[int, int], rpc_pb2.PutRequest]]
                 ) -> list[rpc_pb2.PutResponse | EtcdError]:
        """Apply consecutive Puts of one Raft entry, each tagged with its
        (raft index, position), in one backend write: the same revisions,
        responses and events as put() one at a time, for less than half
        the cost of a write each (RocksDB: ~10 us a write call). A Put that
        fails (an unknown lease, ignore_value on a missing key) fails alone,
        before it adds anything; a backend write that fails (a full disk)
        fails them all, none applied. Readers see the revision move once,
        from before the first Put to after the last."""
        results: list[rpc_pb2.PutResponse | EtcdError] = []
        done: list[WriteTxn] = []
        with self._write_lock:
            batch = WriteBatch()
            overlay: dict[bytes, bytes | None] = {}
            rev = self._rev
            position = self._position
            for position, req in requests:
                w = WriteTxn(self._backend, rev, batch, overlay)
                resp = rpc_pb2.PutResponse()
                try:
                    self._put(w, req, resp)  # raises before it writes anything
                except EtcdError as err:
                    results.append(err)
                    continue
                results.append(resp)
                done.append(w)
                rev = w.rev
            self._position = position
            if not done:
                return results
            batch.put("meta", META_REVISION, pack_u64(rev))
            batch.put("meta", META_APPLIED, _APPLIED.pack(*position))
            with self._lock:
                try:
                    self._backend.write(batch)
                except BaseException:
                    self._drop_unfinished()  # what went ahead must not outlive the requests
                    raise
                self._rev = rev
                self._applied = position
            if self._listeners:
                for w in done:
                    self._notify(w.rev, w.changes)
        return results

    def delete_range(self, req: rpc_pb2.DeleteRangeRequest) -> rpc_pb2.DeleteRangeResponse:
        with self._write_lock:
            w = WriteTxn(self._backend, self._rev)
            resp = rpc_pb2.DeleteRangeResponse()
            self._delete(w, req, resp)
            self._commit(w)
        return resp

    def txn(self, req: rpc_pb2.TxnRequest) -> rpc_pb2.TxnResponse:
        if txn_is_read_only(req):
            # Served from any thread (a linearizable read-only txn is not
            # proposed): the read lock alone gives one consistent revision,
            # without waiting behind a long mutation such as a compaction.
            with self._lock:
                return self._run_txn(req)
        with self._write_lock:
            return self._run_txn(req)

    def _run_txn(self, req: rpc_pb2.TxnRequest) -> rpc_pb2.TxnResponse:
        w = WriteTxn(self._backend, self._rev)
        before = CurrentView(self._backend)
        path = txn_path(before, req)
        # etcd validates the chosen ops against the state before the txn,
        # all puts first, then all ranges, and applies nothing on error.
        ops = list(_flatten(req, iter(path)))
        for op in ops:
            if op.WhichOneof("request") == "request_put":
                self._check_txn_put(before, op.request_put)
        for op in ops:
            if op.WhichOneof("request") == "request_range":
                self._check_txn_range(op.request_range, w.begin_rev)
        resp = rpc_pb2.TxnResponse()
        self._txn(w, req, iter(path), resp)
        resp.header.revision = w.read_rev
        self._commit(w)
        return resp

    def compact(self, req: rpc_pb2.CompactionRequest) -> rpc_pb2.CompactionResponse:
        """Record a compaction at req.revision; the history below it is
        dropped in the background, as etcd does.

        From the moment this returns, reads below the revision fail with
        COMPACTED, so what is still physically there is invisible; the
        Compactor thread removes it in small batches while applies go on
        (one apply compacting millions of rows would hold back every entry
        after it for seconds). `wait_compacted` waits for the end
        (etcd's physical=true); hashes wait for it on their own."""
        with self._write_lock:
            rev = req.revision
            if rev <= self._compact_rev:
                raise errors.COMPACTED
            if rev > self._rev:
                raise errors.FUTURE_REV
            mark = WriteBatch()
            mark.put("meta", META_COMPACT_REVISION, pack_u64(rev))
            with self._lock:
                self._backend.write(mark)
                # The previous target's own `rev` rows stayed listed (the
                # walk only looked at them): the walk toward this one goes
                # over them again.
                self._compact_cursor = min(self._compact_cursor, pack_rev(self._compact_rev, 0))
                self._compact_reclaimed = ReclaimedKeys()  # reclaimed below the old target only
                self._compact_rev = rev
            resp = rpc_pb2.CompactionResponse()
            resp.header.revision = self._rev
        self._compactor.wake()
        return resp

    def wait_compacted(self, revision: int | None = None, timeout: float | None = None) -> bool:
        """Wait until the history below `revision` (default: the last
        compaction) is physically gone and its space reclaimed; False on
        timeout or if the store closed first."""
        target = self._compact_rev if revision is None else revision
        with self._compacted:
            return self._compacted.wait_for(lambda: self._compact_done >= target or self._closed, timeout) \
                and self._compact_done >= target

    def _compact_step(self, reclaim: bool = True) -> bool:
        """One batch of physical compaction (Compactor thread, or the
        constructor finishing an interrupted one); False when there is
        nothing left to do."""
        with self._write_lock:
            if self._closed:
                return False
            target = self._compact_rev
            if self._compact_finished >= target:
                return False
            step = next_compaction_batch(self._backend, target, start=self._compact_cursor,
                                         reclaimed=self._compact_reclaimed)
            if step is not None:
                batch, resume_at = step
                with self._lock:
                    self._backend.write(batch)
                # Only once written: a batch whose write failed is made again.
                self._compact_cursor = resume_at
                self._compact_reclaimed.confirm()
                return True
            self._compact_reclaimed = ReclaimedKeys()  # the walk is over: let go of them
            done = WriteBatch()
            done.put("meta", META_COMPACT_FINISHED, pack_u64(target))
            with self._lock:
                self._backend.write(done)
                self._compact_finished = target
            backend = self._backend
        with self._compacted:
            self._compacted.notify_all()  # hashes wait for the rows to be gone
        if reclaim:
            # A backend that frees space only when it rewrites its files
            # (RocksDB) does so now, so the history dropped stops counting
            # as in use, as etcd reports right after a compaction. Outside
            # the locks: reads and applies go on (the engine guards itself
            # against being closed meanwhile).
            self._reclaim(backend)
        with self._compacted:
            if self._backend is backend and self._compact_finished >= target:  # not replaced meanwhile
                self._compact_done = max(self._compact_done, target)
            self._compacted.notify_all()
        return True  # a newer compaction may have been recorded meanwhile

    @staticmethod
    def _reclaim(backend: Backend) -> None:
        reclaim = getattr(backend, "compact", None)
        if reclaim is None:
            return
        try:
            reclaim(COMPACTED_TABLES)
        except Exception as exc:  # closed or replaced by a snapshot meanwhile
            log.warning("reclaiming space after a compaction failed: %s", exc)

    # -- the pieces of a mutating request ----------------------------------------
    def _put(self, w: WriteTxn, req: rpc_pb2.PutRequest, out: rpc_pb2.PutResponse) -> None:
        self._require_lease(req.lease)
        key = req.key
        prev = w.get(key)
        if (req.ignore_value or req.ignore_lease) and prev is None:
            raise errors.KEY_NOT_FOUND
        value = record_value(prev) if req.ignore_value else req.value  # type: ignore[arg-type]
        lease = record_header(prev)[4] if req.ignore_lease else req.lease  # type: ignore[arg-type]
        if req.prev_kv and prev is not None:
            fill_kv(out.prev_kv, key, prev)
        w.put(key, value, lease, prev)
        out.header.revision = w.rev

    def _delete(self, w: WriteTxn, req: rpc_pb2.DeleteRangeRequest, out: rpc_pb2.DeleteRangeResponse) -> None:
        kr = key_range(req.key, req.range_end)
        victims = _items(w, kr)
        if req.prev_kv:
            for key, rec in victims:
                fill_kv(out.prev_kvs.add(), key, rec)
        w.delete_all(victims)
        out.deleted = len(victims)
        out.header.revision = w.read_rev

    def _txn_range(self, w: WriteTxn, req: rpc_pb2.RangeRequest, out: rpc_pb2.RangeResponse) -> None:
        # Revision 0 reads this txn's own writes; an explicit one was checked
        # (<= begin_rev) and reads committed state, which is begin_rev's.
        rev = req.revision
        view: View
        if rev <= 0:
            view = w
        elif rev == w.begin_rev:
            view = CurrentView(self._backend)
        else:
            view = HistoricalView(self._backend, rev)
        fill_response(out, _select(view, req), req)
        out.header.revision = w.read_rev

    def _txn(self, w: WriteTxn, req: rpc_pb2.TxnRequest, path: Iterator[bool], out: rpc_pb2.TxnResponse) -> None:
        ok, ops = chosen_ops(req, path)
        out.succeeded = ok
        for op in ops:
            which = op.WhichOneof("request")
            r = out.responses.add()
            if which == "request_range":
                self._txn_range(w, op.request_range, r.response_range)
            elif which == "request_put":
                self._put(w, op.request_put, r.response_put)
            elif which == "request_delete_range":
                self._delete(w, op.request_delete_range, r.response_delete_range)
            elif which == "request_txn":
                r.response_txn.header.SetInParent()  # etcd: nested header stays zero
                self._txn(w, op.request_txn, path, r.response_txn)

    def _check_txn_put(self, before: View, req: rpc_pb2.PutRequest) -> None:
        if (req.ignore_value or req.ignore_lease) and before.get(req.key) is None:
            raise errors.KEY_NOT_FOUND
        self._require_lease(req.lease)

    def _check_txn_range(self, req: rpc_pb2.RangeRequest, begin_rev: int) -> None:
        if req.revision > begin_rev:
            raise errors.FUTURE_REV
        if 0 < req.revision < self._compact_rev:
            raise errors.COMPACTED

    def _require_lease(self, lease: int) -> None:
        # etcd rejects a put naming an unknown lease before applying anything.
        if lease and lease not in self._leases:
            raise errors.LEASE_NOT_FOUND

    def _commit(self, w: WriteTxn, always: bool = False) -> None:
        """Write the request's batch (with the applied position) and move
        the revision if it changed any key. A request that changed no key
        writes nothing, unless `always` (lease rows changed)."""
        if not w.changes:
            if always:
                w.batch.put("meta", META_APPLIED, _APPLIED.pack(*self._position))
                with self._lock:
                    self._backend.write(w.batch)
                    self._applied = self._position
            return  # read-only txn or a delete that matched nothing: no revision
        w.batch.put("meta", META_REVISION, pack_u64(w.rev))
        w.batch.put("meta", META_APPLIED, _APPLIED.pack(*self._position))
        with self._lock:
            try:
                self._backend.write(w.batch)
            except BaseException:
                self._drop_unfinished()  # what went ahead must not outlive the request
                raise
            self._rev = w.rev
            self._applied = self._position
        if self._listeners:
            self._notify(w.rev, w.changes)

    def _notify(self, rev: int, changes: list[Change]) -> None:
        events = LazyEvents(rev, changes)
        for listener in list(self._listeners):
            try:
                listener(rev, events)
            except Exception:  # one bad listener must not stop the apply loop
                log.exception("store listener failed at revision %d", rev)

    # -- leases -------------------------------------------------------------------
    def lease_grant(self, req: rpc_pb2.LeaseGrantRequest) -> rpc_pb2.LeaseGrantResponse:
        """Record a lease (ID and TTL chosen and checked by the proposer)."""
        with self._write_lock:
            if req.ID in self._leases:
                raise errors.LEASE_EXISTS
            w = WriteTxn(self._backend, self._rev)
            w.batch.put("lease", lease_key(req.ID), pack_ttl(req.TTL))
            self._commit(w, always=True)
            self._leases[req.ID] = req.TTL
            resp = rpc_pb2.LeaseGrantResponse(ID=req.ID, TTL=req.TTL)
            resp.header.revision = self._rev
        return resp

    def lease_revoke(self, req: rpc_pb2.LeaseRevokeRequest) -> rpc_pb2.LeaseRevokeResponse:
        """Drop a lease and delete every key attached to it, in one revision."""
        with self._write_lock:
            if req.ID not in self._leases:
                raise errors.LEASE_NOT_FOUND
            w = WriteTxn(self._backend, self._rev)
            for key in list(attached_keys(self._backend, req.ID)):
                rec = w.get(key)
                if rec is not None:
                    w.delete(key, rec)  # also drops the attachment row
            w.batch.delete("lease", lease_key(req.ID))
            self._commit(w, always=True)
            del self._leases[req.ID]
            resp = rpc_pb2.LeaseRevokeResponse()
            resp.header.revision = self._rev
        return resp

    def lease_ttl(self, lease: int) -> int | None:
        """Granted TTL of a lease, None if there is no such lease."""
        return self._leases.get(lease)

    def leases(self) -> dict[int, int]:
        """Every lease: id -> granted TTL (a copy)."""
        return dict(self._leases)

    def lease_keys(self, lease: int) -> list[bytes]:
        with self._lock:
            return list(attached_keys(self._backend, lease))

    # -- events -------------------------------------------------------------------
    def add_listener(self, listener: EventListener) -> None:
        """listener(revision, events) runs on the applying thread after each
        committed change, in revision order. All listeners get the same event
        list: they must not modify it."""
        with self._write_lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: EventListener) -> None:
        with self._write_lock:
            self._listeners.remove(listener)

    def events_since(
        self,
        start_revision: int,
        key: bytes,
        range_end: bytes = b"",
        end_revision: int | None = None,
    ) -> Iterator[RevisionEvents]:
        """Replay the events of [key, range_end) from start_revision through
        end_revision (default: the revision current now) as (revision, events),
        one item per revision, from history.

        Raises COMPACTED now if start_revision < compact_revision (that
        history is gone; etcd cancels such a watch with compact_revision), or
        later, from the iterator, if a compaction overtakes the replay.
        """
        start = max(start_revision, 1)
        with self._lock:
            if start < self._compact_rev:
                raise errors.COMPACTED
            end = self._rev if end_revision is None else end_revision
        return self._replay(start, end, key_range(key, range_end))

    def _replay(self, start: int, end: int, keys: KeyRange) -> Iterator[RevisionEvents]:
        nxt = start
        while nxt <= end and not keys.empty:
            with self._lock:
                if nxt < self._compact_rev:
                    raise errors.COMPACTED
                chunk, nxt = read_events(self._backend, nxt, end, keys, REPLAY_ROWS, self._compact_rev)
            yield from chunk

    # -- maintenance ----------------------------------------------------------------
    def hash_kv(self, revision: int = 0) -> tuple[int, int]:
        """(crc32, compact_revision) over every version kept at or below
        `revision` (0: current) -- key, (main, sub) and stored record bytes in
        key-then-revision order. Two stores that applied the same requests
        agree, whatever their engines (once compaction has physically
        caught up, which this waits for)."""
        with self._settled():
            cur, compact = self._rev, self._compact_rev
            if revision > 0 and revision <= compact:
                raise errors.COMPACTED
            if revision > cur:
                raise errors.FUTURE_REV
            rev = revision if revision > 0 else cur
            crc = 0
            for key, main, sub, rec in _all_versions(self._backend):
                if main <= rev:
                    crc = zlib.crc32(rec, zlib.crc32(pack_rev(main, sub), zlib.crc32(key, crc)))
        return crc, compact

    def attach_raft(self, source: RaftStatusSource | None) -> None:
        self._raft = source

    def get_raft_status(self) -> RaftStatus:
        source = self._raft
        if source is not None:
            return source.raft_status()
        return RaftStatus(
            node_id=self._node_id,
            term=0,
            leader_id=0,
            state=RaftRole.STANDALONE.value,
            applied=0,
            commit=0,
        )

    def db_size(self) -> tuple[int, int]:
        return self._backend.size()

    @contextlib.contextmanager
    def _settled(self, timeout: float = 60.0) -> Iterator[None]:
        """Hold the read lock at a moment no compaction is half done, so a
        hash covers exactly what every member keeps. A compaction that does
        not finish within `timeout` fails the call (TIMEOUT) rather than
        giving a hash other members would not match."""
        deadline = time.monotonic() + timeout
        while True:
            with self._compacted:
                self._compacted.wait_for(
                    lambda: self._compact_finished >= self._compact_rev or self._closed,
                    max(0.0, deadline - time.monotonic()))
            self._lock.acquire()
            if self._compact_finished >= self._compact_rev or self._closed:
                break
            self._lock.release()
            if time.monotonic() >= deadline:
                raise errors.TIMEOUT
        try:
            yield
        finally:
            self._lock.release()

    def close(self) -> None:
        self._compactor.stop()
        with self._write_lock, self._lock:
            self._closed = True
            self._backend.close()
        with self._compacted:
            self._compacted.notify_all()

    # -- maintenance service: replicated meta rows, whole-backend hash, copies ----
    # (metastore.maintenance builds etcd's Alarm, Hash and Snapshot on these.)
    def meta_items(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        """The `meta` rows whose key starts with `prefix`, in key order."""
        end = prefix[:-1] + bytes([prefix[-1] + 1]) if prefix and prefix[-1] < 0xFF else None
        with self._lock:
            return list(self._backend.scan("meta", prefix, end))

    def write_meta(self, rows: dict[bytes, bytes | None]) -> None:
        """Put (value) or delete (None) `meta` rows as one applied request:
        tagged with its place in the Raft log like any mutation, so a
        replay after a restart skips it, and no revision is used (etcd's
        alarms live outside the MVCC keyspace too). Apply thread only."""
        with self._write_lock:
            w = WriteTxn(self._backend, self._rev)
            for key, value in rows.items():
                if value is None:
                    w.batch.delete("meta", key)
                else:
                    w.batch.put("meta", key, value)
            self._commit(w, always=True)
            self.meta_generation += 1

    def hash_backend(self, ignore: frozenset[tuple[str, bytes]] = frozenset()) -> tuple[int, int]:
        """(crc32 of every backend row of every table but `ignore`, revision),
        both read under one lock hold: etcd's Hash of the whole backend.
        Rows are framed by table and lengths so no two contents collide by
        concatenation; engine-independent since both engines hold the same bytes.
        Waits for a running compaction, whose progress differs between members."""
        frame = struct.Struct(">II")  # key and value lengths
        with self._settled():
            crc = 0
            for table in TABLES:
                crc = zlib.crc32(table.encode(), crc)
                for key, value in self._backend.scan(table, b"", None):
                    if (table, key) in ignore:
                        continue
                    crc = zlib.crc32(value, zlib.crc32(key, zlib.crc32(frame.pack(len(key), len(value)), crc)))
            return crc, self._rev

    def prepare_frozen_copy(self) -> None:
        """The RocksDB engine flushes its memtables (the caller runs this on
        a thread of its own), so the checkpoint of the coming frozen copy --
        taken while nothing is applied -- has little left to flush; the
        memory engine has nothing to prepare."""
        flush = getattr(self._backend, "flush_memtables", None)
        if flush is not None:
            flush()

    def frozen_copy(self, target_dir: str) -> Iterable[tuple[str, bytes, bytes]] | None:
        """A point-in-time copy of the whole backend, taken between two
        mutations (never half a request or half a compaction batch) while
        the apply thread keeps going afterwards: for Raft and client
        snapshots. The RocksDB engine writes a checkpoint (hard links,
        milliseconds) to `target_dir` and returns None; the memory engine
        returns its rows copy-on-write (close() them once read). Mutations
        wait while the copy is made."""
        with self._write_lock:
            if self.checkpoint(target_dir):
                return None
            with self._lock:
                frozen = getattr(self._backend, "frozen_rows", None)
                return frozen() if frozen is not None else self._all_rows()


# -- helpers --------------------------------------------------------------------
def _items(view: View, kr: KeyRange) -> list[tuple[bytes, bytes]]:
    if kr.empty:
        return []
    if kr.single:
        rec = view.get(kr.start)
        return [] if rec is None else [(kr.start, rec)]
    return list(view.scan(kr.start, kr.end))


def _select(view: View, req: rpc_pb2.RangeRequest) -> Selection:
    kr = key_range(req.key, req.range_end)
    if kr.empty or kr.single:
        return select(_items(view, kr), req)
    return select(view.scan(kr.start, kr.end), req)


def _flatten(req: rpc_pb2.TxnRequest, path: Iterator[bool]) -> Iterator[rpc_pb2.RequestOp]:
    """The non-txn ops the txn will run, nested txns expanded, in order."""
    _ok, ops = chosen_ops(req, path)
    for op in ops:
        if op.WhichOneof("request") == "request_txn":
            yield from _flatten(op.request_txn, path)
        else:
            yield op


def _all_versions(backend: Backend) -> Iterator[tuple[bytes, int, int, bytes]]:
    """Every stored version as (key, main, sub, record-or-tombstone), ordered
    by key then revision: a key's history rows, then its current record."""

    def hist() -> Iterator[tuple[bytes, int, int, int, bytes]]:
        for hk, rec in backend.scan("hist", b"", None):
            key, main, sub = split_hist_key(hk)
            yield key, 0, main, sub, rec

    def current() -> Iterator[tuple[bytes, int, int, int, bytes]]:
        for key, rec in backend.scan("kv", b"", None):
            _c, mod, sub, _v, _l = record_header(rec)
            yield key, 1, mod, sub, rec

    for key, _order, main, sub, rec in heapq.merge(hist(), current(), key=lambda t: t[:2]):
        yield key, main, sub, rec
