"""`etcdctl snapshot save` against metastore, and `metastore snapshot restore`
into a new cluster on either engine: same keys, same revisions, new cluster.
The file is an etcd database: etcd's tools read and restore it, and
metastore restores what etcd saved (both with the real etcd 3.4)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import grpc
import pytest

from metastore import bbolt
from metastore.api.pb import rpc_pb2, rpc_pb2_grpc
from metastore.testing import LocalCluster, wait_for
from metastore.testing_etcd import EtcdCluster
from store_engines import ENGINES

pytestmark = pytest.mark.usefixtures("etcdctl_installed")

ALL = rpc_pb2.RangeRequest(key=b"\0", range_end=b"\0")


def kv_tuples(resp: rpc_pb2.RangeResponse) -> list[tuple]:
    return [(kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease) for kv in resp.kvs]


def restore(snapshot: str, member, cluster: LocalCluster, engine: str, check: bool = True,
            data_dir: str | None = None) -> subprocess.CompletedProcess:
    """Run `metastore snapshot restore` for a member of `cluster` (not started yet)."""
    initial = ",".join(f"{m.name}={m.peer_url}" for m in cluster.members)
    proc = subprocess.run(
        [sys.executable, "-m", "metastore", "snapshot", "restore", snapshot,
         "--data-dir", data_dir or member.data_dir, "--name", member.name,
         "--initial-cluster", initial, "--initial-cluster-token", cluster.token,
         "--initial-advertise-peer-urls", member.peer_url, "--engine", engine],
        capture_output=True, text=True, timeout=60, cwd=cluster.base_dir)  # never the source tree
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def assert_same_history(kv, saved: dict, compacted_key: bytes) -> rpc_pb2.RangeResponse:
    """What `kv` (a KV stub on the restored member) serves is what was read
    from the source when it was saved: every key at the current revision,
    the history above the compaction, etcd's error below it."""
    resp = kv.Range(ALL, timeout=5)
    assert kv_tuples(resp) == kv_tuples(saved["current"])
    assert resp.header.revision == saved["current"].header.revision
    old = kv.Range(rpc_pb2.RangeRequest(key=b"\0", range_end=b"\0", revision=saved["old_revision"]), timeout=5)
    assert kv_tuples(old) == kv_tuples(saved["old"])
    with pytest.raises(grpc.RpcError) as info:
        kv.Range(rpc_pb2.RangeRequest(key=compacted_key, revision=saved["compacted"] - 1), timeout=5)
    assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
    return resp


@pytest.fixture(scope="module", params=ENGINES)
def saved(request, tmp_path_factory):
    """A snapshot saved with etcdctl from one member of a 3-member cluster of
    each engine, with what a client could read at that point."""
    engine = request.param
    with LocalCluster(3, engine=engine) as source:
        for i in range(30):
            source.etcdctl("put", f"key/{i % 10}", f"value-{i}")
        source.members[0].kv().Put(rpc_pb2.PutRequest(key=b"bin\x00ary", value=bytes(range(256))), timeout=5)
        source.etcdctl("del", "key/9")
        lease = source.etcdctl("lease", "grant", "600").stdout.split()[1]
        source.etcdctl("put", "leased", "v", "--lease", lease)
        old_revision = source.members[0].status().header.revision
        source.etcdctl("put", "key/0", "latest")
        compacted = old_revision - 10
        source.etcdctl("compaction", str(compacted))
        member = source.members[1]
        wait_for(lambda: len({m.status().raftAppliedIndex for m in source.members}) == 1, 10,
                 "every member to apply everything")
        path = str(tmp_path_factory.mktemp(f"snap-{engine}") / "saved.db")
        out = source.etcdctl("snapshot", "save", path, endpoints=[member])
        assert out.stdout == f"Snapshot saved at {path}\n"
        current = member.kv().Range(ALL, timeout=5)
        old = member.kv().Range(rpc_pb2.RangeRequest(key=b"\0", range_end=b"\0", revision=old_revision), timeout=5)
        yield {
            "path": path, "engine": engine, "current": current, "old": old, "old_revision": old_revision,
            "compacted": compacted, "lease": int(lease, 16),
            "cluster_id": member.status().header.cluster_id,
        }


def test_saved_file_has_etcds_shape(saved):
    size = os.path.getsize(saved["path"])
    assert size % 512 == 32, "etcdctl requires a multiple of 512 plus a sha256"
    assert bbolt.is_bbolt(saved["path"])


