"""Killing the leader: a new one is elected and writes continue."""
from __future__ import annotations

import json

import pytest

from metastore.api.pb import rpc_pb2
from metastore.testing import wait_for

pytestmark = pytest.mark.usefixtures("etcdctl_installed")


def test_leader_kill_elects_new_leader_and_writes_continue(metastore_cluster):
    cluster = metastore_cluster(3)
    old = cluster.leader()
    old_term = old.status().raftTerm
    for i in range(20):
        cluster.etcdctl("put", f"before/{i}", str(i))
    cluster.kill(old)

    new = cluster.wait_ready(timeout=30)
    assert new is not old
    assert new.status().raftTerm > old_term
    survivors = cluster.running_members
    statuses = json.loads(cluster.etcdctl("endpoint", "status", "-w", "json").stdout)
    assert {s["Status"]["leader"] for s in statuses} == {new.status().header.member_id}

    for i in range(20):
        cluster.etcdctl("put", f"after/{i}", str(i), endpoints=survivors)
    for m in survivors:
        out = cluster.etcdctl("get", "--prefix", "before/", "--keys-only", endpoints=[m]).stdout
        assert len(out.split()) == 20, "writes acknowledged before the kill survive on every member"
        out = cluster.etcdctl("get", "--prefix", "after/", "-w", "json", endpoints=[m]).stdout
        assert json.loads(out)["count"] == 20

    # The killed member comes back, catches up and follows the new leader.
    cluster.restart(old)
    def caught_up():
        resp = old.kv().Range(rpc_pb2.RangeRequest(key=b"after/", range_end=b"after0", count_only=True,
                                                   serializable=True), timeout=2)
        return resp.count == 20
    wait_for(caught_up, 30, "the restarted member to catch up")
    assert old.status().leader == new.status().header.member_id
