"""Liveness transitions and DrainState invariants, applied as Raft entries are.

Every change goes through `StateMachine.apply` with a real store of each
engine, as a committed `ProposalBatch` would: the rules under test are the
ones every member enforces identically.
"""
from __future__ import annotations

import pytest

from metastore import liveness
from metastore.api.pb import raft_entry_pb2, rpc_pb2
from metastore.cluster import Membership
from metastore.errors import EtcdError
from metastore.liveness import Liveness
from metastore.state_machine import StateMachine
from store_fixtures import engine, make_store  # noqa: F401 - fixtures

Op = raft_entry_pb2.LivenessChange
A, B, C = 0xA, 0xB, 0xC


class Applier:
    """Feeds proposals to a state machine as consecutive Raft entries."""

    def __init__(self, store) -> None:
        self.store = store
        self.sm = StateMachine(store, Membership("t", {}))
        self.index = 0

    def batch(self, *changes: raft_entry_pb2.LivenessChange) -> list:
        self.index += 1
        entry = raft_entry_pb2.ProposalBatch(
            origin=1, proposals=[raft_entry_pb2.Proposal(liveness=c) for c in changes])
        return self.sm.apply(entry.SerializeToString(), self.index)

    def one(self, **fields) -> EtcdError | None:
        return self.batch(raft_entry_pb2.LivenessChange(**fields))[0]

    def state(self, member: int) -> Liveness:
        return liveness.read(self.store, member).state


def register(ap: Applier, member: int, session: int) -> None:
    assert ap.one(op=Op.REGISTER, member_id=member, session=session) is None


def start(ap: Applier, member: int, session: int = 0, **extra) -> EtcdError | None:
    return ap.one(op=Op.DRAIN_START, member_id=member, session=session, start_time=1000.0,
                  initial_workloads=3, initial_subunits=1, **extra)


@pytest.fixture
def ap(make_store):  # noqa: F811
    store, _ = make_store()
    return Applier(store)


def test_values_and_order_are_the_designs():
    assert (Liveness.ALIVE, Liveness.STOPPING, Liveness.DRAINING) == (0, 1, 2)
    assert liveness.can_advance(Liveness.ALIVE, Liveness.DRAINING)
    assert liveness.can_advance(Liveness.DRAINING, Liveness.STOPPING)
    assert liveness.can_advance(Liveness.ALIVE, Liveness.STOPPING)
    # By rank, not by value: STOPPING (1) is after DRAINING (2).
    assert not liveness.can_advance(Liveness.STOPPING, Liveness.DRAINING)
    assert not liveness.can_advance(Liveness.DRAINING, Liveness.ALIVE)
    assert not liveness.can_advance(Liveness.ALIVE, Liveness.ALIVE)
    assert [s for s in Liveness if liveness.is_schedulable(s)] == [Liveness.ALIVE]


def test_advance_is_forward_only_compare_and_swap(ap):
    register(ap, A, 11)
    assert ap.state(A) is Liveness.ALIVE
    assert ap.one(op=Op.ADVANCE, member_id=A, expect=Liveness.DRAINING, to=Liveness.STOPPING) \
        is liveness.CAS_FAILED  # expected DRAINING, is ALIVE
    assert ap.one(op=Op.ADVANCE, member_id=A, expect=Liveness.ALIVE, to=Liveness.DRAINING) is None
    assert ap.state(A) is Liveness.DRAINING
    assert ap.one(op=Op.ADVANCE, member_id=A, expect=Liveness.DRAINING, to=Liveness.ALIVE) is liveness.BACKWARDS
    assert ap.one(op=Op.ADVANCE, member_id=A, expect=Liveness.STOPPING, to=Liveness.DRAINING) is liveness.BACKWARDS
    assert ap.one(op=Op.ADVANCE, member_id=A, expect=Liveness.DRAINING, to=Liveness.STOPPING) is None
    assert ap.state(A) is Liveness.STOPPING
    assert liveness.read(ap.store, A).session == 11


def test_drain_has_a_single_target_and_concurrent_starts_conflict(ap):
    for member, session in ((A, 1), (B, 2), (C, 3)):
        register(ap, member, session)
    # Two requests racing into one Raft entry: the first applied wins.
    first, second = ap.batch(
        raft_entry_pb2.LivenessChange(op=Op.DRAIN_START, member_id=B, session=2, start_time=5.0),
        raft_entry_pb2.LivenessChange(op=Op.DRAIN_START, member_id=C, session=3, start_time=6.0))
    assert first is None and second is liveness.DRAIN_CONFLICT
    drain = liveness.read_drain(ap.store)
    assert drain is not None and drain.target == B and drain.start_time == 5.0 and drain.target_session == 2
    assert ap.state(B) is Liveness.DRAINING and ap.state(C) is Liveness.ALIVE
    # The same target again is idempotent and keeps the original start.
    assert start(ap, B, 2) is None
    assert liveness.read_drain(ap.store).start_time == 5.0
    assert start(ap, C, 3) is liveness.DRAIN_CONFLICT


