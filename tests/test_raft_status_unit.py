"""get_raft_status: standalone without a Raft node, the node's view with one."""
from __future__ import annotations

from metastore.engines.memory import open_store
from metastore.types import RaftRole, RaftStatus, RaftStatusSource


class FakeRaft(RaftStatusSource):
    def __init__(self, status: RaftStatus) -> None:
        self.status = status
        self.calls = 0

    def raft_status(self) -> RaftStatus:
        self.calls += 1
        return self.status


def test_standalone_without_raft() -> None:
    status = open_store(node_id=0x1234).get_raft_status()
    assert status == RaftStatus(node_id=0x1234, term=0, leader_id=0, state="standalone", applied=0, commit=0)
    assert status.state == RaftRole.STANDALONE.value
    assert open_store().get_raft_status().node_id == 0


def test_attached_source_is_asked_each_time() -> None:
    store = open_store(node_id=1)
    fake = FakeRaft(RaftStatus(node_id=1, term=3, leader_id=2, state="follower", applied=10, commit=12))
    store.attach_raft(fake)
    assert store.get_raft_status() == fake.status
    fake.status = RaftStatus(node_id=1, term=4, leader_id=1, state="leader", applied=12, commit=12)
    assert store.get_raft_status().state == RaftRole.LEADER.value
    assert fake.calls == 2


def test_detach_returns_to_standalone() -> None:
    store = open_store(node_id=5)
    store.attach_raft(FakeRaft(RaftStatus(node_id=5, term=1, leader_id=5, state="leader", applied=1, commit=1)))
    store.attach_raft(None)
    assert store.get_raft_status().state == "standalone"
