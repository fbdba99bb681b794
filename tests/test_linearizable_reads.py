"""Linearizable reads on a real 3-member cluster: confirmed by the leader
without a log entry (raft.read_index), never stale, never answered by a leader
that cannot reach a majority."""
from __future__ import annotations

import os
import signal
import time

import grpc
import pytest

from metastore.api.pb import rpc_pb2
from metastore.testing import LocalCluster, wait_for

pytestmark = pytest.mark.usefixtures("etcdctl_installed")


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(3) as c:
        yield c


def get(member, key: bytes, serializable: bool = False, timeout: float = 5.0) -> bytes | None:
    resp = member.kv().Range(rpc_pb2.RangeRequest(key=key, serializable=serializable), timeout=timeout)
    return resp.kvs[0].value if resp.kvs else None


def raft_index(member) -> int:
    return member.status().raftIndex


def test_reads_add_nothing_to_the_raft_log(cluster):
    """300 linearizable reads one after the other, through every member: the
    log grows by at most the cluster's own background entries (sessions,
    attributes), not by one entry per read as a read barrier entry would."""
    cluster.etcdctl("put", "lin/k", "v")
    leader = cluster.leader()
    before = raft_index(leader)
    for i in range(300):
        assert get(cluster.members[i % 3], b"lin/k") == b"v"
    grown = raft_index(leader) - before
    assert grown < 30, f"the Raft log grew by {grown} entries for 300 reads"


def test_a_write_is_read_at_once_through_any_member(cluster):
    members = cluster.members
    for i in range(60):
        writer, reader = members[i % 3], members[(i + 1) % 3]
        value = f"v{i}".encode()
        writer.kv().Put(rpc_pb2.PutRequest(key=b"lin/ryw", value=value), timeout=5)
        assert get(reader, b"lin/ryw") == value, f"read {i} through {reader.name} missed the write"


def test_a_leader_cut_off_from_its_followers_does_not_answer(cluster):
    leader = cluster.leader()
    cluster.etcdctl("put", "lin/cut", "before")
    followers = [m for m in cluster.members if m is not leader]
    for m in followers:
        os.kill(m.proc.pid, signal.SIGSTOP)
    try:
        assert get(leader, b"lin/cut", serializable=True) == b"before", "serializable reads stay local"
        with pytest.raises(grpc.RpcError):
            get(leader, b"lin/cut", timeout=2)
    finally:
        for m in followers:
            os.kill(m.proc.pid, signal.SIGCONT)
    cluster.wait_ready(timeout=30)
    assert get(leader, b"lin/cut") == b"before"


def test_a_deposed_leader_never_serves_a_stale_value(cluster):
    """The leader is frozen, the others elect a new one and overwrite the key;
    the old leader, thawed, still believes it leads. A linearizable read
    through it must see the new value or fail, never the old one."""
    old = cluster.leader()
    cluster.etcdctl("put", "lin/stale", "old")
    others = [m for m in cluster.members if m is not old]
    os.kill(old.proc.pid, signal.SIGSTOP)
    try:
        def new_leader():
            for m in others:
                try:
                    status = m.status(timeout=1)
                except grpc.RpcError:
                    continue
                if status.leader and status.leader == status.header.member_id:
                    return m
            return None
        leader = wait_for(new_leader, 30, "the other two to elect a leader")
        leader.kv().Put(rpc_pb2.PutRequest(key=b"lin/stale", value=b"new"), timeout=5)
    finally:
        os.kill(old.proc.pid, signal.SIGCONT)
    deadline = time.monotonic() + 10
    seen = []
    while time.monotonic() < deadline:
        try:
            value = get(old, b"lin/stale", timeout=2)
        except grpc.RpcError:
            continue
        seen.append(value)
        assert value == b"new", "a linearizable read returned the value overwritten by the new leader"
        if len(seen) >= 5:
            break
    assert seen, "the old leader never answered once it had caught up"
    cluster.wait_ready(timeout=30)
