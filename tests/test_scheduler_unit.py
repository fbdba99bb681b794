"""The coordinator's scheduling choices, on plain values (metastore.scheduler)."""
from __future__ import annotations

from metastore.liveness import DrainState, Liveness
from metastore.scheduler import BALANCE, DRAIN, PLACE, ClusterView, MemberView, plan
from metastore.workloads import ASSIGNED, RUNNING, UNASSIGNED, Workload

A, B, C, D = 0xA, 0xB, 0xC, 0xD


def members(*specs: tuple[int, Liveness, bool]) -> dict[int, MemberView]:
    return {mid: MemberView(mid, state, session=mid * 100, online=online) for mid, state, online in specs}


def alive(*ids: int) -> dict[int, MemberView]:
    return members(*((i, Liveness.ALIVE, True) for i in ids))


def running(wid: str, owner: int, **kw) -> Workload:
    return Workload(wid, owner=owner, session=kw.pop("session", owner * 100), epoch=kw.pop("epoch", 1),
                    state=kw.pop("state", RUNNING), **kw)


def spread(counts: dict[int, int]) -> list[Workload]:
    out, n = [], 0
    for owner, count in counts.items():
        for _ in range(count):
            out.append(running(f"w{n:03d}", owner))
            n += 1
    return out


def drain_of(target: int) -> DrainState:
    return DrainState(target=target, start_time=0.0, initial_workloads=0, initial_subunits=0,
                      target_session=target * 100)


def test_unassigned_workloads_go_to_the_least_loaded_member_ties_to_lowest_id():
    view = ClusterView(alive(A, B, C), spread({A: 2, B: 1, C: 1}) + [Workload("new1"), Workload("new2")])
    moves = plan(view)
    assert [(m.workload.id, m.destination, m.reason) for m in moves] == [("new1", B, PLACE), ("new2", C, PLACE)]


def test_only_schedulable_members_receive_work():
    view = ClusterView(members((A, Liveness.DRAINING, True), (B, Liveness.STOPPING, True),
                               (C, Liveness.ALIVE, False), (D, Liveness.ALIVE, True)),
                       [Workload(f"n{i}") for i in range(3)])
    assert {m.destination for m in plan(view)} == {D}


def test_workloads_of_an_offline_restarted_or_stopping_owner_are_placed_again():
    ms = members((A, Liveness.ALIVE, False), (B, Liveness.ALIVE, True), (C, Liveness.STOPPING, True),
                 (D, Liveness.ALIVE, True))
    ws = [running("offline", A), running("stale-session", B, session=1), running("on-stopping", C),
          running("fine", D)]
    moves = plan(ClusterView(ms, ws))
    assert sorted(m.workload.id for m in moves) == ["offline", "on-stopping", "stale-session"]
    assert all(m.reason == PLACE and m.destination in (B, D) for m in moves)


def test_no_destination_means_no_move():
    view = ClusterView(members((A, Liveness.DRAINING, True), (B, Liveness.ALIVE, False)), [Workload("x")])
    assert plan(view) == []


def test_drain_keeps_at_most_batch_size_moves_in_flight():
    ws = spread({A: 4, B: 2, C: 2})
    view = ClusterView(alive(B, C) | members((A, Liveness.DRAINING, True)), ws, drain_of(A))
    moves = plan(view, batch_size=1)
    assert len(moves) == 1 and moves[0].reason == DRAIN and moves[0].workload.owner == A
    assert plan(view, batch_size=3)[2].workload.owner == A and len(plan(view, batch_size=3)) == 3
    # One move off A already in flight (assigned to B, not accepted): with batch 2, one more.
    moving = ws[0].assigned_to(B, B * 100)
    assert moving.state == ASSIGNED and moving.source == A
    view.workloads = [moving] + ws[1:]
    assert len(plan(view, batch_size=1)) == 0
    assert len(plan(view, batch_size=2)) == 1
    # Forced (deadline passed): everything left goes at once.
    assert len(plan(view, batch_size=1, force_drain=True)) == 3


