"""etcd's Maintenance service beyond Status/HashKV: alarms and the space
quota, Defragment, Hash and Snapshot, for one member (`Node.maintenance`).

Quota and NOSPACE, as etcd 3.4 does it:
- before a Put, a Txn or a LeaseGrant is proposed, the member checks
  backend size + the request's estimated cost against --quota-backend-bytes
  (etcd's quotaKVServer/quotaLeaseServer); over it, the member proposes a
  NOSPACE alarm for itself and refuses the request with etcd's
  RESOURCE_EXHAUSTED "etcdserver: mvcc: database space exceeded";
- while a NOSPACE alarm is active (replicated, so on every member) Puts,
  Txns that put something and LeaseGrants are refused (etcd's capped
  applier). Ranges, deletes, compaction and revokes go on, so an operator
  can free space: compact, defragment, then `etcdctl alarm disarm`.
  etcd refuses them when it applies the entry; metastore refuses them
  before proposing, from this member's copy of the alarms, which is the
  same outcome except for a request racing the alarm's own entry.

Alarms themselves are in `metastore.alarms`.
"""
from __future__ import annotations

import asyncio
import glob
import logging
import os
import shutil
import tempfile
import time
from typing import TYPE_CHECKING, AsyncIterator

from grpc import StatusCode

from metastore import alarms, dbsnapshot, errors, etcd_snapshot
from metastore.api.pb import raft_entry_pb2, rpc_pb2
from metastore.mvcc_layout import META_APPLIED

if TYPE_CHECKING:
    from metastore.node import Node

log = logging.getLogger("metastore.maintenance")

# etcd's defaults: --quota-backend-bytes 0 means 2 GiB; above 8 GiB etcd warns.
DEFAULT_QUOTA_BYTES = 2 * 1024 ** 3
MAX_QUOTA_BYTES = 8 * 1024 ** 3
# etcd's cost estimates (etcdserver/quota.go): metadata of a key, of a lease.
KV_OVERHEAD = 256
LEASE_OVERHEAD = 64
# Snapshot stream message size (etcd sends 32 KiB; clients accept any size).
SNAPSHOT_CHUNK = 256 * 1024
# How long a Defragment waits for a background compaction to finish first.
DEFRAG_WAIT_FOR_COMPACTION = 60.0
# The applied Raft position is this member's bookkeeping, like etcd's
# consistent_index, which etcd's Hash ignores for the same reason.
HASH_IGNORES = frozenset({("meta", META_APPLIED)})
# Scratch directories of snapshots being streamed, under the data dir.
_STAGING_PREFIX = ".client-snapshot-"


def quota_bytes(configured: int) -> int | None:
    """The quota in bytes from --quota-backend-bytes: 0 is etcd's default
    (2 GiB), a negative value disables the quota (None)."""
    if configured < 0:
        return None
    if configured == 0:
        return DEFAULT_QUOTA_BYTES
    if configured > MAX_QUOTA_BYTES:
        log.warning("--quota-backend-bytes %d exceeds the maximum recommended quota %d",
                    configured, MAX_QUOTA_BYTES)
    return configured


def _txn_cost(txn: rpc_pb2.TxnRequest) -> int:
    """etcd's costTxn: the heavier branch's puts. Nested txns count too
    (etcd 3.4 skips them, which lets a nested put slip past NOSPACE)."""

    def branch(ops) -> int:
        total = 0
        for op in ops:
            which = op.WhichOneof("request")
            if which == "request_put":
                total += KV_OVERHEAD + len(op.request_put.key) + len(op.request_put.value)
            elif which == "request_txn":
                total += _txn_cost(op.request_txn)
        return total

    return max(branch(txn.success), branch(txn.failure))


def request_cost(proposal: raft_entry_pb2.Proposal) -> int | None:
    """Estimated bytes a request adds (etcd's backendQuota.Cost), or None
    for requests the quota does not apply to."""
    kind = proposal.WhichOneof("op")
    if kind == "put":
        return KV_OVERHEAD + len(proposal.put.key) + len(proposal.put.value)
    if kind == "txn":
        return _txn_cost(proposal.txn)
    if kind == "lease_grant":
        return LEASE_OVERHEAD
    return None


