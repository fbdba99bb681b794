"""A member's side of placement: its session, and accepting its assignments.

Session: the member holds a lease (TTL `session_ttl`) and keeps it alive;
registering it (`LivenessChange.REGISTER`) makes the member ALIVE in a new
incarnation. If the member dies, the lease expires and the coordinator sees
it offline and reschedules its workloads. A member whose lease was lost
(a long pause, a partition) registers a new session -- workloads tied to the
old one are placed again.

Assignments: the member watches the workload keys (the store's commit
events, which the watch hub serves too) and accepts each workload assigned
to it in its current session: the application's `on_assign` hook (embed
API) decides and reports sub-units; with no hook, it accepts at once. An
acceptance names the epoch it answers, so a stale one is dropped by
`Placement.acknowledge`. Workloads that leave the member (moved, deleted)
go to the `on_release` hook.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Callable

from metastore import liveness, workloads
from metastore.api.pb import raft_entry_pb2, rpc_pb2
from metastore.errors import EtcdError
from metastore.workloads import ASSIGNED, RUNNING, Workload

if TYPE_CHECKING:  # pragma: no cover
    from metastore.placement import Placement

log = logging.getLogger("metastore.agent")

# on_assign(workload) -> sub-units it runs per member id ({} or None for none);
# raising refuses (the coordinator places it elsewhere after the move timeout).
AssignHook = Callable[[Workload], "dict[int, int] | None"]
ReleaseHook = Callable[[Workload], None]


class MemberAgent:
    def __init__(self, placement: "Placement") -> None:
        self.placement = placement
        self.node = placement.node
        self._wake = placement.signal.subscribe()
        self.session = 0
        self.on_assign: AssignHook | None = None
        self.on_release: ReleaseHook | None = None
        self._accepting: set[tuple[str, int]] = set()
        self._answers: dict[tuple[str, int], dict[int, int]] = {}  # hook results not yet acknowledged
        self._refused: set[tuple[str, int]] = set()  # assignments the hook refused (not asked again)
        self._held: dict[str, Workload] = {}  # workloads this member runs, as last seen

    async def run(self) -> None:
        await asyncio.gather(self._keep_session(), self._follow_assignments())

    # -- session -----------------------------------------------------------------------
    async def _keep_session(self) -> None:
        ttl = self.placement.cfg.session_ttl
        while True:
            try:
                if not self.session:
                    await self._register(ttl)
                await asyncio.sleep(max(0.2, ttl / 3))
                resp = await self.node.lease_keepalive(self.session)
                if resp.TTL <= 0:
                    log.warning("this member's session %x expired; starting a new one", self.session)
                    self.session = 0
            except EtcdError as err:
                log.debug("session upkeep: %s", err.message)
                await asyncio.sleep(0.5)

    async def _register(self, ttl: int) -> None:
        old = liveness.read(self.node.store, self.node.member_id).session
        grant = await self.node.lease_grant(rpc_pb2.LeaseGrantRequest(TTL=ttl))
        await self.node.proposer.propose(raft_entry_pb2.Proposal(liveness=raft_entry_pb2.LivenessChange(
            op=liveness.Op.REGISTER, member_id=self.node.member_id, session=grant.ID)))
        self.session = grant.ID
        log.info("session %x registered (TTL %ds): this member is ALIVE", grant.ID, grant.TTL)
        self.placement.signal.notify()
        if old and old != grant.ID:
            try:  # the previous incarnation's session: end it now rather than at its expiry
                await self.node.lease_revoke(rpc_pb2.LeaseRevokeRequest(ID=old))
            except EtcdError:
                pass

    # -- assignments ----------------------------------------------------------------------
    async def _follow_assignments(self) -> None:
        period = self.placement.cfg.period
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), period * 5)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                self._reconcile()
            except Exception:  # pragma: no cover - never let one round end the loop
                log.exception("following assignments failed")

    def _reconcile(self) -> None:
        me = self.node.member_id
        mine: dict[str, Workload] = {}
        for w in workloads.read_all(self.node.store):
            if w.owner != me or not self.session or w.session != self.session:
                continue
            mine[w.id] = w
            if w.state == ASSIGNED and (w.id, w.epoch) not in self._accepting | self._refused:
                self._accepting.add((w.id, w.epoch))
                asyncio.get_running_loop().create_task(self._accept(w))
        for wid, w in list(self._held.items()):
            if wid not in mine:
                del self._held[wid]
                self._release(w)
        for wid, w in mine.items():
            if w.state == RUNNING:
                self._held[wid] = w

    async def _accept(self, w: Workload) -> None:
        key = (w.id, w.epoch)
        settled = False
        try:
            subunits = self._answers.get(key)
            if subunits is None:
                subunits = {}
                if self.on_assign is not None:
                    subunits = await asyncio.get_running_loop().run_in_executor(None, self.on_assign, w) or {}
                self._answers[key] = subunits
            # False: the assignment changed meanwhile (the next round sees it).
            if await self.placement.acknowledge(w.id, self.node.member_id, w.epoch, subunits):
                self._held[w.id] = w
            settled = True
        except EtcdError as err:
            log.debug("accepting workload %s not done yet: %s", w.id, err.message)
        except Exception:
            log.exception("the application refused workload %s (epoch %d)", w.id, w.epoch)
            self._refused.add(key)
            settled = True
        finally:
            self._accepting.discard(key)
            if settled:
                self._answers.pop(key, None)

    def _release(self, w: Workload) -> None:
        if self.on_release is None:
            return
        hook = self.on_release
        loop = asyncio.get_running_loop()

        async def call() -> None:
            try:
                await loop.run_in_executor(None, hook, w)
            except Exception:
                log.exception("the application's release hook failed for workload %s", w.id)

        loop.create_task(call())
