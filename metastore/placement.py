"""Workload placement and drain, as one member offers them.

`Placement` (``node.placement``) is what the HTTP API, the embed client and
`metastore ctl drain` call, on any member: register and remove workloads,
list them, acknowledge assignments (fenced by epoch and member), start,
follow and cancel a drain. It also runs the two loops every member has:

- the `Coordinator`, active only while this member is the Raft leader;
- the `MemberAgent`: this member's session (its liveness heartbeat) and the
  acceptance of what the coordinator assigns it.

Every read that answers a client is linearizable (a read barrier first);
every write is a compare-and-set through Raft, so the store stays the one
source of truth whichever member a request arrives at.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Sequence

from metastore import liveness, workloads
from metastore.api.pb import kv_pb2, raft_entry_pb2, rpc_pb2
from metastore.cluster import Member
from metastore.errors import EtcdError
from metastore.liveness import Liveness, MemberLiveness
from metastore.mvcc_events import event_keys
from metastore.scheduler import ClusterView, MemberView
from metastore.workloads import Workload

if TYPE_CHECKING:  # pragma: no cover
    from metastore.node import Node

log = logging.getLogger("metastore.placement")


class PlacementError(Exception):
    """A request the placement API refuses; `status` is the HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class PlacementConfig:
    session_ttl: int = 5  # seconds without heartbeat before a member counts as offline
    drain_batch_size: int = 1  # drain moves in flight at once
    move_timeout: float = 30.0  # seconds a destination has to accept a move
    period: float = 0.2  # coordinator / agent re-check interval when nothing wakes them