@pytest.mark.parametrize("engine", ENGINES)
def test_restore_into_a_new_cluster(saved, engine, tmp_path):
    restored = LocalCluster(1, engine=engine, base_dir=str(tmp_path), token="restored-cluster")
    m = restored.members[0]
    out = restore(saved["path"], m, restored, engine).stdout
    assert f"revision {saved['current'].header.revision}" in out
    with restored:
        resp = assert_same_history(m.kv(), saved, b"key/0")
        assert resp.header.cluster_id != saved["cluster_id"], "a restored cluster is a new cluster"
        # The lease exists, and writes continue the revision sequence.
        leases = restored.etcdctl("lease", "list").stdout
        assert f"{saved['lease']:x}" in leases
        put = m.kv().Put(rpc_pb2.PutRequest(key=b"after-restore", value=b"1"), timeout=5)
        assert put.header.revision == saved["current"].header.revision + 1
        if engine == "memory":
            # The memory member's data came from the restored Raft snapshot;
            # after a restart it is rebuilt from that snapshot plus the log.
            restored.kill(m, 15)
            restored.restart(m)
            again = m.kv().Range(ALL, timeout=5)
            assert len(again.kvs) == len(saved["current"].kvs) + 1
            assert again.header.revision == put.header.revision


def test_restore_three_members_agree(saved, tmp_path):
    restored = LocalCluster(3, engine=saved["engine"], base_dir=str(tmp_path), token="three-restored")
    for m in restored.members:
        restore(saved["path"], m, restored, saved["engine"])
    with restored:
        restored.etcdctl("put", "new", "v")
        wait_for(lambda: len({(s.raftAppliedIndex, s.header.revision)
                              for s in restored.statuses().values()}) == 1, 10, "members to converge")
        for m in restored.members:
            assert len(m.kv().Range(ALL, timeout=5).kvs) == len(saved["current"].kvs) + 1
        # The members go on writing their own sessions and attributes after
        # the start; their states must meet (Hash covers every row).
        wait_for(lambda: len({m.maintenance().Hash(rpc_pb2.HashRequest(), timeout=5).hash
                              for m in restored.members}) == 1, 15, "the members' hashes to agree")


def test_damaged_or_foreign_files_are_refused(saved, tmp_path):
    restored = LocalCluster(1, base_dir=str(tmp_path), token="never")
    m = restored.members[0]
    damaged = tmp_path / "damaged.db"
    data = bytearray(open(saved["path"], "rb").read())
    data[len(data) // 2] ^= 0x01
    damaged.write_bytes(bytes(data))
    proc = restore(str(damaged), m, restored, "memory", check=False)
    assert proc.returncode != 0
    assert "sha256 checksum mismatch" in proc.stderr and "damaged" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(m.data_dir)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(os.path.basename(m.data_dir))]

    foreign = tmp_path / "foreign.db"
    foreign.write_bytes(b"\0" * 4096)
    proc = restore(str(foreign), m, restored, "rocksdb", check=False)
    assert proc.returncode != 0 and "not a snapshot" in proc.stderr, proc.stderr
    assert not os.path.exists(m.data_dir)

    # A data dir in use is never overwritten.
    os.makedirs(m.data_dir)
    with open(os.path.join(m.data_dir, "keep"), "w") as f:
        f.write("x")
    proc = restore(saved["path"], m, restored, "memory", check=False)
    assert proc.returncode != 0 and "not empty" in proc.stderr, proc.stderr
    assert os.listdir(m.data_dir) == ["keep"]


def etcdctl_offline(*args: str) -> subprocess.CompletedProcess:
    """etcdctl's commands that work on files, not on a cluster."""
    return subprocess.run(["etcdctl", *args], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, ETCDCTL_API="3"))


def test_etcdctl_snapshot_status_reads_it(saved):
    proc = etcdctl_offline("snapshot", "status", saved["path"], "-w", "json")
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert status["revision"] == saved["current"].header.revision
    assert status["totalSize"] == os.path.getsize(saved["path"]) - 32
    assert status["totalKey"] > len(saved["current"].kvs)  # history, leases, meta rows too


def test_etcd_restores_it(saved, etcd_installed, tmp_path):
    """`etcdctl snapshot restore` of a metastore snapshot makes an etcd member
    that holds the same keys at the same revisions, with their history
    above the compaction, the lease, and the revision counting on."""
    with EtcdCluster(1, exe=etcd_installed, base_dir=str(tmp_path)) as etcd:
        m = etcd.members[0]
        etcd.stop()
        shutil.rmtree(m.data_dir)
        proc = etcdctl_offline("snapshot", "restore", saved["path"], "--data-dir", m.data_dir, "--name", m.name,
                               "--initial-cluster", f"{m.name}={m.peer_url}",
                               "--initial-cluster-token", etcd.token, "--initial-advertise-peer-urls", m.peer_url)
        assert proc.returncode == 0, proc.stderr
        etcd.start()
        with grpc.insecure_channel(m.endpoint) as ch:
            kv = rpc_pb2_grpc.KVStub(ch)
            assert_same_history(kv, saved, b"key/0")
            leases = rpc_pb2_grpc.LeaseStub(ch).LeaseTimeToLive(
                rpc_pb2.LeaseTimeToLiveRequest(ID=saved["lease"], keys=True), timeout=5)
            assert leases.keys == [b"leased"] and leases.grantedTTL == 600
            put = kv.Put(rpc_pb2.PutRequest(key=b"after-restore", value=b"1"), timeout=5)
            assert put.header.revision == saved["current"].header.revision + 1


