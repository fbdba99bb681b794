"""RaftNode.raft_status mapping, with a fake pysyncobj object (no sockets)."""
from __future__ import annotations

from types import SimpleNamespace

from metastore.cluster import Membership
from metastore.raft import RaftConfig, RaftNode


class FakeSyncObj:
    def __init__(self, term: int, commit: int, applied: int, leader: str | None) -> None:
        self.raftCurrentTerm = term
        self.raftCommitIndex = commit
        self.raftLastApplied = applied
        self._leader = leader

    def _getLeader(self):
        return SimpleNamespace(id=self._leader) if self._leader else None


def make_node() -> tuple[RaftNode, Membership]:
    membership = Membership("tok", {"a": ["http://127.0.0.1:1001"], "b": ["http://127.0.0.1:1002"]})
    a = next(m for m in membership.members() if m.name == "a")
    cfg = RaftConfig(self_address="127.0.0.1:1001", partner_addresses=["127.0.0.1:1002"],
                     bind_address="127.0.0.1:1001", journal_file=None)
    return RaftNode(cfg, a.id, membership.id_of_address, apply=lambda payload: None), membership


def test_status_before_start_is_unknown():
    node, _ = make_node()
    st = node.raft_status()
    assert st.state == "unknown" and st.term == 0 and st.leader_id == 0


def test_status_maps_addresses_to_member_ids_and_roles():
    node, membership = make_node()
    ids = {m.name: m.id for m in membership.members()}
    node._obj = FakeSyncObj(term=7, commit=42, applied=40, leader="127.0.0.1:1002")
    node._on_state_changed(0, 0)
    st = node.raft_status()
    assert (st.node_id, st.term, st.leader_id, st.state, st.applied, st.commit) == \
        (ids["a"], 7, ids["b"], "follower", 40, 42)

    node._on_state_changed(0, 1)
    node._obj = FakeSyncObj(term=8, commit=42, applied=42, leader=None)
    st = node.raft_status()
    assert st.state == "candidate" and st.leader_id == 0

    node._on_state_changed(1, 2)
    node._obj = FakeSyncObj(term=8, commit=43, applied=43, leader="127.0.0.1:1001")
    st = node.raft_status()
    assert st.state == "leader" and st.leader_id == st.node_id == ids["a"]
    assert node.is_leader()


def test_applied_never_exceeds_commit():
    node, _ = make_node()
    # pysyncobj can briefly report a commit index below what was applied (after
    # a restart it reloads commit from the journal meta); the status clamps.
    node._obj = FakeSyncObj(term=2, commit=5, applied=9, leader=None)
    st = node.raft_status()
    assert st.applied <= st.commit


def test_member_ids_are_stable_and_distinct():
    from metastore.cluster import cluster_id, member_id

    a, b = ["http://127.0.0.1:2380"], ["http://127.0.0.1:2381"]
    assert member_id(a, "tok") == member_id(["http://127.0.0.1:2380/"], "tok")
    assert member_id(a, "tok") != member_id(a, "other") != member_id(b, "tok")
    assert 0 < member_id(a, "tok") < 2**64
    assert cluster_id("tok") == cluster_id("tok") != cluster_id("other")
