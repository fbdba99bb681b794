"""etcd's Lock and Election gRPC services (v3lockpb, v3electionpb), which
client libraries such as jetcd and the Rust etcd-client call directly, on a
real 3-member cluster: waiters on different members take turns, a lease's end
hands the lock or leadership on, a caller that gives up leaves the queue, and
answers and errors are etcd 3.4's (checked side by side against etcd 3.4.23)."""
from __future__ import annotations

import threading
import time

import grpc
import pytest

from metastore.api.pb import rpc_pb2, rpc_pb2_grpc, v3election_pb2 as epb, v3election_pb2_grpc, \
    v3lock_pb2, v3lock_pb2_grpc
from metastore.testing import LocalCluster

pytestmark = pytest.mark.usefixtures("etcdctl_installed")


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(3) as c:
        yield c


def lock_stub(cluster, i: int) -> v3lock_pb2_grpc.LockStub:
    return v3lock_pb2_grpc.LockStub(cluster.members[i].channel())


def election_stub(cluster, i: int) -> v3election_pb2_grpc.ElectionStub:
    return v3election_pb2_grpc.ElectionStub(cluster.members[i].channel())


def lease(cluster, ttl: int = 30, i: int = 0) -> int:
    return rpc_pb2_grpc.LeaseStub(cluster.members[i].channel()).LeaseGrant(
        rpc_pb2.LeaseGrantRequest(TTL=ttl), timeout=5).ID


def revoke(cluster, lease_id: int) -> None:
    rpc_pb2_grpc.LeaseStub(cluster.members[0].channel()).LeaseRevoke(
        rpc_pb2.LeaseRevokeRequest(ID=lease_id), timeout=5)


def keys(cluster, prefix: bytes) -> list[bytes]:
    end = prefix[:-1] + bytes([prefix[-1] + 1])
    resp = rpc_pb2_grpc.KVStub(cluster.members[0].channel()).Range(
        rpc_pb2.RangeRequest(key=prefix, range_end=end), timeout=5)
    return [kv.key for kv in resp.kvs]


def still_waiting(future: grpc.Future, seconds: float = 0.5) -> bool:
    """True if the call has not answered within `seconds` (a waiter must not)."""
    try:
        future.result(timeout=seconds)
    except grpc.FutureTimeoutError:
        return True
    return False


def error_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_waiters_on_other_members_take_turns_in_order(cluster):
    first, second, third = lease(cluster), lease(cluster), lease(cluster)
    held = lock_stub(cluster, 0).Lock(v3lock_pb2.LockRequest(name=b"turns", lease=first), timeout=5)
    assert held.key == b"turns/%x" % first and held.header.revision > 0
    # Asking again with the same lease answers the same key at once.
    assert lock_stub(cluster, 1).Lock(v3lock_pb2.LockRequest(name=b"turns", lease=first), timeout=5).key == held.key
    waiting2 = lock_stub(cluster, 1).Lock.future(v3lock_pb2.LockRequest(name=b"turns", lease=second), timeout=20)
    assert still_waiting(waiting2)
    waiting3 = lock_stub(cluster, 2).Lock.future(v3lock_pb2.LockRequest(name=b"turns", lease=third), timeout=20)
    assert still_waiting(waiting3)
    unlocked = lock_stub(cluster, 2).Unlock(v3lock_pb2.UnlockRequest(key=held.key), timeout=5)
    got2 = waiting2.result(timeout=10)
    assert got2.key == b"turns/%x" % second and got2.header.revision >= unlocked.header.revision
    assert still_waiting(waiting3)  # behind the second, not racing it
    revoke(cluster, second)  # a lease's end releases the lock too
    assert waiting3.result(timeout=10).key == b"turns/%x" % third
    assert keys(cluster, b"turns/") == [b"turns/%x" % third]


def test_a_waiter_that_gives_up_leaves_the_queue(cluster):
    owner, quitter = lease(cluster), lease(cluster)
    held = lock_stub(cluster, 0).Lock(v3lock_pb2.LockRequest(name=b"quit", lease=owner), timeout=5)
    code, _ = error_of(lambda: lock_stub(cluster, 1).Lock(
        v3lock_pb2.LockRequest(name=b"quit", lease=quitter), timeout=0.5))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 10
    while keys(cluster, b"quit/") != [held.key]:
        assert time.monotonic() < deadline, keys(cluster, b"quit/")
        time.sleep(0.05)


def test_a_waiter_whose_lease_ended_is_told_not_given_the_lock(cluster):
    owner, waiter = lease(cluster), lease(cluster)
    lock_stub(cluster, 0).Lock(v3lock_pb2.LockRequest(name=b"expired", lease=owner), timeout=5)
    waiting = lock_stub(cluster, 1).Lock.future(v3lock_pb2.LockRequest(name=b"expired", lease=waiter), timeout=20)
    assert still_waiting(waiting)
    revoke(cluster, waiter)
    assert still_waiting(waiting)  # its turn has not come
    revoke(cluster, owner)
    with pytest.raises(grpc.RpcError) as info:
        waiting.result(timeout=10)
    assert (info.value.code(), info.value.details()) == (grpc.StatusCode.UNKNOWN, "mutex: session is expired")