class ChangeSignal:
    """Wakes the placement loops when a workload key changes (or the store is
    replaced by a snapshot). Fed by the store's commit listener on the apply
    thread -- the same event stream the watch hub serves."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: list[asyncio.Event] = []

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def subscribe(self) -> asyncio.Event:
        event = asyncio.Event()
        self._events.append(event)
        return event

    def notify(self) -> None:  # event loop
        for event in self._events:
            event.set()

    def on_commit(self, _revision: int, events: Sequence[kv_pb2.Event]) -> None:  # apply thread
        if self._loop is None:
            return
        if events and not any(key.startswith(workloads.PREFIX) for key in event_keys(events)):
            return
        try:
            self._loop.call_soon_threadsafe(self.notify)
        except RuntimeError:  # loop closed: stopping
            pass


class Placement:
    def __init__(self, node: "Node", cfg: PlacementConfig) -> None:
        from metastore.coordinator import Coordinator
        from metastore.member_agent import MemberAgent

        self.node = node
        self.cfg = cfg
        self.signal = ChangeSignal()
        node.store.add_listener(self.signal.on_commit)
        self.coordinator = Coordinator(self)
        self.agent = MemberAgent(self)
        self._tasks: list[asyncio.Task] = []

    # -- lifecycle -------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.signal.bind(loop)
        self._tasks = [loop.create_task(self.coordinator.run()), loop.create_task(self.agent.run())]

    async def stop(self, end_session: bool = False, revoke_session: bool = True) -> None:
        """Stop placing; with `end_session`, release every workload held here
        and (unless `revoke_session` is False: nothing this member proposes
        can commit) revoke the session so they move at once."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            # Cancelled again until it ends: a cancellation can be lost in a
            # wait (see metastore.event_loop.wait_event).
            while not task.done():
                await asyncio.wait({task}, timeout=0.5)
                task.cancel()
            if not task.cancelled() and task.exception() is not None:
                log.error("placement task %s failed", task.get_name(), exc_info=task.exception())
        self._tasks = []
        if end_session:
            self.agent.release_all()
        if end_session and revoke_session and self.agent.session:
            try:
                revoke = rpc_pb2.LeaseRevokeRequest(ID=self.agent.session)
                await asyncio.wait_for(self.node.lease_revoke(revoke, from_client=False), 1.0)
            except (EtcdError, asyncio.TimeoutError):
                pass  # it expires on its own
            self.agent.session = 0

    # -- views -------------------------------------------------------------------
    def online(self, record: MemberLiveness) -> bool:
        """A member is online while the lease of its current session lives."""
        return bool(record.session) and self.node.store.lease_ttl(record.session) is not None

    def view(self) -> ClusterView:
        """The cluster as this member's store holds it now."""
        store = self.node.store
        records = liveness.read_all(store)
        members = {}
        for m in self.node.members():
            rec = records.get(m.id, MemberLiveness())
            members[m.id] = MemberView(m.id, rec.state, rec.session, self.online(rec))
        return ClusterView(members, workloads.read_all(store), liveness.read_drain(store))

    def resolve_member(self, ref: str) -> Member:
        """A member by name or hex id (404 otherwise)."""
        for m in self.node.members():
            if m.name and m.name == ref:
                return m
        try:
            found = self.node.membership.get(int(ref, 16))
        except ValueError:
            found = None
        if found is None:
            raise PlacementError(404, f"no member named or with id {ref!r}")
        return found

    def names(self) -> dict[int, str]:
        return {m.id: m.name for m in self.node.members()}

    # -- compare-and-set on workload records ----------------------------------------
    async def cas(self, old: Workload | None, new: Workload | None, workload_id: str = "") -> bool:
        """Replace `old` (as read: its mod_revision) by `new` (None deletes);
        False when the record changed meanwhile."""
        key = workloads.key_of(new.id if new is not None else old.id if old is not None else workload_id)
        if old is None:
            compare = rpc_pb2.Compare(key=key, target=rpc_pb2.Compare.CREATE, result=rpc_pb2.Compare.EQUAL,
                                      create_revision=0)
        else:
            compare = rpc_pb2.Compare(key=key, target=rpc_pb2.Compare.MOD, result=rpc_pb2.Compare.EQUAL,
                                      mod_revision=old.mod_revision)
        op = (rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=key)) if new is None else
              rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=new.to_json())))
        resp = await self.node.txn(rpc_pb2.TxnRequest(compare=[compare], success=[op]))
        return resp.succeeded

    async def _read(self, workload_id: str) -> Workload | None:
        resp = self.node.store.range(rpc_pb2.RangeRequest(key=workloads.key_of(workload_id)))
        if not resp.kvs:
            return None
        try:
            return Workload.from_json(resp.kvs[0].value, resp.kvs[0].mod_revision)
        except (ValueError, KeyError, TypeError):
            raise PlacementError(409, f"the record of workload {workload_id!r} is not valid JSON; delete it") from None

    # -- workloads ---------------------------------------------------------------------
    async def register(self, workload_id: str, metadata: Any) -> tuple[bool, Workload]:
        """Register a workload, or update its metadata (idempotent); returns
        (created, record). Its placement is kept on update."""
        try:
            workloads.check_id(workload_id)
        except ValueError as exc:
            raise PlacementError(400, str(exc)) from None
        while True:
            await self.node.read_barrier.wait()
            old = await self._read(workload_id)
            if old is not None and old.metadata == metadata:
                return False, old
            new = Workload(workload_id, metadata) if old is None else replace(old, metadata=metadata)
            if await self.cas(old, new):
                await self.node.read_barrier.wait()
                return old is None, await self._read(workload_id) or new

    async def remove(self, workload_id: str) -> bool:
        await self.node.read_barrier.wait()
        resp = await self.node.delete_range(rpc_pb2.DeleteRangeRequest(key=workloads.key_of(workload_id)))
        return resp.deleted > 0

    async def list(self) -> list[Workload]:
        await self.node.read_barrier.wait()
        return workloads.read_all(self.node.store)

    async def get(self, workload_id: str) -> Workload | None:
        await self.node.read_barrier.wait()
        return await self._read(workload_id)

    async def acknowledge(self, workload_id: str, member: int, epoch: int, subunits: dict[int, int],
                          accept: bool = True) -> bool:
        """The owner accepts its assignment (`accept`: only the member's agent,
        once the application took it), or reports the sub-units it runs per
        member. Fenced: dropped (False) unless `member` owns the workload at
        `epoch` -- an answer to an older assignment never lands -- and a
        report (not `accept`) only lands once the workload runs."""
        if any(n < 0 for n in subunits.values()):
            raise PlacementError(400, "sub-unit counts must not be negative")
        unknown = [m for m in subunits if self.node.membership.get(m) is None]
        if unknown:
            raise PlacementError(400, f"sub-units reported on unknown members {', '.join(f'{m:x}' for m in unknown)}")
        while True:
            await self.node.read_barrier.wait()
            current = await self._read(workload_id)
            if (current is None or current.owner != member or current.epoch != epoch
                    or (not accept and current.state != workloads.RUNNING)):
                log.info("acknowledgement of workload %s by %x at epoch %d dropped (now owner %x, epoch %d)",
                         workload_id, member, epoch, current.owner if current else 0, current.epoch if current else 0)
                return False
            new = current.accepted({m: n for m, n in subunits.items() if n})
            if new == current:
                return True
            if await self.cas(current, new):
                return True

    # -- drain ---------------------------------------------------------------------------
    async def drain_start(self, ref: str, deadline_seconds: float = 0.0) -> dict[str, int]:
        """Start draining a member (idempotent for the member being drained)."""
        if deadline_seconds < 0:
            raise PlacementError(400, "the deadline must not be negative")
        await self.node.read_barrier.wait()
        member = self.resolve_member(ref)
        if len(self.node.members()) < 2:
            raise PlacementError(400, "a single-member cluster has nowhere to move workloads to")
        leader = self.node.raft_status().leader_id
        if leader == 0:
            raise PlacementError(503, "the cluster has no leader")
        view = self.view()
        drain = view.drain
        if drain is not None and drain.target != member.id:
            raise PlacementError(409, f"member {self._label(drain.target)} is being drained; "
                                      f"one drain at a time")
        remaining, subunits = view.remaining_on(member.id)
        counts = {"current_maintainer_count": remaining, "current_dispatcher_count": subunits}
        if drain is not None:
            return counts  # already draining this member
        if member.id == leader:
            raise PlacementError(400, f"member {self._label(member.id)} is the coordinator (the Raft leader); "
                                      f"move leadership first (etcdctl move-leader)")
        record = view.members[member.id]
        if record.liveness is Liveness.STOPPING:
            return counts  # drained already
        if not record.online:
            raise PlacementError(400, f"member {self._label(member.id)} is offline; its workloads are "
                                      f"rescheduled without a drain")
        if not any(m.schedulable for m in view.members.values() if m.id != member.id):
            raise PlacementError(400, f"no other member can take the workloads of {self._label(member.id)}")
        change = raft_entry_pb2.LivenessChange(
            op=liveness.Op.DRAIN_START, member_id=member.id, session=record.session, start_time=time.time(),
            initial_workloads=remaining, initial_subunits=subunits,
            deadline=time.time() + deadline_seconds if deadline_seconds else 0.0)
        try:
            await self.node.proposer.propose(raft_entry_pb2.Proposal(liveness=change))
        except EtcdError as err:
            if err is liveness.DRAIN_CONFLICT:
                other = liveness.read_drain(self.node.store)
                who = self._label(other.target) if other else "another member"
                raise PlacementError(409, f"member {who} is being drained; one drain at a time") from None
            if err is liveness.NOT_ALIVE:
                raise PlacementError(409, f"member {self._label(member.id)} is no longer ALIVE") from None
            raise
        log.info("drain of member %s started: %d workloads, %d sub-units to move%s", self._label(member.id),
                 remaining, subunits, f", deadline in {deadline_seconds:g}s" if deadline_seconds else "")
        self.signal.notify()
        return counts

    async def drain_status(self, ref: str) -> dict[str, Any]:
        await self.node.read_barrier.wait()
        member = self.resolve_member(ref)
        return self.status_of(member.id)

    def status_of(self, member: int) -> dict[str, Any]:
        view = self.view()
        record = view.members.get(member, MemberView(member))
        drain = view.drain
        mine = drain is not None and drain.target == member
        remaining, subunits = view.remaining_on(member)
        doc: dict[str, Any] = {
            "member_id": f"{member:x}",
            "name": self.names().get(member, ""),
            "is_draining": mine,
            "draining_capture_id": f"{drain.target:x}" if drain is not None else "",
            "liveness": record.liveness.name,
            "liveness_value": int(record.liveness),
            "online": record.online,
            "remaining_maintainer_count": remaining,
            "remaining_dispatcher_count": subunits,
            "start_time": _rfc3339(drain.start_time) if mine else "",
        }
        if mine:
            doc.update({
                "start_time_unix": drain.start_time,
                "elapsed_seconds": round(max(0.0, time.time() - drain.start_time), 3),
                "initial_maintainer_count": drain.initial_workloads,
                "initial_dispatcher_count": drain.initial_subunits,
                "deadline": _rfc3339(drain.deadline) if drain.deadline else "",
            })
        return doc

    async def drain_cancel(self, ref: str) -> dict[str, Any]:
        """Cancel the member's drain, or undrain a drained (STOPPING) member:
        back to ALIVE and schedulable (idempotent)."""
        await self.node.read_barrier.wait()
        member = self.resolve_member(ref)
        drain = liveness.read_drain(self.node.store)
        draining = drain is not None and drain.target == member.id
        if draining or liveness.read(self.node.store, member.id).state is Liveness.STOPPING:
            try:
                await self.node.proposer.propose(raft_entry_pb2.Proposal(liveness=raft_entry_pb2.LivenessChange(
                    op=liveness.Op.DRAIN_CANCEL, member_id=member.id)))
                log.info("%s of member %s cancelled; it is ALIVE again", "drain" if draining else "STOPPING",
                         self._label(member.id))
            except EtcdError as err:
                if err is not liveness.NOT_DRAINING:
                    raise
            await self.node.read_barrier.wait()
            self.signal.notify()
        return self.status_of(member.id)

    async def members_status(self) -> list[dict[str, Any]]:
        """Every member with its liveness, session and load (GET /api/v2/captures)."""
        await self.node.read_barrier.wait()
        view = self.view()
        leader = self.node.raft_status().leader_id
        out = []
        for m in self.node.members():
            rec = view.members[m.id]
            owned = sum(1 for w in view.workloads if w.owner == m.id)
            out.append({"member_id": f"{m.id:x}", "name": m.name, "liveness": rec.liveness.name,
                        "liveness_value": int(rec.liveness), "online": rec.online,
                        "is_coordinator": m.id == leader, "workloads": owned,
                        "subunits": sum(w.subunits_on(m.id) for w in view.workloads)})
        return out

    def _label(self, member: int) -> str:
        name = self.names().get(member, "")
        return f"{name} ({member:x})" if name else f"{member:x}"


def _rfc3339(unix: float) -> str:
    return datetime.fromtimestamp(unix, timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")

