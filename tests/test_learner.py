"""Learners, MemberPromote and MemberUpdate with etcdctl 3.4 on real processes.

A learner (`member add --learner`) holds every entry -- through a snapshot
install and its own snapshots -- and serves serializable reads, but does not
vote: stopping it never blocks writes. Promoted, it votes (a 2-voter cluster
then needs it for every write), and stays a voter across a restart.
"""
from __future__ import annotations

import json
import signal

import grpc
import pytest

from metastore.api.pb import rpc_pb2, rpc_pb2_grpc, v3lock_pb2, v3lock_pb2_grpc
from metastore.testing import LocalCluster, Member, wait_for
from store_engines import ENGINES

pytestmark = pytest.mark.usefixtures("etcdctl_installed")

NOT_FOR_LEARNER = "etcdserver: rpc not supported for learner"
# Few entries between snapshots: the leader has compacted its log before the
# learner joins (it must install a snapshot) and the learner takes its own.
SNAPSHOT_EVERY = ["--snapshot-count", "100"]  # the smallest allowed


def count(member: Member, prefix: bytes) -> int:
    end = prefix[:-1] + bytes([prefix[-1] + 1])
    return member.kv().Range(rpc_pb2.RangeRequest(key=prefix, range_end=end, count_only=True,
                                                  serializable=True), timeout=5).count


def put(member: Member, key: bytes, timeout: float = 5) -> None:
    member.kv().Put(rpc_pb2.PutRequest(key=key, value=b"v"), timeout=timeout)


def listed(cluster: LocalCluster, via: Member) -> dict[str, dict]:
    """`member list -w json` through `via`, by member name ('' = unstarted)."""
    out = cluster.etcdctl("member", "list", "-w", "json", endpoints=[via]).stdout
    return {m.get("name", ""): m for m in json.loads(out)["members"]}


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


