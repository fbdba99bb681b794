"""etcd's Maintenance service on real clusters: alarms and the space quota
(NOSPACE), Defragment, Hash (and HashKV), driven by etcdctl 3.4 and gRPC."""
from __future__ import annotations

import json
import os
import re

import grpc
import pytest

from metastore.api.pb import rpc_pb2
from metastore.testing import LocalCluster, wait_for
from store_engines import ENGINES

pytestmark = pytest.mark.usefixtures("etcdctl_installed")

NO_SPACE = "etcdserver: mvcc: database space exceeded"
# Small enough to fill in a few dozen puts; values are random bytes so that
# RocksDB's compression cannot shrink them under the quota.
QUOTA = 400_000
VALUE_SIZE = 16_000


def member_ids(cluster: LocalCluster) -> dict[int, object]:
    return {m.status().header.member_id: m for m in cluster.members}


def wait_published(cluster: LocalCluster) -> None:
    """`--cluster` commands reach the members through `member list`, which
    shows a member's client URL once it has published it through Raft."""

    def published() -> bool:
        members = json.loads(cluster.etcdctl("member", "list", "-w", "json").stdout)["members"]
        return len(members) == len(cluster.members) and all(m.get("clientURLs") for m in members)

    wait_for(published, 15, "every member to publish its client URL")


def alarms_on(m) -> list[tuple[int, int]]:
    resp = m.maintenance().Alarm(rpc_pb2.AlarmRequest(action=rpc_pb2.AlarmRequest.GET), timeout=5)
    return sorted((a.memberID, a.alarm) for a in resp.alarms)


def db_size(m) -> int:
    return m.status().dbSize


def wait_applied_alike(cluster: LocalCluster) -> None:
    """Until every member has applied the same Raft index (no writes meanwhile)."""

    def alike() -> bool:
        statuses = [m.status() for m in cluster.members]
        return len({(s.raftAppliedIndex, s.header.revision) for s in statuses}) == 1

    wait_for(alike, 10, "every member to apply the same entries")


# -- NOSPACE ------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
def test_nospace_alarm_blocks_writes_until_space_is_freed_and_disarmed(engine):
    with LocalCluster(3, engine=engine, extra_args=["--quota-backend-bytes", str(QUOTA)]) as cluster:
        assert cluster.etcdctl("alarm", "list").stdout == ""
        assert all(not s.errors for s in cluster.statuses().values())
        ids = member_ids(cluster)
        writer = cluster.members[0]

        # Overwrite a few keys until the quota refuses a put: history grows,
        # the key set stays small (compaction can free almost everything).
        refused = None
        for i in range(200):
            try:
                writer.kv().Put(rpc_pb2.PutRequest(key=b"fill/%d" % (i % 4), value=os.urandom(VALUE_SIZE)),
                                timeout=5)
            except grpc.RpcError as err:
                refused = err
                break
        assert refused is not None, "the quota never refused a put"
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.details() == NO_SPACE
        assert db_size(writer) + 256 + VALUE_SIZE >= QUOTA

        # The alarm is replicated: every member lists it, naming the member
        # that detected the shortage.
        raised = wait_for(lambda: all(alarms_on(m) for m in cluster.members) and alarms_on(writer), 10,
                          "the NOSPACE alarm on every member")
        assert raised == [(writer.status().header.member_id, rpc_pb2.NOSPACE)]
        listed = cluster.etcdctl("alarm", "list").stdout
        match = re.fullmatch(r"memberID:(\d+) alarm:NOSPACE \n", listed)
        assert match and int(match.group(1)) in ids, listed
        assert all(s.errors == [f"memberID:{match.group(1)} alarm:NOSPACE "]
                   for s in cluster.statuses().values())

        # Writes are refused on every member, even small ones; so are txns
        # that put and lease grants (etcd's capped applier).
        for m in cluster.members:
            put = cluster.etcdctl("put", "small", "x", endpoints=[m], check=False)
            assert put.returncode != 0 and NO_SPACE in put.stderr, put
        txn = cluster.etcdctl("txn", input="\nput small x\n\n\n", check=False)
        assert txn.returncode != 0 and NO_SPACE in txn.stderr, txn
        grant = cluster.etcdctl("lease", "grant", "60", check=False)
        assert grant.returncode != 0 and NO_SPACE in grant.stderr, grant

        # Reads, deletes and compaction still work.
        got = writer.kv().Range(rpc_pb2.RangeRequest(key=b"fill/", range_end=b"fill0"), timeout=5)
        assert got.count == 4
        assert cluster.etcdctl("del", "fill/3").stdout == "1\n"
        revision = writer.status().header.revision
        # --physical: the history is dropped in the background, as in etcd.
        cluster.etcdctl("compaction", "--physical", str(revision), endpoints=[writer])
        size_compacted = db_size(writer)

        # Still armed after the space is back: disarming is the operator's call.
        put = cluster.etcdctl("put", "small", "x", check=False)
        assert put.returncode != 0 and NO_SPACE in put.stderr

        wait_published(cluster)
        out = cluster.etcdctl("defrag", "--cluster").stdout
        assert sorted(out.splitlines()) == sorted(
            f"Finished defragmenting etcd member[{m.client_url}]" for m in cluster.members)
        size_defragged = db_size(writer)
        assert size_defragged <= size_compacted
        assert size_defragged < QUOTA // 2, f"{size_defragged} bytes after compaction + defrag"

        disarmed = cluster.etcdctl("alarm", "disarm").stdout
        assert disarmed == listed
        wait_for(lambda: not any(alarms_on(m) for m in cluster.members), 10, "the alarm cleared everywhere")
        assert cluster.etcdctl("alarm", "list").stdout == ""
        for m in cluster.members:
            assert cluster.etcdctl("put", "after", m.name, endpoints=[m]).stdout == "OK\n"
        assert cluster.etcdctl("lease", "grant", "60").returncode == 0
        assert all(not s.errors for s in cluster.statuses().values())