@pytest.fixture(scope="module")
def etcd_saved(etcd_installed, tmp_path_factory):
    """A snapshot etcd 3.4 took (etcdctl snapshot save), its raw database
    file, and what a client read from etcd at that point."""
    base = tmp_path_factory.mktemp("etcd-source")
    with EtcdCluster(1, exe=etcd_installed, base_dir=str(base)) as etcd:
        m = etcd.members[0]
        with grpc.insecure_channel(m.endpoint) as ch:
            kv = rpc_pb2_grpc.KVStub(ch)
            lease = rpc_pb2_grpc.LeaseStub(ch).LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=900), timeout=5).ID
            for i in range(40):
                kv.Put(rpc_pb2.PutRequest(key=b"k/%d" % (i % 6), value=b"v%d" % i), timeout=5)
            kv.Put(rpc_pb2.PutRequest(key=b"big", value=os.urandom(20_000)), timeout=5)  # overflow pages
            kv.Put(rpc_pb2.PutRequest(key=b"leased", value=b"x", lease=lease), timeout=5)
            kv.DeleteRange(rpc_pb2.DeleteRangeRequest(key=b"k/5"), timeout=5)
            old_revision = kv.Put(rpc_pb2.PutRequest(key=b"k/0", value=b"latest"), timeout=5).header.revision
            kv.Compact(rpc_pb2.CompactionRequest(revision=old_revision - 8, physical=True), timeout=5)
            kv.Txn(rpc_pb2.TxnRequest(success=[
                rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=b"t/1", value=b"a")),
                rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=b"k/4"))]), timeout=5)
            current = kv.Range(ALL, timeout=5)
            old = kv.Range(rpc_pb2.RangeRequest(key=b"\0", range_end=b"\0", revision=old_revision), timeout=5)
        path = str(base / "etcd.db")
        proc = etcdctl_offline("--endpoints", m.endpoint, "snapshot", "save", path)
        assert proc.returncode == 0, proc.stderr
    raw = str(base / "raw.db")  # etcd's database file itself: no sha256 after it
    shutil.copyfile(os.path.join(m.data_dir, "member", "snap", "db"), raw)
    return {"path": path, "raw": raw, "current": current, "old": old, "old_revision": old_revision,
            "compacted": old_revision - 8, "lease": lease}


@pytest.mark.parametrize("engine", ENGINES)
def test_restore_a_snapshot_etcd_took(etcd_saved, engine, tmp_path):
    """Moving from etcd: every key, its revisions and history above the
    compaction, and the lease with its key come over."""
    restored = LocalCluster(1, engine=engine, base_dir=str(tmp_path), token="from-etcd")
    m = restored.members[0]
    out = restore(etcd_saved["path"], m, restored, engine).stdout
    assert f"revision {etcd_saved['current'].header.revision}, saved from etcd" in out
    with restored:
        assert_same_history(m.kv(), etcd_saved, b"k/0")
        ttl = restored.etcdctl("lease", "timetolive", f"{etcd_saved['lease']:x}", "--keys").stdout
        assert "granted with TTL(900s)" in ttl and "attached keys([leased])" in ttl, ttl
        put = m.kv().Put(rpc_pb2.PutRequest(key=b"after-restore", value=b"1"), timeout=5)
        assert put.header.revision == etcd_saved["current"].header.revision + 1


def test_etcds_raw_database_needs_skip_hash_check(etcd_saved, tmp_path):
    restored = LocalCluster(1, base_dir=str(tmp_path), token="raw")
    m = restored.members[0]
    proc = restore(etcd_saved["raw"], m, restored, "memory", check=False)
    assert proc.returncode == 1 and "--skip-hash-check" in proc.stderr, proc.stderr
    assert not os.path.exists(m.data_dir)
    initial = f"{m.name}={m.peer_url}"
    proc = subprocess.run(
        [sys.executable, "-m", "metastore", "snapshot", "restore", etcd_saved["raw"], "--skip-hash-check",
         "--data-dir", m.data_dir, "--name", m.name, "--initial-cluster", initial,
         "--initial-cluster-token", restored.token, "--initial-advertise-peer-urls", m.peer_url],
        capture_output=True, text=True, timeout=60, cwd=restored.base_dir)
    assert proc.returncode == 0, proc.stderr
    with restored:
        assert kv_tuples(m.kv().Range(ALL, timeout=5)) == kv_tuples(etcd_saved["current"])


def test_a_database_with_broken_pages_is_refused(saved, tmp_path):
    """A file whose sha256 matches but whose pages do not make a database
    (damaged before it was hashed) is refused, and nothing is written."""
    data = bytearray(open(saved["path"], "rb").read()[:-32])
    page = 4096
    data[2 * page + 8:2 * page + 10] = b"\x40\x00"  # page 2: neither branch nor leaf
    broken = tmp_path / "broken.db"
    broken.write_bytes(bytes(data) + hashlib.sha256(data).digest())
    restored = LocalCluster(1, base_dir=str(tmp_path), token="never")
    m = restored.members[0]
    proc = restore(str(broken), m, restored, "memory", check=False)
    assert proc.returncode == 1 and "neither a branch nor a leaf" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(m.data_dir)
