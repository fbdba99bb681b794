"""Linearizable reads on a real 3-member cluster: confirmed by the leader
without a log entry (raft.read_index), never stale, never answered by a leader
that cannot reach a majority."""
from __future__ import annotations

import os
import signal
import time
import urllib.request

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


def rounds_via(member, via: str) -> float:
    """metastore_read_index_rounds_total{via=...} from the member's /metrics."""
    text = urllib.request.urlopen(member.client_url + "/metrics", timeout=5).read().decode()
    prefix = f'metastore_read_index_rounds_total{{via="{via}"}} '
    return next(float(line[len(prefix):]) for line in text.splitlines() if line.startswith(prefix))


def test_rounds_go_between_the_members_event_loops(cluster):
    """With three voters, every member confirms its reads' rounds with one
    other member's event loop (metastore.read_peers): a follower asks the
    leader, the leader asks a follower for its term. Raft takes a round only
    while the connection is being made."""
    cluster.etcdctl("put", "lin/peers", "v")
    for m in cluster.members:  # the first rounds dial (once the members' client URLs are known)
        start = rounds_via(m, "peers")
        wait_for(lambda: get(m, b"lin/peers") == b"v" and rounds_via(m, "peers") > start, 10,
                 f"a round through the peers on {m.name}")
    before = {m.name: (rounds_via(m, "peers"), rounds_via(m, "raft")) for m in cluster.members}
    for m in cluster.members:
        for _ in range(20):
            assert get(m, b"lin/peers") == b"v"
    for m in cluster.members:
        peers, raft = rounds_via(m, "peers") - before[m.name][0], rounds_via(m, "raft") - before[m.name][1]
        assert peers >= 20 and raft <= 2, f"{m.name}: {peers} rounds between event loops, {raft} through Raft"


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
    # The old leader confirms its reads with a follower's event loop (see
    # above): thawed, that follower's later term must send them to Raft.
    before = rounds_via(old, "peers")
    wait_for(lambda: get(old, b"lin/stale") == b"old" and rounds_via(old, "peers") > before, 10,
             "a round through the peers")
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