def test_disarm_while_still_over_quota_rearms_on_the_next_write():
    with LocalCluster(1, extra_args=["--quota-backend-bytes", str(QUOTA)]) as cluster:
        m = cluster.members[0]
        with pytest.raises(grpc.RpcError) as info:
            for i in range(200):
                m.kv().Put(rpc_pb2.PutRequest(key=b"k%d" % i, value=os.urandom(VALUE_SIZE)), timeout=5)
        assert info.value.details() == NO_SPACE
        assert cluster.etcdctl("alarm", "list").stdout
        cluster.etcdctl("alarm", "disarm")
        assert cluster.etcdctl("alarm", "list").stdout == ""
        # Nothing was freed: the next write is refused and raises it again.
        put = cluster.etcdctl("put", "k0", "x" * VALUE_SIZE, check=False)
        assert put.returncode != 0 and NO_SPACE in put.stderr
        assert re.fullmatch(r"memberID:\d+ alarm:NOSPACE \n", cluster.etcdctl("alarm", "list").stdout)


# -- alarms, hash, defragment on a shared cluster ---------------------------------------
@pytest.fixture(scope="module", params=ENGINES)
def cluster(request):
    with LocalCluster(3, engine=request.param) as c:
        yield c


def test_alarm_activate_and_deactivate_any_type(cluster):
    m1, m2 = cluster.members[0], cluster.members[1]
    id2 = m2.status().header.member_id
    stub = m1.maintenance()
    req = rpc_pb2.AlarmRequest
    resp = stub.Alarm(req(action=req.ACTIVATE, memberID=id2, alarm=rpc_pb2.CORRUPT), timeout=5)
    assert [(a.memberID, a.alarm) for a in resp.alarms] == [(id2, rpc_pb2.CORRUPT)]
    assert not resp.HasField("header")  # etcd 3.4 answers alarms without one
    wait_for(lambda: all(alarms_on(m) == [(id2, rpc_pb2.CORRUPT)] for m in cluster.members), 10,
             "the CORRUPT alarm on every member")
    assert cluster.etcdctl("alarm", "list").stdout == f"memberID:{id2} alarm:CORRUPT \n"
    # Filtered GET, and a deactivation of an alarm that is not active: a no-op.
    none = stub.Alarm(req(action=req.GET, alarm=rpc_pb2.NOSPACE), timeout=5)
    assert list(none.alarms) == []
    assert not none.HasField("header")
    noop = stub.Alarm(req(action=req.DEACTIVATE, memberID=id2, alarm=rpc_pb2.NOSPACE), timeout=5)
    assert list(noop.alarms) == []
    assert alarms_on(m2) == [(id2, rpc_pb2.CORRUPT)]
    gone = stub.Alarm(req(action=req.DEACTIVATE, memberID=id2, alarm=rpc_pb2.CORRUPT), timeout=5)
    assert [(a.memberID, a.alarm) for a in gone.alarms] == [(id2, rpc_pb2.CORRUPT)]
    wait_for(lambda: not any(alarms_on(m) for m in cluster.members), 10, "the alarm cleared everywhere")
    assert cluster.etcdctl("alarm", "list").stdout == ""


def test_hash_and_hashkv_agree_on_every_member(cluster):
    for i in range(20):
        cluster.etcdctl("put", f"hash/{i % 7}", f"value-{i}")
    cluster.etcdctl("del", "hash/3")
    lease = cluster.etcdctl("lease", "grant", "600").stdout.split()[1]
    cluster.etcdctl("put", "hash/leased", "v", "--lease", lease)
    cluster.etcdctl("compaction", str(cluster.members[0].status().header.revision - 5))
    wait_applied_alike(cluster)

    hashes = {m.name: m.maintenance().Hash(rpc_pb2.HashRequest(), timeout=5) for m in cluster.members}
    assert len({h.hash for h in hashes.values()}) == 1, hashes
    assert {h.header.revision for h in hashes.values()} == {cluster.members[0].status().header.revision}
    assert all(h.hash != 0 for h in hashes.values())

    wait_published(cluster)
    lines = cluster.etcdctl("endpoint", "hashkv", "--cluster").stdout.splitlines()
    assert len(lines) == 3 and len({line.split(", ")[1] for line in lines}) == 1, lines

    # The hash covers the data: one more write changes it, on every member alike.
    before = hashes[cluster.members[0].name].hash
    cluster.etcdctl("put", "hash/0", "changed")
    wait_applied_alike(cluster)
    after = {m.maintenance().Hash(rpc_pb2.HashRequest(), timeout=5).hash for m in cluster.members}
    assert len(after) == 1 and after != {before}


