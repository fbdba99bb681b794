"""Leases on a real 3-member cluster, both engines: etcdctl 3.4's lease
commands, etcd's errors, and expiry decided by the leader."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time

import grpc
import pytest

from metastore.api.pb import rpc_pb2, rpc_pb2_grpc
from metastore.testing import LocalCluster, wait_for
from store_engines import ENGINES

pytestmark = pytest.mark.usefixtures("etcdctl_installed")


@pytest.fixture(scope="module", params=ENGINES)
def cluster(request):
    with LocalCluster(3, engine=request.param) as c:
        yield c


def lease_stub(member) -> rpc_pb2_grpc.LeaseStub:
    return rpc_pb2_grpc.LeaseStub(member.channel())


def grant(cluster: LocalCluster, ttl: int) -> str:
    out = cluster.etcdctl("lease", "grant", str(ttl)).stdout
    words = out.split()
    assert words[0] == "lease" and words[2:] == ["granted", "with", f"TTL({ttl}s)"], out
    return words[1]


def key_count(member, key: bytes) -> int:
    return member.kv().Range(rpc_pb2.RangeRequest(key=key), timeout=5).count


def test_grant_put_timetolive_list_keepalive_revoke(cluster):
    lease = grant(cluster, 30)
    assert cluster.etcdctl("put", "--lease", lease, "leased/a", "1").stdout == "OK\n"
    assert cluster.etcdctl("put", "--lease", lease, "leased/b", "2").stdout == "OK\n"
    out = cluster.etcdctl("lease", "timetolive", lease, "--keys").stdout
    assert out.startswith(f"lease {lease} granted with TTL(30s), remaining(")
    assert out.endswith("s), attached keys([leased/a leased/b])\n"), out
    remaining = int(out.split("remaining(")[1].split("s)")[0])
    assert 27 <= remaining <= 30
    listed = cluster.etcdctl("lease", "list").stdout.splitlines()
    assert listed[0].startswith("found ") and lease in listed[1:]
    assert cluster.etcdctl("lease", "keep-alive", "--once", lease).stdout == \
        f"lease {lease} keepalived with TTL(30)\n"
    # Every member sees the lease and the keys attached to it.
    for m in cluster.members:
        resp = lease_stub(m).LeaseTimeToLive(rpc_pb2.LeaseTimeToLiveRequest(ID=int(lease, 16), keys=True),
                                             timeout=5)
        assert resp.grantedTTL == 30 and sorted(resp.keys) == [b"leased/a", b"leased/b"]
    rev_before = cluster.leader().kv().Range(rpc_pb2.RangeRequest(key=b"x"), timeout=5).header.revision
    assert cluster.etcdctl("lease", "revoke", lease).stdout == f"lease {lease} revoked\n"
    for m in cluster.members:
        wait_for(lambda: key_count(m, b"leased/a") + key_count(m, b"leased/b") == 0, 5,
                 "the revoked lease's keys to go everywhere")
    # Both keys went in one revision.
    resp = cluster.leader().kv().Range(rpc_pb2.RangeRequest(key=b"x"), timeout=5)
    assert resp.header.revision == rev_before + 1
    assert cluster.etcdctl("lease", "timetolive", lease).stdout == f"lease {lease} already expired\n"


def test_unknown_lease_errors(cluster):
    proc = cluster.etcdctl("lease", "revoke", "abc123", check=False)
    assert proc.returncode == 1
    assert "Error: failed to revoke lease (etcdserver: requested lease not found)" in proc.stderr
    proc = cluster.etcdctl("put", "--lease", "abc123", "k", "v", check=False)
    assert proc.returncode == 1 and "Error: etcdserver: requested lease not found" in proc.stderr
    assert cluster.etcdctl("lease", "timetolive", "abc123").stdout == "lease 0000000000abc123 already expired\n"
    resp = lease_stub(cluster.members[0]).LeaseTimeToLive(rpc_pb2.LeaseTimeToLiveRequest(ID=0xabc123), timeout=5)
    assert resp.TTL == -1
    # Keep-alive of an unknown lease answers TTL 0 (etcdctl reports it gone).
    stream = lease_stub(cluster.members[1]).LeaseKeepAlive(iter([rpc_pb2.LeaseKeepAliveRequest(ID=0xabc123)]),
                                                           timeout=5)
    answers = list(stream)
    assert [(a.ID, a.TTL) for a in answers] == [(0xabc123, 0)]
    # The server keeps serving.
    assert cluster.etcdctl("put", "still", "ok").stdout == "OK\n"


def test_client_chosen_id_duplicate_and_limits(cluster):
    stub = lease_stub(cluster.followers()[0])
    resp = stub.LeaseGrant(rpc_pb2.LeaseGrantRequest(ID=0x5eed, TTL=20), timeout=5)
    assert (resp.ID, resp.TTL) == (0x5eed, 20) and resp.header.member_id
    with pytest.raises(grpc.RpcError) as info:
        lease_stub(cluster.leader()).LeaseGrant(rpc_pb2.LeaseGrantRequest(ID=0x5eed, TTL=5), timeout=5)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.details() == "etcdserver: lease already exists"
    with pytest.raises(grpc.RpcError) as info:
        stub.LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=9_000_000_001), timeout=5)
    assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert info.value.details() == "etcdserver: too large lease TTL"
    # etcd's minimum TTL: 1.5 election timeouts (1 s by default), rounded up.
    assert stub.LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=1), timeout=5).TTL == 2
    ids = [ls.ID for ls in stub.LeaseLeases(rpc_pb2.LeaseLeasesRequest(), timeout=5).leases]
    assert 0x5eed in ids
    stub.LeaseRevoke(rpc_pb2.LeaseRevokeRequest(ID=0x5eed), timeout=5)


def test_members_own_session_leases_are_not_clients_leases(cluster):
    """etcd has no leases of its own: the members' session leases (liveness)
    are neither listed nor revocable through the Lease API."""
    def sessions() -> list[str] | None:
        found = [re.findall(r"session ([0-9a-f]+) registered", m.log()) for m in cluster.members]
        return [f[-1] for f in found] if all(found) else None

    ids = wait_for(sessions, 20, "every member's session")
    mine = grant(cluster, 30)
    out = cluster.etcdctl("lease", "list").stdout
    listed = {int(word, 16) for word in out.splitlines()[1:]}
    assert int(mine, 16) in listed
    assert not listed & {int(s, 16) for s in ids}, (ids, out)
    for session in ids:
        proc = cluster.etcdctl("lease", "revoke", session, check=False)
        assert proc.returncode != 0 and "etcdserver: requested lease not found" in proc.stderr, proc
        out = cluster.etcdctl("lease", "timetolive", session).stdout
        assert out == f"lease {int(session, 16):016x} already expired\n", out
    # Still the same sessions: none was ended by the attempts.
    assert sessions() == ids
    assert not any("starting a new one" in m.log() for m in cluster.members)
    cluster.etcdctl("lease", "revoke", mine)


def test_keepalive_stream_keeps_a_lease_alive_past_its_ttl(cluster):
    lease = grant(cluster, 3)
    cluster.etcdctl("put", "--lease", lease, "kept", "alive")
    exe = shutil.which("etcdctl")
    ka = subprocess.Popen([exe, "--endpoints", cluster.followers()[0].endpoint, "lease", "keep-alive", lease],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ, ETCDCTL_API="3"))
    try:
        start = time.monotonic()
        first = ka.stdout.readline()
        assert first == f"lease {lease} keepalived with TTL(3)\n"
        # Well past the TTL the key is still there, on every member.
        while time.monotonic() - start < 5:
            assert ka.poll() is None, ka.stderr.read()
            assert all(key_count(m, b"kept") == 1 for m in cluster.members)
            time.sleep(0.5)
    finally:
        ka.kill()
        ka.wait()
    wait_for(lambda: key_count(cluster.leader(), b"kept") == 0, 6, "the lease to expire once nobody keeps it")


def test_expiry_on_time_when_the_leader_changes_in_between():
    """The client keeping the lease dies, then the leader dies: the lease
    still expires about TTL after the last keep-alive, not a fresh TTL
    after the election."""
    ttl = 6
    with LocalCluster(3) as cluster:
        leader = cluster.leader()
        other = cluster.followers()[0]
        resp = lease_stub(other).LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=ttl), timeout=5)
        lease = resp.ID
        other.kv().Put(rpc_pb2.PutRequest(key=b"session", value=b"x", lease=lease), timeout=5)
        # Keep it alive for a while (through a follower), then stop: the client died.
        for _ in range(3):
            answers = list(lease_stub(other).LeaseKeepAlive(iter([rpc_pb2.LeaseKeepAliveRequest(ID=lease)]),
                                                            timeout=5))
            assert answers[0].TTL == ttl
            time.sleep(1)
        last_keepalive = time.monotonic()
        list(lease_stub(other).LeaseKeepAlive(iter([rpc_pb2.LeaseKeepAliveRequest(ID=lease)]), timeout=5))
        cluster.kill(leader, signal.SIGKILL)
        new_leader = cluster.leader(timeout=15)
        assert new_leader is not leader
        wait_for(lambda: key_count(new_leader, b"session") == 0, ttl + 5, "the lease to expire")
        gone = time.monotonic() - last_keepalive
        assert ttl - 0.5 <= gone <= ttl + 1.0, f"expired {gone:.2f}s after the last keep-alive (TTL {ttl}s)"
        ttl_resp = lease_stub(new_leader).LeaseTimeToLive(rpc_pb2.LeaseTimeToLiveRequest(ID=lease), timeout=5)
        assert ttl_resp.TTL == -1