@pytest.mark.parametrize("engine", ENGINES)
def test_learner_replicates_without_voting_until_promoted(engine):
    with LocalCluster(1, engine=engine, extra_args=SNAPSHOT_EVERY) as cluster:
        voter = cluster.members[0]
        for i in range(250):
            put(voter, b"data/%03d" % i)

        learner = cluster.add_member("m2", start=False, learner=True)
        out = cluster.etcdctl("member", "add", "m2", f"--peer-urls={learner.peer_url}", "--learner").stdout
        learner_id = out.splitlines()[0].split()[1]
        initial = next(line for line in out.splitlines() if line.startswith("ETCD_INITIAL_CLUSTER="))
        assert f"m1={voter.peer_url}" in initial and f"m2={learner.peer_url}" in initial
        assert f"{learner_id}, unstarted, , {learner.peer_url}, , true" in cluster.etcdctl("member", "list").stdout

        # Started like a voter joining (--initial-cluster-state existing):
        # it finds out from the running members that it is a learner.
        cluster.start_member(learner)
        wait_for(lambda: count(learner, b"data/") == 250, 30, "the learner to hold all data")
        wait_for(lambda: listed(cluster, voter).get("m2", {}).get("isLearner"), 15,
                 "the learner to publish its name")
        got = cluster.etcdctl("get", "--consistency=s", "data/042", endpoints=[learner]).stdout
        assert got.splitlines() == ["data/042", "v"]
        assert json.loads(cluster.etcdctl("endpoint", "status", "-w", "json",
                                          endpoints=[learner]).stdout)[0]["Status"]["isLearner"]
        # etcd 3.4's learner refuses writes, linearizable reads, cluster and
        # maintenance calls but Status, and every stream.
        for call in (lambda: put(learner, b"nope"),
                     lambda: learner.kv().Range(rpc_pb2.RangeRequest(key=b"data/000"), timeout=5),
                     lambda: learner.cluster().MemberList(rpc_pb2.MemberListRequest(), timeout=5),
                     lambda: rpc_pb2_grpc.AuthStub(learner.channel()).UserList(rpc_pb2.AuthUserListRequest(),
                                                                             timeout=5),
                     lambda: v3lock_pb2_grpc.LockStub(learner.channel()).Lock(v3lock_pb2.LockRequest(name=b"l"),
                                                                              timeout=5),
                     lambda: learner.maintenance().Hash(rpc_pb2.HashRequest(), timeout=5),
                     lambda: learner.maintenance().Alarm(rpc_pb2.AlarmRequest(), timeout=5),
                     lambda: next(rpc_pb2_grpc.WatchStub(learner.channel()).Watch(
                         iter([rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(key=b"k"))]),
                         timeout=5)),
                     lambda: next(rpc_pb2_grpc.LeaseStub(learner.channel()).LeaseKeepAlive(
                         iter([rpc_pb2.LeaseKeepAliveRequest(ID=1)]), timeout=5))):
            err = rpc_error(call)
            assert (err.code(), err.details()) == (grpc.StatusCode.UNAVAILABLE, NOT_FOR_LEARNER)

        for i in range(250, 400):  # the learner compacts its own log too
            put(voter, b"data/%03d" % i)
        wait_for(lambda: count(learner, b"data/") == 400, 15, "the learner to follow new writes")

        # Not in the quorum: the only voter commits alone.
        cluster.kill(learner, signal.SIGTERM)
        put(voter, b"data/400")
        proc = cluster.etcdctl("member", "promote", learner_id, check=False)
        assert proc.returncode != 0
        assert "etcdserver: can only promote a learner member which is in sync with leader" in proc.stderr

        cluster.restart(learner, wait=False)
        wait_for(lambda: count(learner, b"data/") == 401, 30, "the restarted learner to catch up")
        proc = cluster.etcdctl("member", "promote", f"{voter.status().header.member_id:x}", check=False,
                               endpoints=[voter])
        assert proc.returncode != 0 and "etcdserver: can only promote a learner member\n" in proc.stderr

        out = cluster.etcdctl("member", "promote", learner_id, endpoints=[voter]).stdout
        assert out.startswith(f"Member {int(learner_id, 16):16x} promoted in cluster ")
        learner.learner = False
        assert listed(cluster, voter)["m2"].get("isLearner", False) is False
        put(learner, b"data/401")  # a voter takes writes (forwarded to the leader)
        assert listed(cluster, learner)["m2"].get("isLearner", False) is False

        # Two voters now: without m2 there is no quorum.
        cluster.kill(learner)
        err = rpc_error(lambda: put(voter, b"no-quorum", timeout=3))
        assert err.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)

        # Restarted, m2 votes again (as a learner it could not make a quorum).
        cluster.restart(learner)
        put(voter, b"data/402")
        wait_for(lambda: count(learner, b"data/") == 403, 15, "the promoted member to hold every write")
        assert not learner.status().isLearner
        last_start = [line for line in learner.log().splitlines() if "metastore.raft: raft node" in line][-1]
        assert "listening on" in last_start, last_start  # not "started as a learner"


def test_learner_errors_member_update_and_removing_a_learner():
    with LocalCluster(1) as cluster:
        voter = cluster.members[0]
        voter_id = f"{voter.status().header.member_id:x}"

        # MemberUpdate: the same peer URLs succeed; a change is refused.
        out = cluster.etcdctl("member", "update", voter_id, f"--peer-urls={voter.peer_url}").stdout
        assert out.startswith(f"Member {int(voter_id, 16):16x} updated in cluster ")
        proc = cluster.etcdctl("member", "update", voter_id, "--peer-urls=http://127.0.0.1:1", check=False)
        assert proc.returncode != 0
        assert "not supported" in proc.stderr and "remove the member and add it again" in proc.stderr
        for command in (["update", "abcdef", f"--peer-urls={voter.peer_url}"], ["promote", "abcdef"]):
            proc = cluster.etcdctl("member", *command, check=False)
            assert proc.returncode != 0 and "etcdserver: member not found" in proc.stderr

        learner = cluster.add_member("m2", start=False, learner=True)
        cluster.etcdctl("member", "add", "m2", f"--peer-urls={learner.peer_url}", "--learner")
        proc = cluster.etcdctl("member", "add", "m3", "--peer-urls=http://127.0.0.1:1", "--learner", check=False)
        assert proc.returncode != 0 and "etcdserver: too many learner members in cluster" in proc.stderr
        cluster.start_member(learner)
        put(voter, b"k")
        wait_for(lambda: count(learner, b"k") == 1, 30, "the learner to catch up")
        learner_id = f"{learner.status().header.member_id:x}"

        # Removing a learner changes only the table; it stops itself.
        out = cluster.etcdctl("member", "remove", learner_id, endpoints=[voter]).stdout
        assert out.startswith(f"Member {int(learner_id, 16):16x} removed from cluster ")
        wait_for(lambda: learner.proc.poll() is not None, 30, "the removed learner to stop")
        learner.stopped = True
        assert "removed from the cluster" in learner.log()
        assert list(listed(cluster, voter)) == ["m1"]
        put(voter, b"after-removal")


