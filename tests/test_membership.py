"""Membership changes with etcdctl 3.4 on real processes: a member added and
started with --initial-cluster-state existing catches up with all data; a
removed member stops serving and says why."""
from __future__ import annotations

import signal

import grpc
import pytest

from metastore.api.pb import rpc_pb2
from metastore.testing import LocalCluster, wait_for
from store_engines import ENGINES

pytestmark = pytest.mark.usefixtures("etcdctl_installed")


def count(member, prefix: bytes, serializable: bool = True) -> int:
    end = prefix[:-1] + bytes([prefix[-1] + 1])
    return member.kv().Range(rpc_pb2.RangeRequest(key=prefix, range_end=end, count_only=True,
                                                  serializable=serializable), timeout=5).count


def member_names(cluster: LocalCluster) -> list[str]:
    out = cluster.etcdctl("member", "list").stdout.splitlines()
    return sorted(line.split(", ")[2] for line in out)


@pytest.mark.parametrize("engine", ENGINES)
def test_add_a_member_that_joins_then_remove_it(engine):
    with LocalCluster(3, engine=engine) as cluster:
        for i in range(200):
            cluster.leader().kv().Put(rpc_pb2.PutRequest(key=b"data/%03d" % i, value=b"v%d" % i), timeout=5)
        new = cluster.add_member("m4", start=False)
        proc = cluster.etcdctl("member", "add", "m4", f"--peer-urls={new.peer_url}")
        lines = proc.stdout.splitlines()
        assert lines[0].startswith("Member ") and " added to cluster " in lines[0]
        new_id = lines[0].split()[1]
        initial = next(line for line in lines if line.startswith("ETCD_INITIAL_CLUSTER="))
        assert f"m4={new.peer_url}" in initial and all(f"{m.name}={m.peer_url}" in initial for m in cluster.members[:3])
        assert 'ETCD_INITIAL_CLUSTER_STATE="existing"' in lines
        # etcd lists an added member that has not started yet as "unstarted".
        assert f"{new_id}, unstarted, , {new.peer_url}, , false" in cluster.etcdctl("member", "list").stdout

        cluster.start_member(new)
        wait_for(lambda: count(new, b"data/") == 200, 30, "the new member to catch up with all data")
        wait_for(lambda: member_names(cluster) == ["m1", "m2", "m3", "m4"], 15, "m4 to publish its name")
        leader = cluster.leader()
        statuses = [m.status() for m in cluster.members]
        assert {s.leader for s in statuses} == {leader.status().header.member_id}
        # A write through the new member reaches everyone.
        new.kv().Put(rpc_pb2.PutRequest(key=b"data/from-m4", value=b"x"), timeout=5)
        for m in cluster.members:
            wait_for(lambda: count(m, b"data/") == 201, 10, f"{m.name} to see the write made through m4")
        # A founding member restarted still knows m4 (the table is rebuilt
        # from snapshot + log, also by an engine that skips applied writes).
        first = cluster.members[0]
        cluster.kill(first, signal.SIGTERM)
        cluster.restart(first)
        resp = first.cluster().MemberList(rpc_pb2.MemberListRequest(), timeout=5)
        assert sorted(m.name for m in resp.members) == ["m1", "m2", "m3", "m4"]
        # As etcd's: membership answers carry no key-space revision.
        assert resp.header.member_id and resp.header.revision == 0

        # Removal (through any member: followers pass it to the leader).
        proc = cluster.etcdctl("member", "remove", new_id, endpoints=cluster.members[:3])
        # etcdctl pads the hex id to 16 columns ("%16x").
        assert proc.stdout.startswith(f"Member {int(new_id, 16):16x} removed from cluster ")
        try:
            wait_for(lambda: new.proc.poll() is not None, 30, "the removed member to stop")
        except TimeoutError:
            raise AssertionError(f"the removed member kept running; its log:\n{new.log()[-4000:]}") from None
        new.stopped = True
        assert "removed from the cluster" in new.log()
        assert member_names(cluster) == ["m1", "m2", "m3"]
        cluster.leader().kv().Put(rpc_pb2.PutRequest(key=b"after", value=b"removal"), timeout=5)


def test_membership_errors():
    with LocalCluster(3) as cluster:
        taken = cluster.members[1].peer_url
        proc = cluster.etcdctl("member", "add", "dup", f"--peer-urls={taken}", check=False)
        assert proc.returncode != 0 and "etcdserver: Peer URLs already exists" in proc.stderr
        proc = cluster.etcdctl("member", "remove", "abcdef", check=False)
        assert proc.returncode != 0 and "etcdserver: member not found" in proc.stderr
        # etcd's answer (Go clients match its text) for URLs it cannot parse.
        for urls in (["not a url"], ["http://127.0.0.1"], []):
            with pytest.raises(grpc.RpcError) as info:
                cluster.followers()[0].cluster().MemberAdd(rpc_pb2.MemberAddRequest(peerURLs=urls), timeout=5)
            assert (info.value.code(), info.value.details()) == \
                (grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: given member URLs are invalid")
        # An https peer URL is valid to etcd: the answer says what metastore lacks.
        proc = cluster.etcdctl("member", "add", "tls", "--peer-urls=https://127.0.0.1:2", check=False)
        assert proc.returncode != 0 and "TLS (https) is not supported yet" in proc.stderr
        # Without a peer secret the (pickle) peer transport stays on loopback.
        proc = cluster.etcdctl("member", "add", "far", "--peer-urls=http://10.1.2.3:2380", check=False)
        assert proc.returncode != 0 and "beyond loopback" in proc.stderr
        assert len(cluster.etcdctl("member", "list").stdout.splitlines()) == 3