def test_lock_errors_and_lease_zero(cluster):
    stub = lock_stub(cluster, 1)
    assert error_of(lambda: stub.Lock(v3lock_pb2.LockRequest(name=b"e", lease=12345), timeout=5)) == \
        (grpc.StatusCode.UNKNOWN, "etcdserver: requested lease not found")
    assert error_of(lambda: stub.Unlock(v3lock_pb2.UnlockRequest(key=b""), timeout=5)) == \
        (grpc.StatusCode.UNKNOWN, "etcdserver: key is not provided")
    assert stub.Unlock(v3lock_pb2.UnlockRequest(key=b"no/such/key"), timeout=5).header.revision > 0
    # Lease 0: etcd's server grants a 60 s lease that nobody keeps alive.
    key = stub.Lock(v3lock_pb2.LockRequest(name=b"zero", lease=0), timeout=5).key
    granted = int(key.split(b"/")[1], 16)
    ttl = rpc_pb2_grpc.LeaseStub(cluster.members[0].channel()).LeaseTimeToLive(
        rpc_pb2.LeaseTimeToLiveRequest(ID=granted), timeout=5)
    assert ttl.grantedTTL == 60 and 50 < ttl.TTL <= 60
    assert cluster.etcdctl("get", "--prefix", "zero/", "--keys-only").stdout.strip() == key.decode()


def test_campaign_leader_proclaim_resign_and_observe(cluster):
    a, b = lease(cluster), lease(cluster)
    name = b"svc"
    assert error_of(lambda: election_stub(cluster, 0).Leader(epb.LeaderRequest(name=name), timeout=5)) == \
        (grpc.StatusCode.UNKNOWN, "election: no leader")
    observed: list[epb.LeaderResponse] = []
    observing = election_stub(cluster, 2).Observe(epb.LeaderRequest(name=name), timeout=30)
    reader = threading.Thread(target=lambda: [observed.append(r) for r in _until_cancelled(observing)],
                              daemon=True)
    reader.start()

    won = election_stub(cluster, 0).Campaign(epb.CampaignRequest(name=name, lease=a, value=b"a1"), timeout=5)
    assert won.leader.name == name and won.leader.key == b"svc/%x" % a and won.leader.lease == a
    assert won.leader.rev == won.header.revision
    contender = election_stub(cluster, 1).Campaign.future(epb.CampaignRequest(name=name, lease=b, value=b"b1"),
                                                          timeout=20)
    assert still_waiting(contender)
    election_stub(cluster, 1).Proclaim(epb.ProclaimRequest(leader=won.leader, value=b"a2"), timeout=5)
    current = election_stub(cluster, 2).Leader(epb.LeaderRequest(name=name), timeout=5)
    assert (current.kv.key, current.kv.value, current.kv.version) == (won.leader.key, b"a2", 2)

    stale = epb.LeaderKey(name=name, key=won.leader.key, rev=won.leader.rev + 100, lease=a)
    assert error_of(lambda: election_stub(cluster, 0).Proclaim(epb.ProclaimRequest(leader=stale, value=b"x"),
                                                               timeout=5)) == \
        (grpc.StatusCode.UNKNOWN, "election: not leader")
    assert error_of(lambda: election_stub(cluster, 0).Proclaim(epb.ProclaimRequest(value=b"x"), timeout=5)) == \
        (grpc.StatusCode.UNKNOWN, '"leader" field must be provided')
    election_stub(cluster, 0).Resign(epb.ResignRequest(leader=stale), timeout=5)  # not its: nothing happens
    assert still_waiting(contender)

    election_stub(cluster, 2).Resign(epb.ResignRequest(leader=won.leader), timeout=5)
    second = contender.result(timeout=10)
    assert second.leader.key == b"svc/%x" % b
    deadline = time.monotonic() + 10
    while [r.kv.value for r in observed] != [b"a1", b"a2", b"b1"]:
        assert time.monotonic() < deadline, [r.kv.value for r in observed]
        time.sleep(0.05)
    assert observed[-1].kv.key == second.leader.key and observed[-1].header.member_id
    revoke(cluster, b)  # the lease's end ends the leadership
    assert error_of(lambda: election_stub(cluster, 1).Leader(epb.LeaderRequest(name=name), timeout=5))[1] == \
        "election: no leader"
    observing.cancel()


def test_campaigning_again_with_the_same_lease_keeps_the_leadership(cluster):
    a = lease(cluster)
    first = election_stub(cluster, 0).Campaign(epb.CampaignRequest(name=b"again", lease=a, value=b"v1"), timeout=5)
    again = election_stub(cluster, 1).Campaign(epb.CampaignRequest(name=b"again", lease=a, value=b"v2"), timeout=5)
    assert again.leader == first.leader  # same key and creation revision
    assert election_stub(cluster, 2).Leader(epb.LeaderRequest(name=b"again"), timeout=5).kv.value == b"v2"


def test_a_campaigner_that_gives_up_leaves_the_queue(cluster):
    a, quitter = lease(cluster), lease(cluster)
    won = election_stub(cluster, 0).Campaign(epb.CampaignRequest(name=b"quits", lease=a, value=b"a"), timeout=5)
    code, _ = error_of(lambda: election_stub(cluster, 1).Campaign(
        epb.CampaignRequest(name=b"quits", lease=quitter, value=b"q"), timeout=0.5))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 10
    while keys(cluster, b"quits/") != [won.leader.key]:
        assert time.monotonic() < deadline, keys(cluster, b"quits/")
        time.sleep(0.05)


def _until_cancelled(stream):
    try:
        yield from stream
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.CANCELLED:
            raise