def test_raft_node_learner_switches_to_voter_when_added(tmp_path):
    """The RaftNode adapter alone: a new node that the running voter does
    not list starts read-only, receives the log without voting, refuses
    proposals, and becomes a voter -- recorded in its role file -- once the
    voter adds its address."""
    from metastore.cluster import Membership
    from metastore.raft import RaftConfig, RaftNode
    from metastore.raft.node import ROLE_SUFFIX
    from metastore.testing import free_ports

    addresses = [f"127.0.0.1:{p}" for p in free_ports(2)]
    membership = Membership("t", {f"n{i}": [f"http://{a}"] for i, a in enumerate(addresses)})
    applied: dict[int, list[tuple[int, bytes]]] = {0: [], 1: []}  # (raft index, payload)
    nodes: list[RaftNode] = []
    for i, address in enumerate(addresses):
        cfg = RaftConfig(self_address=address, partner_addresses=[a for a in addresses[:i]],
                         bind_address=address, journal_file=str(tmp_path / f"n{i}.log"),
                         heartbeat_interval=0.05, election_timeout=0.5)
        nodes.append(RaftNode(cfg, i + 1, membership.id_of_address,
                              lambda payload, index, i=i: applied[i].append((index, payload))))
    voter, learner = nodes
    try:
        voter.start()  # nobody to ask: founding a cluster
        wait_for(voter.is_leader, 15, "the first node to lead")
        learner.start()  # the voter answers without our address
        assert learner.is_learner() and not voter.is_learner()

        def submit(node: RaftNode, payload: bytes) -> tuple[object, object]:
            outcome: list[tuple[object, object]] = []
            node.submit(payload, lambda result, error: outcome.append((result, error)))
            return wait_for(lambda: outcome and outcome[0], 10, "the submission's outcome")

        assert submit(voter, b"one") == (None, None)
        wait_for(lambda: any(p == b"one" for _, p in applied[1]), 10, "the learner to apply the entry")
        _, error = submit(learner, b"two")
        assert error is not None and error.message == NOT_FOR_LEARNER

        changed: list[object] = []
        voter.change_membership(addresses[1], True, lambda _result, error: changed.append(error))
        wait_for(lambda: changed, 15, "the voter to commit the new voter")
        assert changed == [None]
        wait_for(lambda: not learner.is_learner(), 10, "the learner to restart as a voter")
        assert json.loads((tmp_path / f"n1.log{ROLE_SUFFIX}").read_text()) == \
            {"role": "voter", "peers": [addresses[0]]}
        assert submit(learner, b"three") == (None, None)  # a voter proposes (forwarded to the leader)
        wait_for(lambda: any(p == b"three" for _, p in applied[0]), 10, "the leader to apply it")
        # The voter replays the journal like a restart does, with the same
        # indexes (StateMachine.apply skips what the store already holds).
        by_index = dict(applied[0])
        assert all(by_index.get(index) == payload for index, payload in applied[1])
    finally:
        for node in nodes:
            node.stop()
