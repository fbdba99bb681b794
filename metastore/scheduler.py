"""Where workloads should go: the coordinator's decisions, as pure functions.

Given one consistent view of the cluster (members with their liveness and
whether their session is live, every workload record, the DrainState),
`plan` returns the moves to make now. Nothing here touches the store or the
clock, so every rule is unit-tested on plain values, and a coordinator that
fails over simply plans again from what the store holds.

Order of precedence, as the source design asks:
1. placement: workloads with no valid owner (never placed, owner offline or
   restarted, owner STOPPING, a move that timed out) go to the least-loaded
   schedulable member at once -- nothing else can run them;
2. drain: moves off the draining target, at most `batch_size` in flight,
   each to the least-loaded schedulable member;
3. balance: only when nothing else is moving, one workload at a time from
   the most to the least loaded schedulable member, while they differ by
   more than one.

Schedulable = ALIVE and online. Load = workloads owned, counting moves in
flight to the member. Ties go to the lowest member id, so a plan is
deterministic.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from metastore.liveness import DrainState, Liveness, is_schedulable
from metastore.workloads import ASSIGNED, RUNNING, UNASSIGNED, Workload

PLACE = "place"
DRAIN = "drain"
BALANCE = "balance"


@dataclass(frozen=True)
class MemberView:
    id: int
    liveness: Liveness = Liveness.ALIVE
    session: int = 0  # the current session lease; 0 = none
    online: bool = True  # the session is live

    @property
    def schedulable(self) -> bool:
        return self.online and is_schedulable(self.liveness)


@dataclass(frozen=True)
class Move:
    workload: Workload
    destination: int
    reason: str  # PLACE, DRAIN or BALANCE


@dataclass
class ClusterView:
    members: dict[int, MemberView]
    workloads: list[Workload]
    drain: DrainState | None = None
    # Workloads (by id) whose move has been in flight too long, with the
    # destination that did not answer.
    timed_out: dict[str, int] = field(default_factory=dict)
    # Members not to send a workload to (they did not accept it lately),
    # unless no other member can take it.
    avoid: dict[str, set[int]] = field(default_factory=dict)

    def owner_valid(self, w: Workload) -> bool:
        """The owner can run the workload: a live member, in the session the
        assignment was made for, not STOPPING (a STOPPING member holds nothing)."""
        if w.state == UNASSIGNED or w.id in self.timed_out:
            return False
        m = self.members.get(w.owner)
        return (m is not None and m.online and m.session == w.session
                and m.liveness is not Liveness.STOPPING)

    def load(self) -> dict[int, int]:
        """Workloads per schedulable member (moves in flight to it included)."""
        out = {mid: 0 for mid, m in self.members.items() if m.schedulable}
        for w in self.workloads:
            if w.owner in out and self.owner_valid(w):
                out[w.owner] += 1
        return out

    def remaining_on(self, member: int) -> tuple[int, int]:
        """(workloads, sub-units) still on `member`: those it owns, moves off it
        not yet accepted elsewhere, and sub-units other owners report on it."""
        workloads = sum(1 for w in self.workloads
                        if w.owner == member or (w.state == ASSIGNED and w.source == member))
        subunits = sum(w.subunits_on(member) for w in self.workloads)
        return workloads, subunits


def _least_loaded(load: dict[int, int], exclude: set[int] = frozenset()) -> int | None:  # type: ignore[assignment]
    candidates = [(n, mid) for mid, n in load.items() if mid not in exclude]
    return min(candidates)[1] if candidates else None


def plan(view: ClusterView, batch_size: int = 1, force_drain: bool = False) -> list[Move]:
    """The moves to make now (see the module docstring for the rules).
    `force_drain` (a drain past its deadline) lifts the batch limit."""
    load = view.load()
    drain_target = view.drain.target if view.drain is not None else 0
    load.pop(drain_target, None)  # defensive: the target is DRAINING, so never schedulable
    moves: list[Move] = []

    def send(w: Workload, reason: str) -> bool:
        avoid = view.avoid.get(w.id, set()) | ({view.timed_out[w.id]} if w.id in view.timed_out else set())
        # A member to avoid is still better than none: try it again.
        dest = _least_loaded(load, avoid) if avoid else None
        dest = dest if dest is not None else _least_loaded(load)
        if dest is None:
            return False
        moves.append(Move(w, dest, reason))
        load[dest] += 1
        return True

    # 1. Placement.
    for w in sorted(view.workloads, key=lambda w: w.id):
        if not view.owner_valid(w):
            send(w, PLACE)

    placed = {m.workload.id for m in moves}
    # 2. Drain.
    if view.drain is not None:
        target = view.drain.target
        # Moves off the target not yet accepted -- those re-placed just now
        # (their destination went away) included: they are still moving.
        in_flight = sum(1 for w in view.workloads if w.state == ASSIGNED and w.source == target
                        and (w.id in placed or view.owner_valid(w)))
        slots = len(view.workloads) if force_drain else max(0, batch_size - in_flight)
        for w in sorted(view.workloads, key=lambda w: w.id):
            if slots <= 0:
                break
            if w.owner == target and w.id not in placed and view.owner_valid(w):
                if not send(w, DRAIN):
                    break
                slots -= 1
        return moves  # the drain runs ahead of balancing: no balance moves meanwhile

    # 3. Balance.
    if moves or any(w.state == ASSIGNED for w in view.workloads) or len(load) < 2:
        return moves
    busiest = max(load.items(), key=lambda item: (item[1], -item[0]))[0]
    idlest = _least_loaded(load)
    if idlest is not None and load[busiest] - load[idlest] > 1:
        for w in sorted(view.workloads, key=lambda w: w.id):
            if (w.owner == busiest and w.state == RUNNING and view.owner_valid(w)
                    and idlest not in view.avoid.get(w.id, ())):
                moves.append(Move(w, idlest, BALANCE))
                break
    return moves
