"""StateMachine.apply: a slow entry is not held against the leases."""
from __future__ import annotations

import time

from metastore.api.pb import raft_entry_pb2, rpc_pb2
from metastore.cluster import Membership
from metastore.engines.memory import MemoryBackend
from metastore.lessor import Lessor
from metastore.mvcc import MVCCStore
from metastore.state_machine import LONG_APPLY, StateMachine


def entry(*proposals: raft_entry_pb2.Proposal) -> bytes:
    return raft_entry_pb2.ProposalBatch(origin=1, proposals=list(proposals)).SerializeToString()


def test_a_long_apply_extends_every_lease_by_its_duration(monkeypatch):
    store = MVCCStore(MemoryBackend(), 1)
    now = [100.0]
    lessor = Lessor(store, grace=1.0, clock=lambda: now[0])
    sm = StateMachine(store, Membership("t", {}), lessor)
    sm.apply(entry(raft_entry_pb2.Proposal(lease_grant=rpc_pb2.LeaseGrantRequest(ID=7, TTL=10))), 1)
    assert lessor.remaining(7) == 10.0

    real_put = store.put

    def slow_put(req):  # a DeleteRange of many keys, say: keep-alives wait behind it
        time.sleep(LONG_APPLY * 3)
        return real_put(req)

    monkeypatch.setattr(store, "put", slow_put)
    sm.apply(entry(raft_entry_pb2.Proposal(put=rpc_pb2.PutRequest(key=b"k", value=b"v"))), 2)
    assert lessor.remaining(7) >= 10.0 + LONG_APPLY * 3
    monkeypatch.setattr(store, "put", real_put)
    sm.apply(entry(raft_entry_pb2.Proposal(put=rpc_pb2.PutRequest(key=b"k", value=b"w"))), 3)
    assert lessor.remaining(7) < 10.0 + LONG_APPLY * 5  # a quick apply extends nothing
