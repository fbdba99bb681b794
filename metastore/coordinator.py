"""The coordinator: the Raft leader places workloads and runs the drain.

Stateless by design: each round reads the cluster from the store (members,
liveness, sessions, workload records, the DrainState), asks the scheduler
for moves and makes them with compare-and-set writes. A member that becomes
leader therefore resumes a drain exactly where the store says it stands,
with the drain's original start time. The only thing a coordinator keeps is
when it first saw each move in flight (for the move timeout); a new one
starts those clocks afresh, which only ever gives a destination more time.

Rounds run when a workload key changes and every `period` seconds (sessions
expire and liveness changes without touching a key).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Callable

from metastore import errors, liveness, scheduler
from metastore.api.pb import raft_entry_pb2
from metastore.errors import EtcdError
from metastore.event_loop import wait_event
from metastore.liveness import Liveness
from metastore.scheduler import ClusterView, Move
from metastore.workloads import ASSIGNED

if TYPE_CHECKING:  # pragma: no cover
    from metastore.placement import Placement

log = logging.getLogger("metastore.coordinator")

# How often a warning that repeats every round (no destination, a draining
# coordinator that cannot hand over yet) is logged again.
_WARN_EVERY = 10.0


class Coordinator:
    def __init__(self, placement: "Placement") -> None:
        self.placement = placement
        self.node = placement.node
        self._wake = placement.signal.subscribe()
        # (workload id, epoch) -> monotonic time this coordinator first saw the move in flight.
        self._in_flight_since: dict[tuple[str, int], float] = {}
        self._warned: dict[str, float] = {}
        # workload id -> {member: monotonic time until which it is avoided}:
        # members that did not accept the workload lately.
        self._avoid: dict[str, dict[int, float]] = {}
        self._handover_at = 0.0
        self._alone_since: float | None = None  # since when no other member could coordinate
        self._timeout_logged: set[tuple[str, int]] = set()
        self._handover_failed: dict[int, float] = {}  # member -> when a hand-over to it last failed
        self._deadline_logged = False
        # Called with the duration (s) of each drain this member finishes (metrics).
        self.on_drain_finished: list[Callable[[float], None]] = []
        self.active = False

    async def run(self) -> None:
        period = self.placement.cfg.period
        while True:
            await wait_event(self._wake, period)
            self._wake.clear()
            if not self.node.raft.is_leader():
                if self.active:
                    log.info("no longer the coordinator")
                self.active = False
                self._in_flight_since.clear()
                continue
            if not self.active:
                try:
                    # Apply everything committed before acting on the store.
                    await self.node.read_barrier.wait()
                except EtcdError:
                    continue
                log.info("coordinating workload placement as the Raft leader")
                self.active = True
                self._alone_since = None
            try:
                await self.round()
            except EtcdError as err:
                log.debug("coordinator round interrupted: %s", err.message)
            except Exception:  # never let one bad round end coordination
                log.exception("coordinator round failed")

    async def round(self) -> None:
        view = self.placement.view()
        if await self._step_aside_if_not_schedulable(view):
            return
        force = False
        if view.drain is not None:
            done, force = await self._drain_bookkeeping(view)
            if done:
                return
        view.timed_out = self._timed_out(view)
        view.avoid = self._avoided()
        moves = scheduler.plan(view, self.placement.cfg.drain_batch_size, force_drain=force)
        if not moves:
            self._warn_if_stuck(view)
            return
        results = await asyncio.gather(*(self._make(move, view) for move in moves), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, EtcdError):
                raise result

    # -- the coordinator's own liveness -------------------------------------------------
    async def _step_aside_if_not_schedulable(self, view: ClusterView) -> bool:
        """DRAINING and STOPPING members are not candidates: hand leadership to
        a schedulable member at once; with none left, become ALIVE and stay."""
        me = view.members.get(self.node.member_id)
        if me is None or me.liveness is Liveness.ALIVE:
            return False
        voters = {m.id for m in self.node.membership.voters()}  # a learner cannot lead
        others = sorted(m.id for m in view.members.values() if m.schedulable and m.id != me.id and m.id in voters)
        if others:
            self._alone_since = None
            if time.monotonic() < self._handover_at:
                return True
            self._handover_at = time.monotonic() + 2.0
            # A member a hand-over just failed to reach (it may have died
            # before its session expired) is tried last.
            target = min(others, key=lambda mid: (self._handover_failed.get(mid, 0.0), mid))
            log.info("this member is %s, so not a coordinator candidate: handing leadership to %s",
                     me.liveness.name, self.placement._label(target))
            try:
                # Short: writes wait while a hand-over runs, and a target that
                # died before its session expired would hold them the whole
                # request timeout.
                await self.node.move_leader(target, timeout=max(2.0, 2 * self.node.cfg.election_timeout_ms / 1000))
            except EtcdError as err:
                self._handover_failed[target] = time.monotonic()
                # Leave time for lease expiry (paused during a hand-over) to
                # notice a candidate that died before the next attempt.
                self._handover_at = time.monotonic() + max(2.0, self.placement.cfg.session_ttl)
                log.warning("handing leadership to %s failed: %s", self.placement._label(target), err.message)
            return True
        # Only when that lasts a whole session TTL: another member may just be
        # restarting, or its session registering.
        now = time.monotonic()
        if self._alone_since is None:
            self._alone_since = now
        if now - self._alone_since < self.placement.cfg.session_ttl:
            return True
        log.warning("only draining or stopping members are left: this member (%s) becomes ALIVE and coordinates",
                    me.liveness.name)
        await self._propose(raft_entry_pb2.LivenessChange(op=liveness.Op.RESET, member_id=me.id))
        self._alone_since = None
        return True

    # -- drain -------------------------------------------------------------------------------
    async def _drain_bookkeeping(self, view: ClusterView) -> tuple[bool, bool]:
        """End the drain when it is over (finished, or the target went away);
        returns (ended, forced: the deadline passed)."""
        drain = view.drain
        assert drain is not None
        target = view.members.get(drain.target)
        label = self.placement._label(drain.target)
        if target is None or not target.online or target.session != drain.target_session:
            log.error("draining member %s went offline (or restarted); drain abandoned, its workloads are "
                      "rescheduled", label)
            await self._propose(raft_entry_pb2.LivenessChange(op=liveness.Op.DRAIN_CANCEL, member_id=drain.target))
            return True, False
        remaining, subunits = view.remaining_on(drain.target)
        forced = bool(drain.deadline) and time.time() >= drain.deadline
        if remaining == 0 and (subunits == 0 or forced):
            if not await self._propose(raft_entry_pb2.LivenessChange(op=liveness.Op.DRAIN_FINISH,
                                                                     member_id=drain.target)):
                return True, False
            took = max(0.0, time.time() - drain.start_time)
            for observe in self.on_drain_finished:
                observe(took)
            log.info("drain of member %s complete after %.1fs: it is STOPPING and holds no workloads%s", label,
                     took, f" ({subunits} sub-units left behind at the deadline)" if subunits else "")
            self._deadline_logged = False
            return True, False
        if forced and not self._deadline_logged:
            self._deadline_logged = True
            log.warning("drain of member %s passed its deadline with %d workloads and %d sub-units left: "
                        "moving the rest at once", label, remaining, subunits)
        return False, forced

    # -- moves ---------------------------------------------------------------------------------
    def _timed_out(self, view: ClusterView) -> dict[str, int]:
        """Moves in flight longer than the move timeout: workload id -> the
        destination that did not accept."""
        now = time.monotonic()
        seen = {(w.id, w.epoch) for w in view.workloads if w.state == ASSIGNED}
        for gone in [k for k in self._in_flight_since if k not in seen]:
            del self._in_flight_since[gone]
        self._timeout_logged &= seen
        out = {}
        for w in view.workloads:
            if w.state != ASSIGNED:
                continue
            since = self._in_flight_since.setdefault((w.id, w.epoch), now)
            if now - since >= self.placement.cfg.move_timeout:
                if (w.id, w.epoch) in self._timeout_logged:
                    out[w.id] = w.owner
                    continue
                self._timeout_logged.add((w.id, w.epoch))
                log.warning("workload %s: member %s did not accept it within %.0fs; placing it elsewhere",
                            w.id, self.placement._label(w.owner), self.placement.cfg.move_timeout)
                out[w.id] = w.owner
                self._avoid.setdefault(w.id, {})[w.owner] = now + 10 * self.placement.cfg.move_timeout
        return out

    def _avoided(self) -> dict[str, set[int]]:
        now = time.monotonic()
        out = {}
        for wid, members in list(self._avoid.items()):
            live = {m: until for m, until in members.items() if until > now}
            if live:
                self._avoid[wid] = live
                out[wid] = set(live)
            else:
                del self._avoid[wid]
        return out

    async def _make(self, move: Move, view: ClusterView) -> None:
        dest = view.members[move.destination]
        new = move.workload.assigned_to(dest.id, dest.session)
        if not await self.placement.cas(move.workload, new):
            return  # changed meanwhile; the next round sees the new record
        self._in_flight_since[(new.id, new.epoch)] = time.monotonic()
        src = move.workload.owner
        if move.reason == scheduler.DRAIN:
            log.info("drain: moving workload %s from %s to %s (epoch %d)", new.id, self.placement._label(src),
                     self.placement._label(dest.id), new.epoch)
        elif move.reason == scheduler.BALANCE:
            log.info("balance: moving workload %s from %s to %s (epoch %d)", new.id, self.placement._label(src),
                     self.placement._label(dest.id), new.epoch)
        else:
            log.info("workload %s placed on %s (epoch %d)%s", new.id, self.placement._label(dest.id), new.epoch,
                     f", was on {self.placement._label(src)}" if src else "")

    def _warn_if_stuck(self, view: ClusterView) -> None:
        """WARN (now and then) when workloads need a member and none can take them."""
        if any(m.schedulable for m in view.members.values()):
            return
        waiting = sum(1 for w in view.workloads if not view.owner_valid(w))
        if view.drain is not None:
            waiting += view.remaining_on(view.drain.target)[0]
        if waiting and time.monotonic() - self._warned.get("nodest", 0.0) >= _WARN_EVERY:
            self._warned["nodest"] = time.monotonic()
            log.warning("no schedulable member to place %d workloads on", waiting)

    async def _propose(self, change: raft_entry_pb2.LivenessChange) -> bool:
        """Propose a liveness change; whether it took effect."""
        try:
            await self.node.proposer.propose(raft_entry_pb2.Proposal(liveness=change))
            return True
        except EtcdError as err:
            if err in (liveness.NOT_DRAINING, liveness.CAS_FAILED, errors.LEADER_CHANGED):
                log.debug("liveness change not applied: %s", err.message)
                return False
            raise
