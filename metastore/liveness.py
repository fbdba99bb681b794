"""Node liveness and the drain state, as replicated state.

Each member has a liveness -- ALIVE (0), STOPPING (1) or DRAINING (2), the
source design's values -- and the cluster has at most one DrainState (which
member is being drained, since when, how much it held then). Both live in
the store's `meta` table, outside the MVCC keyspace: `etcdctl get --prefix
''` neither shows nor deletes them, yet they are durable on a persistent
engine and travel in Raft snapshots like every table. That is what lets a
new coordinator pick up a drain the old one started.

They change only through `Proposal.liveness` (a `LivenessChange`), applied
here as compare-and-set on every member: two concurrent drain requests
cannot both win, and a stale request (a member already STOPPING) cannot
move a member backwards. Liveness moves forward only, ALIVE -> DRAINING ->
STOPPING (compare by `RANK`: the numeric values are not the order), with
three deliberate ways back to ALIVE:

- DRAIN_CANCEL: an operator cancels the drain or undrains a STOPPING member
  (`DELETE .../drain`), or the coordinator abandons the drain because the
  target went offline;
- REGISTER of a DRAINING member: it restarted mid-drain, so that drain is
  over (the source design clears the DrainState of a crashed target). A
  STOPPING member stays STOPPING across restarts -- drained means out of
  scheduling until an operator says otherwise, as a cordoned node stays
  cordoned;
- RESET: the coordinator is draining or stopping but no schedulable member
  is left to hand over to (source requirement 9.8).

Rows: ``liveness/`` + u64 member id (big-endian) -> JSON {"state", "session"};
``drain`` -> JSON DrainState.
"""
from __future__ import annotations

import enum
import json
import logging
import struct
from dataclasses import asdict, dataclass

from grpc import StatusCode

from metastore.api.pb import raft_entry_pb2
from metastore.errors import EtcdError
from metastore.store import Store

log = logging.getLogger("metastore.liveness")

PREFIX = b"liveness/"
DRAIN_KEY = b"drain"
_ID = struct.Struct(">Q")

Op = raft_entry_pb2.LivenessChange


class Liveness(enum.IntEnum):
    ALIVE = 0
    STOPPING = 1
    DRAINING = 2


# The order transitions follow; a transition must raise the rank.
RANK = {Liveness.ALIVE: 0, Liveness.DRAINING: 1, Liveness.STOPPING: 2}

# Apply results a caller tells apart (by identity: every member computes its
# own result for the proposals it made).
DRAIN_CONFLICT = EtcdError(StatusCode.FAILED_PRECONDITION, "metastore: another drain is in progress")
NOT_ALIVE = EtcdError(StatusCode.FAILED_PRECONDITION, "metastore: the member is not ALIVE")
NOT_DRAINING = EtcdError(StatusCode.FAILED_PRECONDITION, "metastore: the member is not being drained")
CAS_FAILED = EtcdError(StatusCode.FAILED_PRECONDITION, "metastore: liveness changed meanwhile")
BACKWARDS = EtcdError(StatusCode.INVALID_ARGUMENT, "metastore: liveness only moves forward")


def is_schedulable(state: Liveness) -> bool:
    """Only an ALIVE member takes new work (the source's IsSchedulable)."""
    return state is Liveness.ALIVE


def can_advance(current: Liveness, to: Liveness) -> bool:
    return RANK[to] > RANK[current]


@dataclass(frozen=True)
class MemberLiveness:
    state: Liveness = Liveness.ALIVE
    session: int = 0  # the lease of the member's current session; 0 = never registered


@dataclass(frozen=True)
class DrainState:
    target: int
    start_time: float  # unix seconds, set once by whoever started the drain
    initial_workloads: int
    initial_subunits: int
    target_session: int  # the target's session when the drain began
    deadline: float = 0.0  # unix seconds; 0 = none


def _member_key(member: int) -> bytes:
    return PREFIX + _ID.pack(member)