def test_finish_moves_to_stopping_and_clears_the_drain(ap):
    register(ap, A, 1)
    register(ap, B, 2)
    assert ap.one(op=Op.DRAIN_FINISH, member_id=B) is liveness.NOT_DRAINING
    assert start(ap, B, 2, deadline=2000.0) is None
    assert liveness.read_drain(ap.store).deadline == 2000.0
    assert ap.one(op=Op.DRAIN_FINISH, member_id=A) is liveness.NOT_DRAINING  # not the target
    assert ap.one(op=Op.DRAIN_FINISH, member_id=B) is None
    assert ap.state(B) is Liveness.STOPPING and liveness.read_drain(ap.store) is None
    # A STOPPING member cannot be drained again.
    assert start(ap, B, 2) is liveness.NOT_ALIVE


def test_cancel_and_undrain_return_to_alive(ap):
    register(ap, B, 2)
    assert ap.one(op=Op.DRAIN_CANCEL, member_id=B) is liveness.NOT_DRAINING  # ALIVE: nothing to cancel
    assert start(ap, B, 2) is None
    assert ap.one(op=Op.DRAIN_CANCEL, member_id=B) is None
    assert ap.state(B) is Liveness.ALIVE and liveness.read_drain(ap.store) is None
    assert start(ap, B, 2) is None and ap.one(op=Op.DRAIN_FINISH, member_id=B) is None
    assert ap.one(op=Op.DRAIN_CANCEL, member_id=B) is None  # undrain a STOPPING member
    assert ap.state(B) is Liveness.ALIVE


def test_a_new_session_ends_a_drain_but_not_a_stop(ap):
    register(ap, B, 2)
    assert start(ap, B, 2) is None
    register(ap, B, 20)  # B restarted mid-drain
    assert ap.state(B) is Liveness.ALIVE and liveness.read_drain(ap.store) is None
    assert liveness.read(ap.store, B).session == 20
    assert start(ap, B, 20) is None and ap.one(op=Op.DRAIN_FINISH, member_id=B) is None
    register(ap, B, 21)  # a drained member restarted: still out of scheduling
    assert ap.state(B) is Liveness.STOPPING and liveness.read(ap.store, B).session == 21


def test_reset_brings_a_draining_or_stopping_member_back(ap):
    register(ap, A, 1)
    assert start(ap, A, 1) is None
    assert ap.one(op=Op.RESET, member_id=A) is None
    assert ap.state(A) is Liveness.ALIVE and liveness.read_drain(ap.store) is None
    assert ap.one(op=Op.ADVANCE, member_id=A, expect=Liveness.ALIVE, to=Liveness.STOPPING) is None
    assert ap.one(op=Op.RESET, member_id=A) is None
    assert ap.state(A) is Liveness.ALIVE


def test_liveness_is_outside_the_keyspace_and_durable(make_store, engine):  # noqa: F811
    store, path = make_store()
    ap = Applier(store)
    register(ap, A, 1)
    register(ap, B, 2)
    assert start(ap, B, 2) is None
    # Like `etcdctl get --prefix ''`: no key shows, and no revision was used.
    everything = store.range(rpc_pb2.RangeRequest(key=b"\0", range_end=b"\0"))
    assert everything.count == 0 and store.revision == 1
    # A Raft snapshot (every table) carries the rows to another member.
    rows = list(store.export_items())
    fresh, _ = make_store()
    fresh.import_items(iter(rows))
    assert liveness.read(fresh, B) == liveness.read(store, B)
    assert liveness.read_drain(fresh) == liveness.read_drain(store)
    # A restart keeps them, and replaying the same entries changes nothing.
    reopened = engine.reopen(store, path)
    try:
        again = Applier(reopened)
        assert again.state(B) is Liveness.DRAINING and liveness.read_drain(reopened).target == B
        again.index = 2  # the DRAIN_START entry once more, as a log replay would
        again.batch(raft_entry_pb2.LivenessChange(op=Op.DRAIN_CANCEL, member_id=B))
        assert again.state(B) is Liveness.DRAINING  # skipped: already applied at that position
    finally:
        reopened.close()
