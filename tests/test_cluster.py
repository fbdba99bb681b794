"""A real 3-member cluster, driven by etcdctl 3.4 and raw gRPC."""
from __future__ import annotations

import json

import grpc
import pytest

from metastore.api.pb import rpc_pb2
from metastore.testing import LocalCluster, wait_for
from store_engines import ENGINES

pytestmark = pytest.mark.usefixtures("etcdctl_installed")


@pytest.fixture(scope="module", params=ENGINES)
def cluster(request):
    with LocalCluster(3, engine=request.param) as c:
        yield c


def endpoint_status(cluster: LocalCluster) -> list[dict]:
    out = cluster.etcdctl("endpoint", "status", "-w", "json").stdout
    return json.loads(out)


def test_endpoint_status_agrees_on_one_leader_and_term(cluster):
    statuses = endpoint_status(cluster)
    assert sorted(s["Endpoint"] for s in statuses) == sorted(m.endpoint for m in cluster.members)
    leaders = {s["Status"]["leader"] for s in statuses}
    terms = {s["Status"]["raftTerm"] for s in statuses}
    assert len(leaders) == 1 and len(terms) == 1
    leader_id = leaders.pop()
    member_ids = {s["Status"]["header"]["member_id"] for s in statuses}
    assert leader_id in member_ids, "the leader is one of the members"
    assert len(member_ids) == 3
    assert len({s["Status"]["header"]["cluster_id"] for s in statuses}) == 1
    for s in statuses:
        assert s["Status"]["raftAppliedIndex"] <= s["Status"]["raftIndex"]
        assert s["Status"]["version"]
    table = cluster.etcdctl("endpoint", "status", "-w", "table").stdout
    assert table.count("true") == 1, f"exactly one IS LEADER=true row:\n{table}"


def test_raft_indexes_advance_with_writes(cluster):
    before = {s["Endpoint"]: s["Status"] for s in endpoint_status(cluster)}
    for i in range(5):
        cluster.etcdctl("put", f"advance/{i}", "x")

    def advanced():
        after = {s["Endpoint"]: s["Status"] for s in endpoint_status(cluster)}
        return all(after[ep]["raftIndex"] >= before[ep]["raftIndex"] + 5
                   and after[ep]["raftAppliedIndex"] >= before[ep]["raftAppliedIndex"] + 5
                   and after[ep]["raftAppliedIndex"] <= after[ep]["raftIndex"]
                   for ep in before) and after

    after = wait_for(advanced, 10, "raft indexes to advance on every member")
    revisions = {st["header"]["revision"] for st in after.values()}
    assert len(revisions) == 1, "every member applied the same writes"


def test_get_raft_status_reports_exactly_one_leader(cluster):
    statuses = [m.raft_status() for m in cluster.members]
    assert [s.state for s in statuses].count("leader") == 1
    assert all(s.state in ("leader", "follower") for s in statuses)
    leader = next(s for s in statuses if s.state == "leader")
    assert {s.leader_id for s in statuses} == {leader.node_id}
    assert len({s.term for s in statuses}) == 1 and leader.term >= 1
    assert {s.node_id for s in statuses} == {m.status().header.member_id for m in cluster.members}
    assert all(s.applied <= s.commit for s in statuses)
    # The same ids etcd's Status reports
    assert cluster.members[0].status().leader == leader.node_id


def test_put_on_follower_is_read_on_another_member(cluster):
    followers = cluster.followers()
    writer, reader = followers[0], next(m for m in cluster.members if m is not followers[0])
    cluster.etcdctl("put", "via-follower", "hello", endpoints=[writer])
    # Linearizable read (etcdctl's default) on a different member sees it at once.
    out = cluster.etcdctl("get", "via-follower", endpoints=[reader]).stdout
    assert out == "via-follower\nhello\n"


def test_put_get_del_prefix_output(cluster):
    assert cluster.etcdctl("put", "pfx/a", "1").stdout == "OK\n"
    assert cluster.etcdctl("put", "pfx/b", "2").stdout == "OK\n"
    assert cluster.etcdctl("put", "pfy", "3").stdout == "OK\n"
    assert cluster.etcdctl("get", "--prefix", "pfx/").stdout == "pfx/a\n1\npfx/b\n2\n"
    assert cluster.etcdctl("get", "--prefix", "pfx/", "--keys-only").stdout == "pfx/a\n\npfx/b\n\n"
    assert cluster.etcdctl("get", "pfx/a", "--print-value-only").stdout == "1\n"
    assert json.loads(cluster.etcdctl("get", "--prefix", "pfx/", "-w", "json").stdout)["count"] == 2
    assert cluster.etcdctl("get", "missing-key").stdout == ""
    assert cluster.etcdctl("del", "--prefix", "pfx/").stdout == "2\n"
    assert cluster.etcdctl("get", "--prefix", "pfx/").stdout == ""
    assert cluster.etcdctl("del", "pfy").stdout == "1\n"
    assert cluster.etcdctl("del", "pfy").stdout == "0\n"


