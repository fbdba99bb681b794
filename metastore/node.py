"""A metastore member, assembled: Store + state machine + Raft + proposer.

This is the one path every request takes below the gRPC layer:

    service -> Node.put()/range()/... -> Proposer (batch) | ReadBarrier (read index)
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
from urllib.parse import urlsplit

import grpc

from metastore import ETCD_COMPAT_VERSION, errors, liveness, snapshot, validate
from metastore.api.pb import metastore_pb2, metastore_pb2_grpc, raft_entry_pb2, rpc_pb2, rpc_pb2_grpc
from metastore.cluster import (LEARNER_NOT_READY, LEARNER_READY_RATIO, MAX_LEARNERS, MEMBER_NOT_LEARNER,
                               NOT_SUPPORTED_FOR_LEARNER, TOO_MANY_LEARNERS, Member, Membership, hostport,
                               is_loopback, member_id, member_pb)
from metastore.config import ConfigError, ServerConfig
from metastore.errors import EtcdError
from metastore.engines import open_store
from metastore.lessor import MAX_LEASE_TTL, Lessor, minimum_ttl
from metastore.maintenance import Maintenance
from metastore.placement import Placement, PlacementConfig
from metastore.proposer import Proposer
from metastore.read_barrier import ReadBarrier
from metastore.read_peers import ReadPeers
from metastore.raft import RaftConfig, RaftNode, TransferOutcome
from metastore.state_machine import StateMachine
from metastore.types import RaftRole, RaftStatus
from metastore.watch_hub import WatchHub

log = logging.getLogger("metastore.node")

# How long a leader waits for a member added by MemberAdd to start, so that
# pysyncobj's configuration change for it commits.
_MEMBER_START_TIMEOUT = 300.0

_DATA_DIR_MARKER = "metastore.json"

# An entry applying for longer than this (a big DeleteRange or txn) has a
# writing snapshot step aside for it (snapshot.PendingSnapshot._pause).
LONG_APPLY_SECONDS = 0.02


class Node:
    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg = cfg.resolved()
        initial = cfg.initial_members()
        self.membership = Membership(cfg.initial_cluster_token, initial)
        self.member_id = member_id(cfg.initial_advertise_peer_urls, cfg.initial_cluster_token)
        self.cluster_id = self.membership.cluster_id
        self._prepare_data_dir()
        # The Raft journal replays what the store loses in a crash (see
        # engines.open_store), so the store keeps no log of its own.
        self.store = open_store(cfg.engine, cfg.data_dir, self.member_id, journaled=True)
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
                snapshot_requests=cfg.snapshot_count,
                fsync=not cfg.unsafe_no_fsync,
                password=cfg.peer_secret,
                heartbeat_interval=cfg.heartbeat_interval_ms / 1000,
                election_timeout=cfg.election_timeout_ms / 1000,
            ),
            node_id=self.member_id,
            member_id_of=self.membership.id_of_address,
            apply=self.state_machine.apply,
            save_snapshot=lambda raft_data: snapshot.freeze(
                os.path.join(cfg.member_dir, "raft.snapshot.checkpoint"), self.store, self.membership, raft_data,
                busy=lambda: self.raft.applying_for() > LONG_APPLY_SECONDS),
            load_snapshot=lambda path: snapshot.load(path, self.store, self.membership),
            prepare_snapshot=self.store.prepare_frozen_copy,
        )
        self.store.attach_raft(self.raft)
        # Before this member's first expiry check as leader (tick thread).
        self.raft.on_role_change(lambda role: self.lessor.became_leader() if role is RaftRole.LEADER else None)
        # Keep-alives queued behind a long apply could not be applied
        # meanwhile: that time is not held against any lease.
        self.raft.on_long_apply(self.lessor.extend)
        self.proposer = Proposer(self.raft, self.member_id, timeout=cfg.request_timeout)
        # Read index rounds between the members' event loops, where they can.
        self.read_peers = ReadPeers(self.raft, me.raft_address, self._client_url_of, cfg.peer_secret)
        self.read_barrier = ReadBarrier(self.raft, timeout=cfg.request_timeout, peers=self.read_peers)
        # Alarms and the space quota, defragment, hash, client snapshots.
        self.maintenance = Maintenance(self)
        # Member sessions, workload placement and drain (coordinated by the leader).
        self.placement = Placement(self, PlacementConfig(
            session_ttl=cfg.session_ttl, drain_batch_size=cfg.drain_batch_size,
            move_timeout=cfg.workload_move_timeout))
        self._publish_task: asyncio.Task | None = None
        self._expiry_task: asyncio.Task | None = None
        # Membership changes: one at a time, run by the leader.
        self._changing_membership = False
        self._membership_tasks: set[asyncio.Task] = set()
        # Set once this member has been removed from the cluster.
        self.removed = asyncio.Event()
        # Set once this member cannot go on (its Raft log failed); `failure`
        # says why. Whoever runs the member stops it (cmd.serve exits 1).
        self.failed = asyncio.Event()
        self.failure = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self.state_machine.on_member_removed = self._member_removed
        self.raft.on_log_failure = self._log_failed

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
        self._loop = loop
        self.proposer.bind(loop)
        self.read_barrier.bind(loop)
        self.watch_hub.start(loop)
        await loop.run_in_executor(None, self.raft.start)
        self._publish_task = loop.create_task(self._publish_attributes())
        self._expiry_task = loop.create_task(self._expire_leases())
        self.placement.start(loop)

    async def stop(self) -> None:
        # End this member's session first, so the coordinator moves its
        # workloads now rather than when the session would expire. (Not
        # when the Raft log failed: nothing this member proposes commits.)
        await self.placement.stop(end_session=True, revoke_session=not self.raft.log_failed())
        if self.raft.is_leader() and len(self.membership.members()) > 1:
            # Hand leadership over first, so a rolling restart costs the
            # cluster no election timeout.
            try:
                await self.move_leader(None)
            except errors.EtcdError as err:
                log.warning("leadership not handed over before stopping: %s", err.message)
        self.proposer.close()
        self.read_barrier.close()
        self.read_peers.close()
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
            await self.read_barrier.wait()
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
            await self.read_barrier.wait()
            resp = self.store.txn(req)
            self._fill_header(resp.header)
            return resp
        return await self._propose(raft_entry_pb2.Proposal(txn=req))

    async def compact(self, req: rpc_pb2.CompactionRequest) -> rpc_pb2.CompactionResponse:
        """Every member records the compaction when it applies it and drops
        the history in the background; with `physical` (etcdctl's
        --physical, check perf's --auto-compact) the answer waits until this
        member has done so, as in etcd -- for as long as the client waits."""
        resp = await self._propose(raft_entry_pb2.Proposal(compaction=req))
        if req.physical:
            loop = asyncio.get_running_loop()
            # In slices, so a client that gives up frees the executor thread soon.
            while not await loop.run_in_executor(None, self.store.wait_compacted, req.revision, 1.0):
                if self.proposer.closed:
                    raise errors.STOPPED
        return resp

    async def _propose(self, proposal: raft_entry_pb2.Proposal) -> Any:
        await self.maintenance.check_quota(proposal)  # NOSPACE: etcd's quota, before anything else
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

    async def lease_revoke(self, req: rpc_pb2.LeaseRevokeRequest, *,
                           from_client: bool = True) -> rpc_pb2.LeaseRevokeResponse:
        """A client cannot revoke a member's session lease: to it, that lease
        does not exist (see member_sessions)."""
        if from_client and req.ID in self.member_sessions():
            raise errors.LEASE_NOT_FOUND
        return await self._propose(raft_entry_pb2.Proposal(lease_revoke=req))

    def refuse_on_learner(self) -> None:
        """etcd 3.4's learner serves only Status and serializable reads: the
        services that have nothing else to refuse it with call this first."""
        if self.is_learner():
            raise NOT_SUPPORTED_FOR_LEARNER

    def member_sessions(self) -> set[int]:
        """The leases of the members' own sessions (metastore.liveness). They
        are metastore's, not a client's -- etcd has no such leases -- so the
        Lease API leaves them out: `lease list` shows only clients' leases,
        and a cleanup that revokes them all cannot end a member's session."""
        return {state.session for state in liveness.read_all(self.store).values() if state.session}

    async def lease_keepalive(self, lease: int) -> rpc_pb2.LeaseKeepAliveResponse:
        """Restart the lease's clock on every member; TTL 0 for a lease that
        does not exist or has already expired (etcd's answer)."""
        resp = rpc_pb2.LeaseKeepAliveResponse(ID=lease)
        if self.store.lease_ttl(lease) is None:
            await self.read_barrier.wait()  # granted through another member just now?
        if self.store.lease_ttl(lease) is not None:
            # Even past its deadline on this member's clock: only a revoke
            # ends a lease, and a client told TTL 0 gives it up for good.
            await self.proposer.propose(raft_entry_pb2.Proposal(
                lease_refresh=raft_entry_pb2.LeaseRefresh(ids=[lease])))
            resp.TTL = self.store.lease_ttl(lease) or 0
        self._fill_header(resp.header)
        return resp

    async def lease_time_to_live(self, req: rpc_pb2.LeaseTimeToLiveRequest) -> rpc_pb2.LeaseTimeToLiveResponse:
        await self.read_barrier.wait()
        resp = rpc_pb2.LeaseTimeToLiveResponse(ID=req.ID, TTL=-1)
        granted = self.store.lease_ttl(req.ID) if req.ID not in self.member_sessions() else None
        left = self.lessor.remaining(req.ID)
        if granted is not None and left is not None:
            resp.TTL = max(0, int(left))
            resp.grantedTTL = granted
            if req.keys:
                resp.keys.extend(self.store.lease_keys(req.ID))
        self._fill_header(resp.header)
        return resp

    async def lease_leases(self) -> rpc_pb2.LeaseLeasesResponse:
        await self.read_barrier.wait()
        resp = rpc_pb2.LeaseLeasesResponse()
        for lease in sorted(self.store.leases().keys() - self.member_sessions()):
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
            if not self.raft.is_leader() or self.proposer.paused or self.raft.applying_for() > period:
                # Paused (a leadership hand-over), or stuck in a long apply:
                # keep-alives wait behind it too, so no lease may be judged
                # meanwhile (the apply's duration is then added to every lease).
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

    # -- leadership -----------------------------------------------------------
    async def move_leader(self, target_id: int | None, timeout: float | None = None) -> rpc_pb2.MoveLeaderResponse:
        """etcd's MoveLeader: only the leader can hand over; returns once the
        target leads, or fails with etcd's "leader transfer took too long"
        after `timeout` (default: the request timeout). The target must be a
        voting member (etcd: "bad leader transferee" for 0, a stranger or a
        learner); metastore's own hand-overs pass None, which picks the most
        caught-up follower. New proposals wait meanwhile, so the target
        can catch up with the log.

        The target's election can still fail (a vote lost to a member that
        just timed out itself); if this member then leads again, or the
        target has not won within an election timeout, the hand-over is
        asked for again until the deadline."""
        if not self.raft.is_leader():
            raise errors.NOT_LEADER
        target_address: str | None = None
        if target_id is not None:
            member = self.membership.get(target_id)
            if member is None or member.is_learner:
                raise errors.BAD_LEADER_TRANSFEREE
            if target_id == self.member_id:
                return rpc_pb2.MoveLeaderResponse()
            target_address = member.raft_address
        loop = asyncio.get_running_loop()
        limit = self.cfg.request_timeout if timeout is None else min(timeout, self.cfg.request_timeout)
        deadline = loop.time() + limit
        election_timeout = self.cfg.election_timeout_ms / 1000
        paused_at = loop.time()
        self.proposer.pause()
        try:
            while not await self._hand_over(target_address, target_id, deadline, election_timeout):
                pass
        finally:
            self.raft.end_transfer()
            self.proposer.resume()
            if self.raft.is_leader():
                # Still leading (the hand-over failed): keep-alives held back
                # by the pause get back the time they lost.
                self.lessor.extend(loop.time() - paused_at)
        log.info("leadership moved from %x to %x", self.member_id, self.raft.raft_status().leader_id)
        return rpc_pb2.MoveLeaderResponse()  # etcd's has no header either

    async def _hand_over(self, target_address: str | None, target_id: int | None, deadline: float,
                         election_timeout: float) -> bool:
        """One attempt of move_leader: have the "timeout now" sent, then wait
        for another member to lead. False: ask again (this member leads
        again, or the target has not won in an election timeout)."""
        loop = asyncio.get_running_loop()
        asked: asyncio.Future[TransferOutcome] = loop.create_future()

        def done(outcome: TransferOutcome) -> None:  # tick thread
            loop.call_soon_threadsafe(lambda: asked.done() or asked.set_result(outcome))

        self.raft.transfer_leadership(target_address, max(0.0, deadline - loop.time()), done)
        try:  # answered by the tick thread within the deadline, unless Raft stopped meanwhile
            outcome = await asyncio.wait_for(asked, max(0.0, deadline - loop.time()) + 1.0)
        except asyncio.TimeoutError:
            raise errors.TIMEOUT_LEADER_TRANSFER from None
        if outcome is TransferOutcome.FAILED:
            raise errors.TIMEOUT_LEADER_TRANSFER
        # SENT, or NOT_LEADER: an earlier attempt's election may be under way.
        sent_term = self.raft.raft_status().term
        ask_again_at = loop.time() + election_timeout
        while True:
            status = self.raft.raft_status()
            if status.leader_id and status.leader_id != self.member_id \
                    and (not target_id or status.leader_id == target_id):
                return True
            if loop.time() >= deadline:
                raise errors.TIMEOUT_LEADER_TRANSFER
            if status.leader_id == self.member_id and (status.term > sent_term or loop.time() >= ask_again_at):
                return False
            await asyncio.sleep(0.01)

    # -- cluster and status --------------------------------------------------
    def raft_status(self) -> RaftStatus:
        return self.store.get_raft_status()

    # -- membership ------------------------------------------------------------
    async def member_add(self, req: rpc_pb2.MemberAddRequest) -> rpc_pb2.MemberAddResponse:
        """etcd's MemberAdd, of a voter or (isLearner) a learner.

        A learner is only a table entry: Raft needs no change for it, since
        pysyncobj's leader replicates to every read-only node that dials the
        voters without counting it (RaftNode starts the new member as one
        when the running members' configuration lacks its address)."""
        urls = [str(u) for u in req.peerURLs]
        self._check_peer_urls(urls)
        if not self.raft.is_leader():
            return await self._relay_to_leader("MemberAdd", req)
        if self.membership.id_of_peer_urls(urls):
            raise errors.PEER_URL_EXISTS
        if req.isLearner and len(self.membership.learners()) >= MAX_LEARNERS:
            raise TOO_MANY_LEARNERS
        new_id = member_id(urls, self.cfg.initial_cluster_token)
        table_done = asyncio.get_running_loop().create_future()

        async def steps() -> None:
            # The table first (a new member replays the log, so it learns it
            # too), then Raft. pysyncobj counts a new voter as soon as its
            # change is appended, so that change may only commit once the new
            # member runs (as in etcd, a 1-member cluster waits for it): the
            # client is answered after the table entry.
            await self.proposer.propose(raft_entry_pb2.Proposal(
                member_change=raft_entry_pb2.MemberChange(member_id=new_id, peer_urls=urls,
                                                          is_learner=req.isLearner)))
            table_done.set_result(None)
            if not req.isLearner:
                await self._raft_membership(hostport(urls[0]), add=True, timeout=_MEMBER_START_TIMEOUT)

        await self._run_membership_change(steps(), table_done)
        log.info("%s %x added (%s)", "learner" if req.isLearner else "member", new_id, ",".join(urls))
        resp = rpc_pb2.MemberAddResponse(member=rpc_pb2.Member(ID=new_id, peerURLs=urls, isLearner=req.isLearner))
        resp.members.extend(member_pb(m) for m in self.members())
        self._fill_header(resp.header, with_revision=False)
        return resp

    async def member_remove(self, req: rpc_pb2.MemberRemoveRequest) -> rpc_pb2.MemberRemoveResponse:
        member = self.membership.get(req.ID)
        if member is None:
            raise errors.MEMBER_NOT_FOUND
        if len(self.membership.members()) == 1:
            raise EtcdError(grpc.StatusCode.FAILED_PRECONDITION,
                            "etcdserver: cannot remove the only member of the cluster")
        if not member.is_learner and len(self.membership.voters()) == 1:
            raise EtcdError(grpc.StatusCode.FAILED_PRECONDITION,
                            "etcdserver: cannot remove the only voting member of the cluster")
        if self.raft.is_leader() and req.ID == self.member_id:
            await self.move_leader(None)  # the next leader removes us
        if not self.raft.is_leader():
            return await self._relay_to_leader("MemberRemove", req)
        done = asyncio.get_running_loop().create_future()

        async def steps() -> None:
            # The table first: the member being removed must still receive
            # it (it stops itself when it applies it), then Raft.
            await self.proposer.propose(raft_entry_pb2.Proposal(
                member_change=raft_entry_pb2.MemberChange(member_id=req.ID, remove=True)))
            await self._wait_applied_on(member, self.raft.raft_status().commit)
            if self.raft.is_voter(member.raft_address):  # a learner is no Raft node to remove
                await self._raft_membership(member.raft_address, add=False, timeout=self.cfg.request_timeout)
            done.set_result(None)

        await self._run_membership_change(steps(), done)
        log.info("member %x (%s) removed", req.ID, member.name)
        resp = rpc_pb2.MemberRemoveResponse()
        resp.members.extend(member_pb(m) for m in self.members())
        self._fill_header(resp.header, with_revision=False)
        return resp

    async def member_promote(self, req: rpc_pb2.MemberPromoteRequest) -> rpc_pb2.MemberPromoteResponse:
        """etcd's MemberPromote: a learner holding (nearly) the leader's
        whole log becomes a voter.

        Two steps on the leader, like every membership change. Raft first:
        pysyncobj's addNodeToCluster for the learner's address, which counts
        it as a voter as soon as it is appended, so it commits only once the
        learner -- seeing its address in its copy of the configuration --
        has restarted its Raft node as a voter (RaftNode._await_promotion).
        Then the table, so MemberList says voter only once Raft agrees. A
        promotion cut short (the leader lost) leaves the table saying
        learner; promoting again finishes it, skipping the Raft step when
        the address already votes.
        """
        if not self.raft.is_leader():
            return await self._relay_to_leader("MemberPromote", req)
        member = self.membership.get(req.ID)
        if member is None:
            raise errors.MEMBER_NOT_FOUND
        if not member.is_learner:
            raise MEMBER_NOT_LEARNER
        if not await self._learner_in_sync(member):
            raise LEARNER_NOT_READY
        done = asyncio.get_running_loop().create_future()

        async def steps() -> None:
            if not self.raft.is_voter(member.raft_address):
                await self._raft_membership(member.raft_address, add=True, timeout=_MEMBER_START_TIMEOUT)
            await self.proposer.propose(raft_entry_pb2.Proposal(member_change=raft_entry_pb2.MemberChange(
                member_id=member.id, peer_urls=member.peer_urls, is_learner=False)))
            done.set_result(None)

        await self._run_membership_change(steps(), done)
        log.info("learner %x (%s) promoted to voting member", member.id, member.name)
        resp = rpc_pb2.MemberPromoteResponse()
        resp.members.extend(member_pb(m) for m in self.members())
        self._fill_header(resp.header, with_revision=False)
        return resp

    async def _learner_in_sync(self, learner: Member) -> bool:
        """etcd's rule for promotion: the learner holds at least 90% of the
        leader's log. pysyncobj knows read-only nodes only by connection, not
        by address, so the learner itself is asked (over its client URL)
        how far it has applied; one never started has no client URL."""
        if not learner.client_urls:
            return False
        leader_commit = self.raft.raft_status().commit
        try:
            async with grpc.aio.insecure_channel(hostport(learner.client_urls[0])) as channel:
                st = await metastore_pb2_grpc.RaftStub(channel).GetRaftStatus(
                    metastore_pb2.GetRaftStatusRequest(), timeout=2)
        except grpc.aio.AioRpcError:
            return False  # down: not in sync
        return st.node_id == learner.id and st.applied > 0 and st.applied >= leader_commit * LEARNER_READY_RATIO

    async def member_update(self, req: rpc_pb2.MemberUpdateRequest) -> rpc_pb2.MemberUpdateResponse:
        """etcd's MemberUpdate, for the case metastore can honour: the same
        peer URLs (in any order) -- answered with success, nothing changes
        (the first URL stays the member's Raft address).

        A real change is refused (FAILED_PRECONDITION): a member's identity
        is its address. pysyncobj names nodes 'host:port', so moving one is
        removeNodeFromCluster(old) then addNodeToCluster(new), two one-server
        changes that each alter the quorum while the member cannot answer at
        the new address until it restarts there -- and restarted with new
        peer URLs it computes another member id, which its data dir refuses.
        Removing the member and adding it again is the safe way, and says
        what happens.
        """
        if not self.raft.is_leader():
            return await self._relay_to_leader("MemberUpdate", req)
        member = self.membership.get(req.ID)
        if member is None:
            raise errors.MEMBER_NOT_FOUND
        urls = [str(u) for u in req.peerURLs]
        self._check_peer_urls(urls)
        holder = self.membership.id_of_peer_urls(urls)
        if holder and holder != req.ID:
            raise errors.PEER_URL_EXISTS
        if {hostport(u) for u in urls} != {hostport(u) for u in member.peer_urls}:
            raise EtcdError(grpc.StatusCode.FAILED_PRECONDITION,
                            f"etcdserver: changing the peer URLs of member {req.ID:x} is not supported (its member "
                            f"id and Raft address derive from them); remove the member and add it again with "
                            f"the new peer URLs")
        resp = rpc_pb2.MemberUpdateResponse()
        resp.members.extend(member_pb(m) for m in self.members())
        self._fill_header(resp.header, with_revision=False)
        return resp

    def is_learner(self) -> bool:
        """Whether this member is a learner (etcd refuses most requests on
        one): its Raft node is read-only, or the member table says so."""
        if self.raft.is_learner():
            return True
        me = self.membership.get(self.member_id)
        return me is not None and me.is_learner

    def _check_peer_urls(self, urls: list[str]) -> None:
        """Peer URLs a member add may name. Without the cluster secret the
        peer transport (pickle) must stay on loopback: every member would
        dial the new address and trust what answers."""
        if not urls:
            raise errors.MEMBER_BAD_URLS
        for url in urls:
            try:
                hostport(url)
            except ValueError as exc:
                if urlsplit(url).scheme == "https":  # valid for etcd: say what metastore lacks
                    raise EtcdError(grpc.StatusCode.INVALID_ARGUMENT, f"etcdserver: {exc}") from None
                raise errors.MEMBER_BAD_URLS from None
            if ":" in (urlsplit(url).hostname or ""):
                raise EtcdError(grpc.StatusCode.INVALID_ARGUMENT, f"etcdserver: peer URL {url}: IPv6 "
                                f"addresses are not supported for the Raft peer transport")
            if not self.cfg.peer_secret and not is_loopback(url):
                raise EtcdError(grpc.StatusCode.FAILED_PRECONDITION,
                                f"etcdserver: peer URL {url} is beyond loopback and this cluster has no peer "
                                f"secret; start every member with --peer-secret-file first")

    async def _run_membership_change(self, steps: Any, answered: asyncio.Future) -> None:
        """Run a change's steps to the end even if the client gives up (a
        half-done change would leave Raft and the member table disagreeing),
        one change at a time; return when `answered` is resolved."""
        if self._changing_membership:
            steps.close()
            raise errors.MEMBERSHIP_CHANGE_IN_PROGRESS
        self._changing_membership = True

        async def run() -> None:
            try:
                await steps
            except errors.EtcdError as err:
                if not answered.done():
                    answered.set_exception(err)
                else:
                    log.error("membership change did not finish its Raft step: %s", err.message)
            finally:
                self._changing_membership = False
                if not answered.done():
                    answered.set_exception(errors.STOPPED)

        task = asyncio.get_running_loop().create_task(run())
        self._membership_tasks.add(task)
        task.add_done_callback(self._membership_tasks.discard)
        await asyncio.shield(answered)

    async def _raft_membership(self, address: str, add: bool, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()

        def done(_result: Any, error: errors.EtcdError | None) -> None:  # tick thread
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(error))

        self.raft.change_membership(address, add, done)
        try:
            error = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise errors.TIMEOUT from None
        if error is not None:
            raise error

    async def _wait_applied_on(self, member: Member, index: int) -> None:
        """Best effort, up to the request timeout: let `member` apply the
        log up to `index` (its own removal) before Raft stops replicating to
        it -- else it would never learn it was removed and keep campaigning."""
        if not member.client_urls:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.request_timeout
        async with grpc.aio.insecure_channel(hostport(member.client_urls[0])) as channel:
            stub = metastore_pb2_grpc.RaftStub(channel)
            while loop.time() < deadline:
                try:
                    st = await stub.GetRaftStatus(metastore_pb2.GetRaftStatusRequest(), timeout=1)
                except grpc.aio.AioRpcError:
                    return  # down: it cannot apply anything; it stays stopped
                if st.applied >= index:
                    return
                await asyncio.sleep(0.05)
        log.warning("member %x did not confirm its removal in time", member.id)

    async def _relay_to_leader(self, method: str, req: Any) -> Any:
        """Membership changes run on the leader (one at a time); a follower
        passes the request on over the leader's client URL."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.request_timeout
        while True:  # a leader that just started may not have published its URLs yet
            leader = self.membership.get(self.raft.raft_status().leader_id)
            if leader is not None and leader.client_urls:
                break
            if loop.time() >= deadline:
                raise errors.NO_LEADER
            await asyncio.sleep(0.05)
        async with grpc.aio.insecure_channel(hostport(leader.client_urls[0])) as channel:
            try:
                return await getattr(rpc_pb2_grpc.ClusterStub(channel), method)(req, timeout=self.cfg.request_timeout)
            except grpc.aio.AioRpcError as err:
                raise EtcdError(err.code(), err.details() or "") from None

    def _log_failed(self, exc: OSError) -> None:  # tick thread
        """The Raft log could not be written or synced. Like etcd on a failed
        WAL write, the member stops rather than go on without a log it can
        trust: it would acknowledge nothing more, hold its peers' messages
        and keep failing every tick. Restarted, it reloads what is on disk
        (the journal cuts a torn tail) and catches up from its peers."""
        if self._loop is None:
            return

        def fail() -> None:
            if not self.failed.is_set():
                self.failure = f"the Raft log failed: {exc}"
                log.critical("this member (%x) stops: %s", self.member_id, self.failure)
                self.failed.set()

        try:
            self._loop.call_soon_threadsafe(fail)
        except RuntimeError:
            pass  # the loop is closed: the member is already stopping

    def _member_removed(self, mid: int) -> None:  # apply thread
        if mid != self.member_id or self._loop is None:
            return
        log.error("this member (%x) was removed from the cluster; it stops serving", mid)
        # Not at once: the Raft change that follows is easier to commit
        # while this member still answers.
        grace = max(2.0, self.cfg.election_timeout_ms / 1000 * 2)

        def stop_if_still_removed() -> None:
            # A replay may apply an old removal of a member added again since.
            if self.membership.get(self.member_id) is None:
                self.removed.set()

        self._loop.call_soon_threadsafe(lambda: self._loop.call_later(grace, stop_if_still_removed))

    def members(self) -> list[Member]:
        return self.membership.members()

    def _client_url_of(self, raft_address: str) -> str | None:
        """The client URL the member at `raft_address` advertises (None: not published yet)."""
        member = self.membership.get(self.membership.id_of_address(raft_address))
        return member.client_urls[0] if member is not None and member.client_urls else None

    def status(self) -> rpc_pb2.StatusResponse:
        st = self.raft_status()
        total, in_use = self.store.db_size()
        resp = rpc_pb2.StatusResponse(
            version=ETCD_COMPAT_VERSION, dbSize=total, dbSizeInUse=in_use, leader=st.leader_id,
            raftIndex=st.commit, raftTerm=st.term, raftAppliedIndex=st.applied, isLearner=self.is_learner())
        if st.leader_id == 0:
            resp.errors.append(errors.NO_LEADER.message)
        self._fill_header(resp.header, term=st.term)
        return resp

    def header(self, with_revision: bool = True) -> rpc_pb2.ResponseHeader:
        h = rpc_pb2.ResponseHeader()
        self._fill_header(h, with_revision=with_revision)
        return h

    def fill_header_at(self, header: rpc_pb2.ResponseHeader, revision: int) -> None:
        """A header as of `revision` (a watch response's; 0 stays 0, as in
        the compaction cancel of a watch)."""
        self._fill_header(header, with_revision=False)
        header.revision = revision

    def _fill_header(self, header: rpc_pb2.ResponseHeader, term: int | None = None,
                     with_revision: bool = True) -> None:
        """etcd's response header. Membership responses carry no revision
        in etcd (they are not about the key space): with_revision=False."""
        header.cluster_id = self.cluster_id
        header.member_id = self.member_id
        header.raft_term = term if term is not None else self.raft.term()
        if with_revision and not header.revision:
            header.revision = self.store.revision