def test_drain_sends_each_move_to_the_least_loaded_member_and_never_balances():
    ws = spread({A: 3, B: 5, C: 1})
    view = ClusterView(alive(B, C) | members((A, Liveness.DRAINING, True)), ws, drain_of(A))
    moves = plan(view, batch_size=3)
    assert [m.destination for m in moves] == [C, C, C]  # 1 -> 2 -> 3 -> 4, still below B's 5
    assert all(m.reason == DRAIN for m in moves)
    # Unbalanced B vs C, but a drain runs: no balance move.
    view2 = ClusterView(alive(B, C) | members((A, Liveness.DRAINING, True)), spread({B: 6, C: 0}), drain_of(A))
    assert plan(view2) == []


def test_remaining_counts_workloads_moves_off_and_subunits_on_the_target():
    moving = running("m", A).assigned_to(B, B * 100)
    ws = [running("a1", A), moving, running("b1", B, subunits={A: 2, B: 1}), running("c1", C, subunits={A: 1})]
    view = ClusterView(alive(B, C) | members((A, Liveness.DRAINING, True)), ws, drain_of(A))
    assert view.remaining_on(A) == (2, 3)
    assert view.remaining_on(B) == (2, 1)


def test_balance_moves_one_at_a_time_from_busiest_to_idlest():
    view = ClusterView(alive(A, B, C), spread({A: 5, B: 1, C: 3}))
    moves = plan(view)
    assert len(moves) == 1 and moves[0].reason == BALANCE
    assert moves[0].workload.owner == A and moves[0].destination == B
    assert plan(ClusterView(alive(A, B, C), spread({A: 4, B: 3, C: 3}))) == []  # within one
    # Nothing balances while a move is in flight.
    ws = spread({A: 5, B: 1, C: 3})
    ws[0] = ws[0].assigned_to(C, C * 100)
    assert plan(ClusterView(alive(A, B, C), ws)) == []


def test_a_timed_out_move_goes_elsewhere():
    stuck = running("s", A).assigned_to(B, B * 100)
    view = ClusterView(alive(A, B, C), [stuck], timed_out={"s": B})
    moves = plan(view)
    assert [(m.workload.id, m.destination) for m in moves] == [("s", A)]  # B excluded, A least loaded
    # B is the only member left: it is tried again rather than leaving the workload nowhere.
    assert [m.destination for m in plan(ClusterView(alive(B), [stuck], timed_out={"s": B}))] == [B]


def test_assignment_epochs_and_sources():
    w = Workload("x", metadata={"k": 1})
    first = w.assigned_to(A, 1)
    assert (first.owner, first.epoch, first.state, first.source) == (A, 1, ASSIGNED, 0)
    accepted = first.accepted({B: 2})
    assert accepted.state == RUNNING and accepted.subunits == {B: 2}
    moved = accepted.assigned_to(C, 3)
    assert (moved.epoch, moved.source, moved.subunits) == (2, A, {})
    # Re-placed before anyone accepted: still a move off A.
    assert moved.assigned_to(B, 2).source == A
    roundtrip = Workload.from_json(moved.to_json(), mod_revision=7)
    assert roundtrip == moved.__class__(**{**moved.__dict__, "mod_revision": 7})
    assert UNASSIGNED == Workload("y").state


def test_members_that_did_not_accept_lately_are_avoided_for_that_workload():
    ws = spread({A: 3, B: 1, C: 2}) + [Workload("new")]
    view = ClusterView(alive(A, B, C), ws, avoid={"new": {B}})
    assert [(m.workload.id, m.destination) for m in plan(view)] == [("new", C)]
    # Balancing does not send a workload back to a member that refused it.
    ws = spread({A: 3, B: 0, C: 2})
    view = ClusterView(alive(A, B, C), ws, avoid={ws[0].id: {B}})
    moves = plan(view)
    assert [(m.workload.id, m.destination) for m in moves] == [(ws[1].id, B)]
