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
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable

from metastore import liveness, workloads
from metastore.api.pb import raft_entry_pb2, rpc_pb2
from metastore.errors import EtcdError
from metastore.event_loop import wait_event
from metastore.workloads import ASSIGNED, RUNNING, Workload

if TYPE_CHECKING:  # pragma: no cover
    from metastore.placement import Placement

log = logging.getLogger("metastore.agent")

# on_assign(workload) -> sub-units it runs per member id ({} or None for none);
# raising refuses (the coordinator places it elsewhere after the move timeout).
AssignHook = Callable[[Workload], "dict[int, int] | None"]
ReleaseHook = Callable[[Workload], None]

# Threads for the application's hooks (accepts and releases at once).
HOOK_THREADS = 4


class MemberAgent:
    def __init__(self, placement: "Placement") -> None:
        self.placement = placement
        self.node = placement.node
        self._wake = placement.signal.subscribe()
        self.session = 0
        self.on_assign: AssignHook | None = None
        self.on_release: ReleaseHook | None = None
        # The application's hooks get threads of their own: a slow hook must
        # not take the loop's default executor (watch catch-up, shutdown).
        self._hooks = ThreadPoolExecutor(max_workers=HOOK_THREADS, thread_name_prefix="metastore-hook")
        self._accepting: set[tuple[str, int]] = set()
        self._answers: dict[tuple[str, int], dict[int, int]] = {}  # hook results not yet acknowledged
        self._refused: set[tuple[str, int]] = set()  # assignments the hook refused (not asked again)
        self._held: dict[str, Workload] = {}  # workloads this member runs, as last seen
        self._tasks: set[asyncio.Task] = set()
        self._last_keepalive = 0.0  # loop time of the last keep-alive that reached the cluster

    async def run(self) -> None:
        try:
            await asyncio.gather(self._keep_session(), self._follow_assignments())
        finally:
            self._hooks.shutdown(wait=False, cancel_futures=True)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- session -----------------------------------------------------------------------
    async def _keep_session(self) -> None:
        ttl = self.placement.cfg.session_ttl
        cut_off_after = 2 * ttl + self.node.cfg.election_timeout_ms / 1000
        loop = asyncio.get_running_loop()
        while True:
            try:
                if not self.session:
                    await self._register(ttl)
                    self._last_keepalive = loop.time()
                await asyncio.sleep(max(0.2, ttl / 3))
                resp = await self.node.lease_keepalive(self.session)
                if resp.TTL <= 0:
                    log.warning("this member's session %x expired; starting a new one", self.session)
                    self._lose_session()
                else:
                    self._last_keepalive = loop.time()
            except EtcdError as err:
                log.debug("session upkeep: %s", err.message)
                await asyncio.sleep(0.5)
            except Exception:  # never let the heartbeat end for good
                log.exception("session upkeep failed")
                await asyncio.sleep(0.5)
            if self.session and loop.time() - self._last_keepalive > cut_off_after:
                # Cut off from the cluster (not just an election: a new leader
                # gives every lease a grace period): the coordinator has placed
                # this member's workloads elsewhere by now. Stop them, and come
                # back later as a new session.
                log.warning("no keep-alive reached the cluster for %.0fs: giving up session %x and its workloads",
                            cut_off_after, self.session)
                self._lose_session()

    def _lose_session(self) -> None:
        self.session = 0
        for w in list(self._held.values()):
            self._release(w)
        self._held.clear()

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
                await self.node.lease_revoke(rpc_pb2.LeaseRevokeRequest(ID=old), from_client=False)
            except EtcdError:
                pass

    # -- assignments ----------------------------------------------------------------------
    async def _follow_assignments(self) -> None:
        period = self.placement.cfg.period
        while True:
            await wait_event(self._wake, period * 5)
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
            key = (w.id, w.epoch)
            if w.state == ASSIGNED and key not in self._accepting and key not in self._refused:
                self._accepting.add(key)
                self._spawn(self._accept(w))
        for wid, w in list(self._held.items()):
            if wid not in mine:
                del self._held[wid]
                self._release(w)
        for wid, w in mine.items():
            if w.state == RUNNING:
                self._held[wid] = w
        live = {(w.id, w.epoch) for w in mine.values()}
        self._refused &= live
        for key in [k for k in self._answers if k not in live and k not in self._accepting]:
            del self._answers[key]

    async def _accept(self, w: Workload) -> None:
        key = (w.id, w.epoch)
        started = key in self._answers  # the hook already ran for this assignment
        settled = False
        try:
            subunits = self._answers.get(key)
            if subunits is None:
                subunits = {}
                if self.on_assign is not None:
                    subunits = await asyncio.get_running_loop().run_in_executor(self._hooks, self.on_assign, w) or {}
                started = True
                subunits = self._checked(w, subunits)
                self._answers[key] = subunits
            # False: the assignment changed meanwhile (moved on while the
            # hook ran): what the hook started must stop again.
            if await self.placement.acknowledge(w.id, self.node.member_id, w.epoch, subunits):
                self._held[w.id] = w
            elif w.id not in self._held:
                self._release(w)
            settled = True
        except EtcdError as err:
            log.debug("accepting workload %s not done yet: %s", w.id, err.message)
        except Exception:
            log.exception("the application refused workload %s (epoch %d)", w.id, w.epoch)
            self._refused.add(key)
            settled = True
            if started:
                self._release(w)
        finally:
            self._accepting.discard(key)
            if settled:
                self._answers.pop(key, None)

    def _checked(self, w: Workload, subunits: dict[int, int]) -> dict[int, int]:
        """The hook's sub-unit report, with what the cluster cannot count dropped."""
        out = {}
        for member, count in subunits.items():
            if self.node.membership.get(member) is None or not isinstance(count, int) or count < 0:
                log.error("workload %s: the application reported %r sub-units on %r; ignored", w.id, count, member)
                continue
            if count:
                out[member] = count
        return out

    def _release(self, w: Workload) -> None:
        if self.on_release is None:
            return
        hook = self.on_release
        loop = asyncio.get_running_loop()

        async def call() -> None:
            try:
                await loop.run_in_executor(self._hooks, hook, w)
            except Exception:
                log.exception("the application's release hook failed for workload %s", w.id)

        self._spawn(call())

    def release_all(self) -> None:
        """Stopping: the application lets go of everything it runs here."""
        for w in list(self._held.values()):
            if self.on_release is not None:
                try:
                    self.on_release(w)
                except Exception:
                    log.exception("the application's release hook failed for workload %s", w.id)
        self._held.clear()
