"""A long apply (a DeleteRange of many keys) costs no election and stops
nothing else from committing, and is reported to on_long_apply listeners
(the lessor extends leases by it).

Three real pysyncobj members in this process on loopback: one entry takes
longer to apply than the election timeout on every member. Entries are
applied beside Raft's tick thread (raft.applier), so meanwhile the leader
keeps heartbeating and the followers keep acknowledging new entries.
"""
from __future__ import annotations

import threading
import time

from metastore.cluster import Membership
from metastore.raft import RaftConfig, RaftNode
from metastore.testing import free_ports, wait_for

SLOW = b"slow"
ELECTION_TIMEOUT = 0.4
SLOW_APPLY = 2.5  # > 2 x the longest election timeout pysyncobj picks


def test_leader_keeps_heartbeating_through_a_long_apply(tmp_path):
    ports = free_ports(3)
    addresses = [f"127.0.0.1:{p}" for p in ports]
    membership = Membership("t", {f"n{i}": [f"http://{a}"] for i, a in enumerate(addresses)})
    applied: list[list[bytes]] = [[] for _ in range(3)]
    nodes: list[RaftNode] = []
    for i, address in enumerate(addresses):
        def apply(payload: bytes, index: int, i=i) -> int:
            if payload == SLOW:
                time.sleep(SLOW_APPLY)  # the store busy with one huge request
            applied[i].append(payload)
            return index

        cfg = RaftConfig(self_address=address, partner_addresses=[a for a in addresses if a != address],
                         bind_address=address, journal_file=str(tmp_path / f"n{i}.log"),
                         heartbeat_interval=0.05, election_timeout=ELECTION_TIMEOUT)
        nodes.append(RaftNode(cfg, i + 1, membership.id_of_address, apply))
    try:
        for n in nodes:
            n.start()
        leader = wait_for(lambda: next((n for n in nodes if n.is_leader()), None), 15, "a leader")
        done = threading.Event()
        leader.submit(b"warm-up", lambda result, error: done.set())
        assert done.wait(10)
        # Everyone connected and following (a member that connects only
        # while the leader is busy would campaign: pysyncobj has no pre-vote).
        wait_for(lambda: all(b"warm-up" in a for a in applied), 15, "every member to apply the warm-up entry")
        term = leader.raft_status().term
        long_applies: list[float] = []
        leader.on_long_apply(long_applies.append)  # Node extends every lease by it
        done.clear()
        leader.submit(SLOW, lambda result, error: done.set())
        wait_for(lambda: all(n.applying_for() > 0.2 for n in nodes), 10, "every member to be applying it")
        slow_index = leader.raft_status().commit
        during = threading.Event()
        leader.submit(b"during", lambda result, error: during.set())
        # Committed (a follower acknowledged it) while every member is still
        # busy with the slow entry; answered only once applied, after it.
        wait_for(lambda: leader.raft_status().commit > slow_index, SLOW_APPLY / 2, "the next entry to commit")
        assert all(n.applying_for() > 0 for n in nodes) and not during.is_set()
        assert done.wait(30) and during.wait(10)
        wait_for(lambda: all(SLOW in a for a in applied), 30, "every member to apply the slow entry")
        after = threading.Event()
        leader.submit(b"after", lambda result, error: after.set())
        assert after.wait(10)
        terms = [n.raft_status().term for n in nodes]
        assert terms == [term] * 3 and leader.is_leader(), f"an election happened: terms {terms} (was {term})"
        assert len(long_applies) == 1 and long_applies[0] >= SLOW_APPLY, long_applies
    finally:
        for n in nodes:
            n.stop()
