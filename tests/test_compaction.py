"""Compaction through etcdctl on a real 3-member cluster, both engines:
etcd's output, reads below the compacted revision refused with etcd's error
on every member, and history storage given back."""
from __future__ import annotations

import json

import grpc
import pytest

from metastore.api.pb import rpc_pb2
from metastore.testing import LocalCluster, wait_for
from store_engines import ENGINES

pytestmark = pytest.mark.usefixtures("etcdctl_installed")

COMPACTED = "etcdserver: mvcc: required revision has been compacted"


@pytest.mark.parametrize("engine", ENGINES)
def test_compaction_with_etcdctl(engine):
    with LocalCluster(3, engine=engine) as cluster:
        leader = cluster.leader()
        value = b"x" * 1024
        for i in range(400):
            rev = leader.kv().Put(rpc_pb2.PutRequest(key=b"churn/%d" % (i % 10), value=value), timeout=5).header.revision
        old = rev - 200
        in_use_before = leader.status().dbSizeInUse
        assert cluster.etcdctl("compaction", "--physical", str(old)).stdout == f"compacted revision {old}\n"
        for m in cluster.members:
            wait_for(lambda: m.status().header.revision >= rev, 10, "every member to apply the compaction")
            proc = cluster.etcdctl("get", "churn/1", "--rev", str(old - 1), endpoints=[m], check=False)
            assert proc.returncode == 1 and f"Error: {COMPACTED}" in proc.stderr
            # At the compacted revision itself history is still readable.
            got = cluster.etcdctl("get", "churn/1", "--rev", str(old), "-w", "json", endpoints=[m]).stdout
            assert json.loads(got)["kvs"][0]["mod_revision"] <= old
        with pytest.raises(grpc.RpcError) as info:
            leader.kv().Compact(rpc_pb2.CompactionRequest(revision=old), timeout=5)
        assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE and info.value.details() == COMPACTED
        proc = cluster.etcdctl("compaction", str(rev + 100), check=False)
        assert proc.returncode == 1 and "etcdserver: mvcc: required revision is a future revision" in proc.stderr
        # The history below the compacted revision stops counting as in use.
        wait_for(lambda: leader.status().dbSizeInUse < in_use_before, 10,
                 f"dbSizeInUse to drop below {in_use_before}")
        hashes = json.loads(cluster.etcdctl("endpoint", "hashkv", "-w", "json").stdout)
        assert len({h["HashKV"]["hash"] for h in hashes}) == 1
        assert cluster.etcdctl("put", "after", "compaction").stdout == "OK\n"
