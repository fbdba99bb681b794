"""Workload placement through the embed API: the application's hooks decide.

Three members run in this process, each with on_assign / on_release hooks
that record what the coordinator asked of them -- the way an application
that embeds metastore as its cluster state store learns its work.
"""
from __future__ import annotations

import threading
from collections import defaultdict

import pytest

from metastore import embed
from metastore.placement import PlacementError
from metastore.testing import wait_for
from metastore.workloads import RUNNING, Workload

pytestmark = pytest.mark.timeout(120)

FAST = dict(heartbeat_interval_ms=50, election_timeout_ms=500, session_ttl=2, workload_move_timeout=2.0)


class App:
    """One member's application: runs what it is given, refuses 'refuse-*' on n3."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.assigned: list[tuple[str, int]] = []
        self.released: list[str] = []
        self.refused: list[str] = []
        self.subunit_target = 0  # member id to report a sub-unit on, for workloads marked "sub"

    def on_assign(self, w: Workload) -> dict[int, int] | None:
        if self.name == "n3" and w.id.startswith("refuse"):
            with self.lock:
                self.refused.append(w.id)
            raise RuntimeError("this member cannot run it")
        with self.lock:
            self.assigned.append((w.id, w.epoch))
        if (w.metadata or {}).get("sub") and self.subunit_target:
            return {self.subunit_target: 1}
        return None

    def on_release(self, w: Workload) -> None:
        with self.lock:
            self.released.append(w.id)


@pytest.fixture
def members(tmp_path):
    names = ["n1", "n2", "n3"]
    ports = embed.free_ports(6)
    peer = {n: embed.loopback_url(ports[2 * i]) for i, n in enumerate(names)}
    client = {n: embed.loopback_url(ports[2 * i + 1]) for i, n in enumerate(names)}
    initial = ",".join(f"{n}={peer[n]}" for n in names)
    apps = {n: App(n) for n in names}
    started: list[embed.Member] = []
    try:
        for n in names:
            started.append(embed.start(
                name=n, data_dir=str(tmp_path / n), listen_client_urls=client[n], initial_cluster=initial,
                initial_cluster_token="embed-placement", wait=False, on_assign=apps[n].on_assign,
                on_release=apps[n].on_release, **FAST))
        for m in started:
            m.wait_ready(30)
        yield started, apps
    finally:
        for m in started:
            m.stop()


def running_everywhere(m: embed.Member, count: int) -> list[Workload]:
    ws = m.placement.list()
    return ws if len(ws) == count and all(w.state == RUNNING for w in ws) else []


def test_hooks_accept_refuse_report_subunits_and_release_on_drain(members):
    started, apps = members
    n1, n2, n3 = started
    ids = {m.name: m.member_id for m in started}
    apps["n1"].subunit_target = ids["n2"]
    api = n1.placement
    wait_for(lambda: all(m["online"] for m in api.members()), 30, "every member's session")
    # With every member idle, three workloads land one on each member: n3's
    # application refuses its one.
    for i in range(3):
        api.register(f"refuse-{i}", {"i": 90 + i})
    for i in range(3):
        api.register(f"w{i}", {"i": i})
    api.register("sub-0", {"sub": True})
    assert api.register("w0", {"i": 0}).id == "w0"  # idempotent

    def settled() -> list[Workload]:
        # All running and balanced: the scheduler's fixed point, nothing moves.
        ws = running_everywhere(n2, 7)
        load = [sum(1 for w in ws if w.owner == m.member_id) for m in started]
        return ws if ws and max(load) - min(load) <= 1 and not any(
            w.owner == ids["n3"] and w.id.startswith("refuse") for w in ws) else []

    ws = wait_for(settled, 40, "all 7 workloads running, balanced")
    by_id = {w.id: w for w in ws}
    names = {v: k for k, v in ids.items()}
    # Each owner's application was asked, for exactly the epoch it runs.
    for w in ws:
        assert (w.id, w.epoch) in apps[names[w.owner]].assigned, (w, apps[names[w.owner]].assigned)
    # n3 refused: after the move timeout each went elsewhere.
    assert apps["n3"].refused
    assert all(by_id[f"refuse-{i}"].owner != ids["n3"] for i in range(3))
    # n1's application reports a sub-unit on n2 for "sub" workloads it runs.
    if by_id["sub-0"].owner == ids["n1"]:
        assert by_id["sub-0"].subunits == {ids["n2"]: 1}

    # Drain a member that is not the coordinator. First, the owner of a
    # workload elsewhere reports sub-units on the target (fenced: a report
    # from a member that does not own the workload is dropped).
    leader_id = n1.client().status().leader
    target = next(m for m in started if m.member_id != leader_id)
    w = next(w for w in ws if w.owner != target.member_id)
    owner = next(m for m in started if m.member_id == w.owner)
    stranger = next(m for m in started if m is not owner)
    assert not stranger.placement.report_subunits(w.id, {target.member_id: 3})
    assert owner.placement.report_subunits(w.id, {target.member_id: 3})
    assert api.get(w.id).subunits == {target.member_id: 3}

    held = {x.id for x in target.placement.mine()}
    on_target = sum(x.subunits.get(target.member_id, 0) for x in api.list())
    assert on_target >= 3
    counts = api.drain(target.name)
    assert counts == {"current_maintainer_count": len(held), "current_dispatcher_count": on_target}

    # The workloads leave; the sub-units hold the drain until their owners move them.
    def workloads_gone() -> dict:
        st = api.drain_status(target.name)
        return st if st["remaining_maintainer_count"] == 0 else {}
    st = wait_for(workloads_gone, 40, "the target's workloads to move")
    assert st["is_draining"] and st["liveness"] == "DRAINING"
    assert st["remaining_dispatcher_count"] == on_target
    for x in api.list():
        if x.subunits.get(target.member_id):
            mover = next(m for m in started if m.member_id == x.owner)
            assert mover.placement.report_subunits(x.id, {mover.member_id: x.subunits[target.member_id]})

    def drained() -> bool:
        st = api.drain_status(target.name)
        return st["liveness"] == "STOPPING" and not st["is_draining"]
    wait_for(drained, 40, f"{target.name} drained")
    app = apps[target.name]
    wait_for(lambda: held <= set(app.released), 10, "the target's application to release its workloads")
    after = api.list()
    assert len(after) == 7 and all(x.owner != target.member_id for x in after)
    assert target.placement.mine() == []

    with pytest.raises(PlacementError) as err:
        api.drain("no-such-member")
    assert err.value.status == 404
    # Undrain: ALIVE again.
    assert api.cancel_drain(target.name)["liveness"] == "ALIVE"
    assert {m["name"]: m["liveness"] for m in api.members()}[target.name] == "ALIVE"
    api.remove("w0")
    assert api.get("w0") is None