def test_defragment_every_member(cluster):
    for i in range(50):
        cluster.members[0].kv().Put(rpc_pb2.PutRequest(key=b"defrag/k", value=os.urandom(4000)), timeout=5)
    before = db_size(cluster.members[0])
    cluster.etcdctl("compaction", str(cluster.members[0].status().header.revision))
    wait_published(cluster)
    out = cluster.etcdctl("defrag", "--cluster").stdout
    assert sorted(out.splitlines()) == sorted(
        f"Finished defragmenting etcd member[{m.client_url}]" for m in cluster.members)
    one = cluster.etcdctl("defrag", endpoints=[cluster.members[1]]).stdout
    assert one == f"Finished defragmenting etcd member[{cluster.members[1].endpoint}]\n"
    after = db_size(cluster.members[0])
    assert after < before - 40 * 4000, f"db size {before} -> {after} after compaction + defrag"
    assert cluster.etcdctl("get", "defrag/k", "--keys-only").stdout == "defrag/k\n\n"


# -- units: etcd's quota arithmetic and the alarm rows --------------------------------
def test_quota_flag_and_request_costs():
    from metastore.api.pb import raft_entry_pb2
    from metastore.maintenance import DEFAULT_QUOTA_BYTES, quota_bytes, request_cost

    assert quota_bytes(0) == DEFAULT_QUOTA_BYTES == 2 * 1024 ** 3
    assert quota_bytes(-1) is None
    assert quota_bytes(12345) == 12345
    P = raft_entry_pb2.Proposal
    assert request_cost(P(put=rpc_pb2.PutRequest(key=b"k", value=b"vv"))) == 256 + 3
    assert request_cost(P(lease_grant=rpc_pb2.LeaseGrantRequest(ID=1, TTL=60))) == 64
    put = rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=b"k", value=b"v"))
    get = rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=b"k"))
    assert request_cost(P(txn=rpc_pb2.TxnRequest(success=[get], failure=[get]))) == 0
    assert request_cost(P(txn=rpc_pb2.TxnRequest(success=[get], failure=[put, put]))) == 2 * 258
    nested = rpc_pb2.RequestOp(request_txn=rpc_pb2.TxnRequest(success=[put]))
    assert request_cost(P(txn=rpc_pb2.TxnRequest(success=[nested]))) == 258
    for other in (P(delete_range=rpc_pb2.DeleteRangeRequest(key=b"k")),
                  P(compaction=rpc_pb2.CompactionRequest(revision=1)),
                  P(lease_revoke=rpc_pb2.LeaseRevokeRequest(ID=1))):
        assert request_cost(other) is None


@pytest.mark.parametrize("engine", ENGINES)
def test_alarms_are_store_rows_that_survive_a_restart_and_a_snapshot(engine, tmp_path):
    from metastore import alarms
    from metastore.engines.memory import open_store as open_memory
    from store_engines import FACTORIES

    factory = FACTORIES[engine]
    store = factory.open(tmp_path)
    req = rpc_pb2.AlarmRequest
    store.set_apply_position(5, 0)
    assert list(alarms.apply(store, req(action=req.ACTIVATE, memberID=7, alarm=rpc_pb2.NOSPACE)).alarms)
    assert store.applied_position == (5, 0), "an alarm is an applied request like any other"
    store.set_apply_position(6, 0)
    alarms.apply(store, req(action=req.ACTIVATE, memberID=9, alarm=rpc_pb2.CORRUPT))
    assert alarms.active(store) == [(7, rpc_pb2.NOSPACE), (9, rpc_pb2.CORRUPT)]
    assert alarms.active(store, rpc_pb2.CORRUPT) == [(9, rpc_pb2.CORRUPT)]
    store = factory.reopen(store, tmp_path)
    assert alarms.active(store) == [(7, rpc_pb2.NOSPACE), (9, rpc_pb2.CORRUPT)]
    copy = open_memory()
    copy.import_items(iter(list(store.export_items())))
    assert alarms.is_active(copy, rpc_pb2.NOSPACE)
    ignore = frozenset({("meta", b"applied")})
    assert copy.hash_backend(ignore)[0] == store.hash_backend(ignore)[0]
    store.set_apply_position(7, 0)
    alarms.apply(store, req(action=req.DEACTIVATE, memberID=7, alarm=rpc_pb2.NOSPACE))
    assert alarms.active(store) == [(9, rpc_pb2.CORRUPT)]
    assert copy.hash_backend(ignore)[0] != store.hash_backend(ignore)[0]
    store.close()
