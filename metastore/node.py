"""A metastore member, assembled: Store + state machine + Raft + proposer.

This is the one path every request takes below the gRPC layer:

    service -> Node.put()/range()/... -> Proposer (batch | read barrier)
            -> RaftNode (pysyncobj log) -> StateMachine.apply -> Store
            -> result back to the waiting request

The Node owns the lifecycle (start, publish, stop) and fills etcd's response
header (cluster id, member id, raft term) so that nothing below it needs to
know who it is.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
from typing import Any

from metastore import ETCD_COMPAT_VERSION, errors, snapshot, validate
from metastore.api.pb import raft_entry_pb2, rpc_pb2
from metastore.cluster import Member, Membership, hostport, member_id
from metastore.config import ConfigError, ServerConfig
from metastore.engines import open_store
from metastore.lessor import MAX_LEASE_TTL, Lessor, minimum_ttl
from metastore.proposer import Proposer
from metastore.raft import RaftConfig, RaftNode
from metastore.state_machine import StateMachine
from metastore.types import RaftRole, RaftStatus
from metastore.watch_hub import WatchHub

log = logging.getLogger("metastore.node")

_DATA_DIR_MARKER = "metastore.json"


class Node:
    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg = cfg.resolved()
        initial = cfg.initial_members()
        self.membership = Membership(cfg.initial_cluster_token, initial)
        self.member_id = member_id(cfg.name, cfg.initial_cluster_token)
        self.cluster_id = self.membership.cluster_id
        self._prepare_data_dir()
        self.store = open_store(cfg.engine, cfg.data_dir, self.member_id)
        self.min_lease_ttl = minimum_ttl(cfg.election_timeout_ms)
        self.lessor = Lessor(self.store, grace=self.min_lease_ttl)
        self.state_machine = StateMachine(self.store, self.membership, self.lessor)
        # Registered before Raft can apply anything, so no event is missed.
        self.watch_hub = WatchHub(self.store)
        me = self.membership.get(self.member_id)
        partners = [m.raft_address for m in self.membership.members() if m.id != self.member_id]
        self.raft = RaftNode(
            RaftConfig(
                self_address=me.raft_address,
                partner_addresses=partners,
                bind_address=hostport(cfg.listen_peer_urls[0]),
                journal_file=os.path.join(cfg.member_dir, "raft.log"),
                snapshot_file=os.path.join(cfg.member_dir, "raft.snapshot"),
                snapshot_entries=cfg.snapshot_count,
                fsync=not cfg.unsafe_no_fsync,
                password=cfg.peer_secret,
                heartbeat_interval=cfg.heartbeat_interval_ms / 1000,
                election_timeout=cfg.election_timeout_ms / 1000,
            ),
            node_id=self.member_id,
            member_id_of=self.membership.id_of_address,
            apply=self.state_machine.apply,
            save_snapshot=lambda path, raft_data: snapshot.save(path, self.store, self.membership, raft_data),
            load_snapshot=lambda path: snapshot.load(path, self.store, self.membership),
        )
        self.store.attach_raft(self.raft)
        # Before this member's first expiry check as leader (tick thread).
        self.raft.on_role_change(lambda role: self.lessor.became_leader() if role is RaftRole.LEADER else None)
        self.proposer = Proposer(self.raft, self.member_id, timeout=cfg.request_timeout)
        self._publish_task: asyncio.Task | None = None
        self._expiry_task: asyncio.Task | None = None

    def _prepare_data_dir(self) -> None:
        """Create the data dir, or check an existing one belongs to this member
        and engine (opening another engine's data would silently lose it)."""
        cfg = self.cfg
        marker = os.path.join(cfg.data_dir, _DATA_DIR_MARKER)
        wanted = {"engine": cfg.engine, "name": cfg.name, "member_id": f"{self.member_id:x}",
                  "cluster_id": f"{self.cluster_id:x}"}
        if os.path.exists(marker):
            with open(marker) as f:
                found = json.load(f)
            for key in ("engine", "member_id", "cluster_id"):
                if found.get(key) != wanted[key]:
                    raise ConfigError(
                        f"data dir {cfg.data_dir} was written with {key}={found.get(key)}, this server "
                        f"has {key}={wanted[key]}; use a matching configuration or another --data-dir")
            os.makedirs(cfg.member_dir, exist_ok=True)
            return
        os.makedirs(cfg.member_dir, exist_ok=True)
        tmp = marker + ".tmp"
        with open(tmp, "w") as f:
            json.dump(wanted, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, marker)

    # -- lifecycle -----------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.proposer.bind(loop)
        self.watch_hub.start(loop)
        await loop.run_in_executor(None, self.raft.start)
        self._publish_task = loop.create_task(self._publish_attributes())
        self._expiry_task = loop.create_task(self._expire_leases())

    async def stop(self) -> None:
        self.proposer.close()
        self.watch_hub.stop()
        for task in (self._publish_task, self._expiry_task):
            if task is not None:
                task.cancel()
        await asyncio.get_running_loop().run_in_executor(None, self.raft.stop)
        self.store.close()

    async def _publish_attributes(self) -> None:
        """Announce our name and client URLs through Raft so every member's
        MemberList shows them (etcd members publish themselves the same way)."""
        attrs = raft_entry_pb2.MemberAttributes(
            member_id=self.member_id, name=self.cfg.name, client_urls=self.cfg.advertise_client_urls)
        while True:
            try:
                await self.proposer.propose(raft_entry_pb2.Proposal(publish=attrs))
                log.info("published member %x (%s) client URLs %s", self.member_id, self.cfg.name,
                         ",".join(self.cfg.advertise_client_urls))
                return
            except errors.EtcdError as err:
                log.debug("publish not done yet: %s", err.message)
                await asyncio.sleep(0.5)

    # -- KV ------------------------------------------------------------------
    async def range(self, req: rpc_pb2.RangeRequest) -> rpc_pb2.RangeResponse:
        validate.validate_range(req)
        if not req.serializable:
            await self.proposer.barrier()
        resp = self.store.range(req)
        self._fill_header(resp.header)
        return resp

    async def put(self, req: rpc_pb2.PutRequest) -> rpc_pb2.PutResponse:
        validate.validate_put(req)
        return await self._propose(raft_entry_pb2.Proposal(put=req))

    async def delete_range(self, req: rpc_pb2.DeleteRangeRequest) -> rpc_pb2.DeleteRangeResponse:
        validate.validate_delete_range(req)
        return await self._propose(raft_entry_pb2.Proposal(delete_range=req))

    async def txn(self, req: rpc_pb2.TxnRequest) -> rpc_pb2.TxnResponse:
        validate.validate_txn(req)
        if validate.txn_is_read_only(req):
            # etcd serves a read-only txn as a linearizable read: no log entry.
            await self.proposer.barrier()
            resp = self.store.txn(req)
            self._fill_header(resp.header)
            return resp
        return await self._propose(raft_entry_pb2.Proposal(txn=req))

    async def compact(self, req: rpc_pb2.CompactionRequest) -> rpc_pb2.CompactionResponse:
        return await self._propose(raft_entry_pb2.Proposal(compaction=req))

    async def _propose(self, proposal: raft_entry_pb2.Proposal) -> Any:
        if proposal.ByteSize() > self.cfg.max_request_bytes:
            raise errors.REQUEST_TOO_LARGE
        resp = await self.proposer.propose(proposal)
        self._fill_header(resp.header)
        return resp

    async def hash_kv(self, revision: int) -> rpc_pb2.HashKVResponse:
        """etcd's HashKV: a hash of the MVCC history up to `revision` (0 =
        current), identical on members that applied the same entries. The
        scan runs off the event loop."""
        loop = asyncio.get_running_loop()
        rev = revision or self.store.revision
        crc, compact = await loop.run_in_executor(None, self.store.hash_kv, rev)
        resp = rpc_pb2.HashKVResponse(hash=crc, compact_revision=compact)
        self._fill_header(resp.header)  # etcd reports the current revision
        return resp

    # -- leases --------------------------------------------------------------
    async def lease_grant(self, req: rpc_pb2.LeaseGrantRequest) -> rpc_pb2.LeaseGrantResponse:
        if req.TTL > MAX_LEASE_TTL:
            raise errors.LEASE_TTL_TOO_LARGE
        # Clamped here, not when applied: every member must store the same TTL.
        ttl = max(req.TTL, self.min_lease_ttl)
        if req.ID:
            return await self._propose(raft_entry_pb2.Proposal(
                lease_grant=rpc_pb2.LeaseGrantRequest(ID=req.ID, TTL=ttl)))
        while True:  # a server-chosen id: random, retried on the rare clash
            lease = secrets.randbits(63) or 1
            try:
                return await self._propose(raft_entry_pb2.Proposal(
                    lease_grant=rpc_pb2.LeaseGrantRequest(ID=lease, TTL=ttl)))
            except errors.EtcdError as err:
                if err is not errors.LEASE_EXISTS:
                    raise

    async def lease_revoke(self, req: rpc_pb2.LeaseRevokeRequest) -> rpc_pb2.LeaseRevokeResponse:
        return await self._propose(raft_entry_pb2.Proposal(lease_revoke=req))

    async def lease_keepalive(self, lease: int) -> rpc_pb2.LeaseKeepAliveResponse:
        """Restart the lease's clock on every member; TTL 0 for a lease that
        does not exist or has already expired (etcd's answer)."""
        resp = rpc_pb2.LeaseKeepAliveResponse(ID=lease)
        if self.store.lease_ttl(lease) is None:
            await self.proposer.barrier()  # granted through another member just now?
        if self.store.lease_ttl(lease) is not None:
            # Even past its deadline on this member's clock: only a revoke
            # ends a lease, and a client told TTL 0 gives it up for good.
            await self.proposer.propose(raft_entry_pb2.Proposal(
                lease_refresh=raft_entry_pb2.LeaseRefresh(ids=[lease])))
            resp.TTL = self.store.lease_ttl(lease) or 0
        self._fill_header(resp.header)
        return resp

    async def lease_time_to_live(self, req: rpc_pb2.LeaseTimeToLiveRequest) -> rpc_pb2.LeaseTimeToLiveResponse:
        await self.proposer.barrier()
        resp = rpc_pb2.LeaseTimeToLiveResponse(ID=req.ID, TTL=-1)
        granted = self.store.lease_ttl(req.ID)
        left = self.lessor.remaining(req.ID)
        if granted is not None and left is not None:
            resp.TTL = max(0, int(left))
            resp.grantedTTL = granted
            if req.keys:
                resp.keys.extend(self.store.lease_keys(req.ID))
        self._fill_header(resp.header)
        return resp

    async def lease_leases(self) -> rpc_pb2.LeaseLeasesResponse:
        await self.proposer.barrier()
        resp = rpc_pb2.LeaseLeasesResponse()
        for lease in sorted(self.store.leases()):
            resp.leases.add(ID=lease)
        self._fill_header(resp.header)
        return resp

    async def _expire_leases(self, period: float = 0.1, max_per_round: int = 500) -> None:
        """On the leader: revoke every lease past its deadline."""
        pending: set[int] = set()

        async def revoke(lease: int) -> None:
            try:
                await self.proposer.propose(raft_entry_pb2.Proposal(
                    lease_revoke=rpc_pb2.LeaseRevokeRequest(ID=lease)))
                log.info("lease %x expired and was revoked", lease)
            except errors.EtcdError as err:
                if err is not errors.LEASE_NOT_FOUND:
                    log.debug("revoking expired lease %x failed: %s", lease, err.message)
            finally:
                pending.discard(lease)

        while True:
            await asyncio.sleep(period)
            if not self.raft.is_leader():
                continue
            try:
                expired = self.lessor.expired()
            except Exception:  # never let one bad round end expiry for good
                log.exception("checking lease expiry failed")
                continue
            for lease in expired:
                if len(pending) >= max_per_round:
                    break
                if lease not in pending:
                    pending.add(lease)
                    asyncio.get_running_loop().create_task(revoke(lease))

    # -- cluster and status --------------------------------------------------
    def raft_status(self) -> RaftStatus:
        return self.store.get_raft_status()

    def members(self) -> list[Member]:
        return self.membership.members()

    def status(self) -> rpc_pb2.StatusResponse:
        st = self.raft_status()
        total, in_use = self.store.db_size()
        resp = rpc_pb2.StatusResponse(
            version=ETCD_COMPAT_VERSION, dbSize=total, dbSizeInUse=in_use, leader=st.leader_id,
            raftIndex=st.commit, raftTerm=st.term, raftAppliedIndex=st.applied)
        if st.leader_id == 0:
            resp.errors.append(errors.NO_LEADER.message)
        self._fill_header(resp.header, term=st.term)
        return resp

    def header(self) -> rpc_pb2.ResponseHeader:
        h = rpc_pb2.ResponseHeader()
        self._fill_header(h)
        return h

    def _fill_header(self, header: rpc_pb2.ResponseHeader, term: int | None = None) -> None:
        header.cluster_id = self.cluster_id
        header.member_id = self.member_id
        header.raft_term = term if term is not None else self.raft.term()
        if not header.revision:
            header.revision = self.store.revision

