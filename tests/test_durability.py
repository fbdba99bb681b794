"""Restarts, snapshots and a lagging follower, on real processes."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from metastore.api.pb import rpc_pb2
from metastore.testing import LocalCluster, wait_for
from store_engines import ENGINES

pytestmark = pytest.mark.usefixtures("etcdctl_installed")


def put_many(member, prefix: str, count: int, value: bytes = b"v" * 64) -> int:
    kv = member.kv()
    last = 0
    for i in range(count):
        last = kv.Put(rpc_pb2.PutRequest(key=f"{prefix}{i:06d}".encode(), value=value), timeout=10).header.revision
    return last


def put_many_concurrently(member, prefix: str, count: int, clients: int = 16) -> int:
    """`count` puts from `clients` threads; returns the highest revision."""
    per = count // clients
    assert per * clients == count
    with ThreadPoolExecutor(clients) as pool:
        revs = pool.map(lambda c: put_many(member, f"{prefix}{c:02d}-", per), range(clients))
        return max(revs)


def hashkv_at(cluster: LocalCluster, revision: int) -> dict[str, int]:
    out = cluster.etcdctl("endpoint", "hashkv", "--rev", str(revision), "-w", "json").stdout
    return {item["Endpoint"]: item["HashKV"]["hash"] for item in json.loads(out)}


@pytest.mark.parametrize("engine", ENGINES)
def test_lagging_follower_catches_up_through_a_snapshot(engine):
    with LocalCluster(3, engine=engine, extra_args=["--snapshot-count", "2000"]) as cluster:
        follower = cluster.followers()[0]
        cluster.kill(follower)
        leader = cluster.leader()
        rev = put_many_concurrently(leader, "lag/", 10_000)
        # The leader has compacted its log past what the follower holds.
        wait_for(lambda: "snapshot at raft index" in leader.log(), 10, "the leader to take a snapshot")

        cluster.restart(follower)
        wait_for(lambda: follower.kv().Range(rpc_pb2.RangeRequest(key=b"lag/", range_end=b"lag0",
                                                                  count_only=True, serializable=True),
                                             timeout=2).count == 10_000,
                 60, "the restarted follower to catch up")
        assert "snapshot at raft index" in follower.log() and "loaded" in follower.log()
        hashes = hashkv_at(cluster, rev)
        assert len(hashes) == 3 and len(set(hashes.values())) == 1, hashes


@pytest.mark.parametrize("engine", ENGINES)
def test_whole_cluster_restart_keeps_data_and_revision(engine):
    """Every member killed at once. RocksDB runs without its WAL, so what its
    memtables held is gone and must come back from the Raft journal."""
    with LocalCluster(3, engine=engine, extra_args=["--snapshot-count", "200"]) as cluster:
        rev = put_many(cluster.leader(), "restart/", 700)
        for m in cluster.members:
            cluster.kill(m)
        for m in cluster.members:
            cluster.restart(m, wait=False)
        cluster.wait_ready(60)
        for m in cluster.members:
            resp = m.kv().Range(rpc_pb2.RangeRequest(key=b"restart/", range_end=b"restart0"), timeout=10)
            assert resp.count == 700
            assert resp.header.revision >= rev
            assert resp.kvs[-1].mod_revision == rev
        # and it serves writes again, continuing the revision sequence
        nxt = cluster.leader().kv().Put(rpc_pb2.PutRequest(key=b"after", value=b"1"), timeout=10)
        assert nxt.header.revision > rev