def test_get_json_carries_mvcc_fields(cluster):
    cluster.etcdctl("put", "mvcc-key", "v1")
    cluster.etcdctl("put", "mvcc-key", "v2")
    doc = json.loads(cluster.etcdctl("get", "mvcc-key", "-w", "json").stdout)
    kv = doc["kvs"][0]
    assert kv["version"] == 2 and kv["mod_revision"] == kv["create_revision"] + 1
    assert doc["header"]["revision"] >= kv["mod_revision"]
    old = json.loads(cluster.etcdctl("get", "mvcc-key", "--rev", str(kv["create_revision"]), "-w",
                                     "json").stdout)
    import base64
    assert base64.b64decode(old["kvs"][0]["value"]) == b"v1"


def test_txn_interactive_output(cluster):
    cluster.etcdctl("put", "txn-key", "old")
    script = 'value("txn-key") = "old"\n\nput txn-key new\nget txn-key\n\nput txn-key failed\n\n'
    out = cluster.etcdctl("txn", input=script).stdout
    assert out == "SUCCESS\n\nOK\n\ntxn-key\nnew\n"
    out = cluster.etcdctl("txn", input=script).stdout
    assert out == "FAILURE\n\nOK\n"
    assert cluster.etcdctl("get", "txn-key", "--print-value-only").stdout == "failed\n"


def test_member_list_output(cluster):
    out = cluster.etcdctl("member", "list").stdout.strip().splitlines()
    assert len(out) == 3
    by_name = {}
    for line in out:
        mid, state, name, peer, client, learner = [f.strip() for f in line.split(",")]
        int(mid, 16)
        assert state == "started" and learner == "false"
        by_name[name] = (peer, client)
    for m in cluster.members:
        assert by_name[m.name] == (m.peer_url, m.client_url)
    ids = {format(m.status().header.member_id, "x") for m in cluster.members}
    assert {line.split(",")[0] for line in out} == ids


def test_endpoint_health(cluster):
    proc = cluster.etcdctl("endpoint", "health")
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 3
    assert all(" is healthy: successfully committed proposal" in line for line in lines)


def test_grpc_health_service_serving(cluster):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(cluster.members[0].channel())
    assert stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status == \
        health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("request_, code, message", [
    (rpc_pb2.PutRequest(key=b"", value=b"x"), grpc.StatusCode.INVALID_ARGUMENT,
     "etcdserver: key is not provided"),
    (rpc_pb2.PutRequest(key=b"big", value=b"x" * (1536 * 1024 + 10)), grpc.StatusCode.INVALID_ARGUMENT,
     "etcdserver: request is too large"),
    (rpc_pb2.RangeRequest(key=b""), grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: key is not provided"),
    (rpc_pb2.RangeRequest(key=b"a", revision=10**12), grpc.StatusCode.OUT_OF_RANGE,
     "etcdserver: mvcc: required revision is a future revision"),
    (rpc_pb2.PutRequest(key=b"nokey-ignore", ignore_value=True), grpc.StatusCode.INVALID_ARGUMENT,
     "etcdserver: key not found"),
])
def test_bad_requests_get_etcd_errors_and_server_keeps_serving(cluster, request_, code, message):
    kv = cluster.members[1].kv()
    call = kv.Put if isinstance(request_, rpc_pb2.PutRequest) else kv.Range
    with pytest.raises(grpc.RpcError) as info:
        call(request_, timeout=5)
    assert info.value.code() == code
    assert info.value.details() == message
    assert kv.Put(rpc_pb2.PutRequest(key=b"still-serving", value=b"yes"), timeout=5).header.revision > 1


def test_oversized_message_is_refused_without_harm(cluster):
    kv = cluster.members[0].kv()
    with pytest.raises(grpc.RpcError) as info:
        kv.Put(rpc_pb2.PutRequest(key=b"huge", value=b"x" * (3 * 1024 * 1024)), timeout=5)
    assert info.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT)
    assert cluster.etcdctl("put", "after-huge", "ok").stdout == "OK\n"


def test_serializable_read_is_local(cluster):
    cluster.etcdctl("put", "ser-key", "v")
    for m in cluster.members:
        def seen(m=m):
            return cluster.etcdctl("get", "ser-key", "--consistency=s", endpoints=[m]).stdout == "ser-key\nv\n"
        wait_for(seen, 5, f"{m.name} to apply ser-key")


def test_etcdctl_check_datascale_reads_metrics_from_the_client_port(cluster):
    """check datascale writes 10k keys and reads process memory from
    /metrics on the client URL, as etcd serves it there (HTTP/1.1 beside gRPC)."""
    out = cluster.etcdctl("check", "datascale", "--load=s", endpoints=cluster.members[:1], timeout=120).stdout
    assert "PASS: Approximate system memory used" in out, out
    # What it wrote is gone again and the cluster keeps serving.
    assert cluster.etcdctl("get", "/etcdctl-check-datascale/", "--prefix", "--keys-only").stdout == ""
    assert cluster.etcdctl("put", "after-datascale", "ok").stdout == "OK\n"