class Maintenance:
    """One member's maintenance operations; built by Node, used by the
    gRPC Maintenance service and by Node._propose (the quota check)."""

    def __init__(self, node: "Node") -> None:
        self._node = node
        self.quota = quota_bytes(node.cfg.quota_backend_bytes)
        self._raising: asyncio.Future | None = None  # our NOSPACE proposal in flight
        # Scratch left by a snapshot stream a crash interrupted.
        for stale in glob.glob(os.path.join(node.cfg.data_dir, _STAGING_PREFIX + "*")):
            shutil.rmtree(stale, ignore_errors=True)

    # -- quota -----------------------------------------------------------------
    async def check_quota(self, proposal: raft_entry_pb2.Proposal) -> None:
        """Refuse a Put/Txn/LeaseGrant with NO_SPACE when it does not fit
        the quota (raising the NOSPACE alarm) or a NOSPACE alarm is active."""
        cost = request_cost(proposal)
        if cost is None:
            return
        store = self._node.store
        if self.quota is not None and store.db_size()[0] + cost >= self.quota:
            await self._raise_nospace()
            raise errors.NO_SPACE
        if (cost > 0 or proposal.WhichOneof("op") != "txn") and alarms.is_active(store, alarms.NOSPACE):
            raise errors.NO_SPACE

    async def _raise_nospace(self) -> None:
        """Propose NOSPACE for this member (etcd's quotaAlarmer does the same
        on every refused request); one proposal at a time, none if it is
        already active. Its failure is logged, not the client's error."""
        node = self._node
        if (node.member_id, alarms.NOSPACE) in alarms.active(node.store, alarms.NOSPACE):
            return
        if self._raising is not None:
            await asyncio.shield(self._raising)
            return
        self._raising = asyncio.get_running_loop().create_future()
        try:
            total = node.store.db_size()[0]
            log.warning("database space exceeded (%d bytes, quota %d): raising the NOSPACE alarm",
                        total, self.quota)
            await node._propose(raft_entry_pb2.Proposal(alarm=rpc_pb2.AlarmRequest(
                action=alarms.ACTIVATE, memberID=node.member_id, alarm=alarms.NOSPACE)))
        except errors.EtcdError as err:
            log.warning("could not raise the NOSPACE alarm: %s", err.message)
        finally:
            self._raising.set_result(None)
            self._raising = None

    # -- alarms -------------------------------------------------------------------
    async def alarm(self, req: rpc_pb2.AlarmRequest) -> rpc_pb2.AlarmResponse:
        """etcd's Alarm: GET reads the replicated alarms (linearizable: after
        a read barrier); ACTIVATE/DEACTIVATE go through Raft. As etcd 3.4's,
        the response has no header."""
        node = self._node
        if req.action == alarms.GET:
            await node.read_barrier.wait()
            return alarms.response(alarms.active(node.store, req.alarm))
        resp = await node._propose(raft_entry_pb2.Proposal(alarm=rpc_pb2.AlarmRequest(
            action=req.action, memberID=req.memberID, alarm=req.alarm)))
        resp.ClearField("header")  # etcd answers alarms without a header
        return resp

    def alarm_errors(self) -> list[str]:
        """The active alarms as etcd 3.4 lists them in StatusResponse.errors."""
        return [alarms.describe(member, kind) for member, kind in alarms.active(self._node.store)]

    # -- defragment ---------------------------------------------------------------
    async def defragment(self) -> rpc_pb2.DefragmentResponse:
        """etcd's Defragment, on this member only: give the space that
        compaction freed back to the filesystem. RocksDB: a full manual
        compaction of every table, in an executor (reads and writes go on).
        The memory engine frees deleted data at once: nothing to do."""
        node = self._node
        loop = asyncio.get_running_loop()
        # A compaction still dropping history in the background: let it
        # finish, so what it frees is given back too (compact, then defrag).
        await loop.run_in_executor(None, node.store.wait_compacted, None, DEFRAG_WAIT_FOR_COMPACTION)
        reclaim = getattr(node.store.backend, "compact", None)
        if reclaim is not None:
            t0 = time.monotonic()
            before = node.store.db_size()[0]
            await loop.run_in_executor(None, reclaim)
            log.info("defragmented: %d -> %d bytes in %.0f ms", before, node.store.db_size()[0],
                     (time.monotonic() - t0) * 1000)
        return rpc_pb2.DefragmentResponse()  # etcd's has no header either

    # -- hash -----------------------------------------------------------------------
    async def hash(self) -> rpc_pb2.HashResponse:
        """etcd's Hash: a crc32 of the whole backend (every table, every row,
        minus the applied position), with the revision it was taken at; equal
        on members that applied the same entries, whatever their engines."""
        node = self._node
        crc, rev = await asyncio.get_running_loop().run_in_executor(None, node.store.hash_backend, HASH_IGNORES)
        resp = rpc_pb2.HashResponse(hash=crc)
        resp.header.revision = rev
        node._fill_header(resp.header)
        return resp

    # -- snapshot ---------------------------------------------------------------------
    async def snapshot(self) -> AsyncIterator[rpc_pb2.SnapshotResponse]:
        """etcd's Snapshot stream: a consistent copy of this member's store as
        a bbolt database in etcd's schema (`metastore.dbsnapshot`), then its
        sha256 as the last message (remaining_bytes counts the data still to
        come, as etcd's does). The copy is taken and written to a scratch
        file off the event loop; the scratch is removed when the stream ends,
        however it ends."""
        node = self._node
        loop = asyncio.get_running_loop()
        os.makedirs(node.cfg.data_dir, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=node.cfg.data_dir)
        try:
            path, size = await loop.run_in_executor(None, self._write_snapshot, staging)
            data_size = size - dbsnapshot.SHA_SIZE
            with open(path, "rb") as f:
                sent = 0
                while sent < data_size:
                    chunk = await loop.run_in_executor(None, f.read, min(SNAPSHOT_CHUNK, data_size - sent))
                    if not chunk:
                        raise errors.EtcdError(StatusCode.INTERNAL, "etcdserver: snapshot file ended early")
                    sent += len(chunk)
                    # No header, as in etcd 3.4's chunks.
                    yield rpc_pb2.SnapshotResponse(remaining_bytes=data_size - sent, blob=chunk)
                yield rpc_pb2.SnapshotResponse(remaining_bytes=0, blob=f.read(dbsnapshot.SHA_SIZE))
            log.info("sent a snapshot of %d bytes", size)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _write_snapshot(self, staging: str) -> tuple[str, int]:
        """(path, size) of a fresh snapshot file in `staging` (executor thread)."""
        node = self._node
        checkpoint_dir = os.path.join(staging, "checkpoint")
        rows = node.store.frozen_copy(checkpoint_dir)
        header = {"cluster_id": f"{node.cluster_id:x}", "member_id": f"{node.member_id:x}",
                  "engine": node.cfg.engine, "created": time.time()}
        path = os.path.join(staging, "snapshot.db")
        if rows is not None:
            try:
                src = rows if hasattr(rows, "get") else etcd_snapshot.RowsView(rows)
                header["revision"] = dbsnapshot.revision_of(src)
                return path, dbsnapshot.write(path, header, src)
            finally:
                close = getattr(rows, "close", None)
                if close is not None:
                    close()  # the memory engine keeps old rows until then
        from metastore.engines.rocksdb import RocksDBBackend

        backend = RocksDBBackend(checkpoint_dir)
        try:
            header["revision"] = dbsnapshot.revision_of(backend)
            return path, dbsnapshot.write(path, header, backend)
        finally:
            backend.close()