def read_all(store: Store) -> dict[int, MemberLiveness]:
    """Every member's recorded liveness (members never registered are absent: ALIVE)."""
    out: dict[int, MemberLiveness] = {}
    for key, value in store.meta_items(PREFIX):  # type: ignore[attr-defined]
        if len(key) != len(PREFIX) + _ID.size:
            continue
        try:
            row = json.loads(value)
            out[_ID.unpack_from(key, len(PREFIX))[0]] = MemberLiveness(Liveness(row["state"]), int(row["session"]))
        except (ValueError, KeyError, TypeError):
            log.error("unreadable liveness row %r ignored", key)
    return out


def read(store: Store, member: int) -> MemberLiveness:
    return read_all(store).get(member, MemberLiveness())


def read_drain(store: Store) -> DrainState | None:
    for key, value in store.meta_items(DRAIN_KEY):  # type: ignore[attr-defined]
        if key == DRAIN_KEY:
            try:
                return DrainState(**json.loads(value))
            except (ValueError, TypeError):
                log.error("unreadable drain state ignored")
    return None


def _row(state: MemberLiveness) -> bytes:
    return json.dumps({"state": int(state.state), "session": state.session}).encode()


def apply(store: Store, change: raft_entry_pb2.LivenessChange) -> EtcdError | None:
    """Apply one change (apply thread; deterministic): None when it took
    effect (or already held), else the error saying why not."""
    member = change.member_id
    current = read(store, member)
    drain = read_drain(store)
    rows: dict[bytes, bytes | None] = {}
    if change.op == Op.REGISTER:
        state = Liveness.STOPPING if current.state is Liveness.STOPPING else Liveness.ALIVE
        rows[_member_key(member)] = _row(MemberLiveness(state, change.session))
        if drain is not None and drain.target == member:
            rows[DRAIN_KEY] = None  # the drained member restarted: that drain is over
    elif change.op == Op.ADVANCE:
        expect, to = Liveness(change.expect), Liveness(change.to)
        if not can_advance(expect, to):
            return BACKWARDS
        if current.state is not expect:
            return CAS_FAILED
        rows[_member_key(member)] = _row(MemberLiveness(to, current.session))
    elif change.op == Op.DRAIN_START:
        if drain is not None:
            return None if drain.target == member else DRAIN_CONFLICT  # idempotent for the same target
        if current.state is not Liveness.ALIVE:
            return NOT_ALIVE
        # The target's session as applied (a restart racing the request
        # registered a newer one than the proposer saw).
        state = DrainState(member, change.start_time, change.initial_workloads, change.initial_subunits,
                           current.session, change.deadline)
        rows[_member_key(member)] = _row(MemberLiveness(Liveness.DRAINING, current.session))
        rows[DRAIN_KEY] = json.dumps(asdict(state)).encode()
    elif change.op == Op.DRAIN_CANCEL and (drain is None or drain.target != member):
        if current.state is not Liveness.STOPPING:
            return NOT_DRAINING
        rows[_member_key(member)] = _row(MemberLiveness(Liveness.ALIVE, current.session))  # undrain
    elif change.op in (Op.DRAIN_FINISH, Op.DRAIN_CANCEL):
        if drain is None or drain.target != member:
            return NOT_DRAINING
        to = Liveness.STOPPING if change.op == Op.DRAIN_FINISH else Liveness.ALIVE
        if current.state is Liveness.DRAINING:
            rows[_member_key(member)] = _row(MemberLiveness(to, current.session))
        rows[DRAIN_KEY] = None
    elif change.op == Op.RESET:
        if current.state is Liveness.ALIVE:
            return None
        rows[_member_key(member)] = _row(MemberLiveness(Liveness.ALIVE, current.session))
        if drain is not None and drain.target == member:
            rows[DRAIN_KEY] = None
    else:
        return EtcdError(StatusCode.INVALID_ARGUMENT, f"metastore: unknown liveness op {change.op}")
    store.write_meta(rows)  # type: ignore[attr-defined]
    return None
