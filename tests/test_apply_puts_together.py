"""Consecutive Puts of one Raft entry are applied together (MVCCStore.put_many,
one backend write): everything a client or a watcher can observe must equal
applying the same requests one entry at a time, on both engines."""
from __future__ import annotations

import pytest

from metastore.api.pb import raft_entry_pb2, rpc_pb2
from metastore.cluster import Membership
from metastore.errors import EtcdError
from metastore.mvcc_layout import META_APPLIED
from metastore.state_machine import StateMachine
from store_fixtures import engine, make_store  # noqa: F401 - fixtures

P = raft_entry_pb2.Proposal
IN_LOG = frozenset({("meta", META_APPLIED)})


def put(key: bytes, value: bytes = b"v", **kw) -> P:
    return P(put=rpc_pb2.PutRequest(key=key, value=value, **kw))


def proposals() -> list[P]:
    """Puts around every way a Put can fail or depend on the one before it."""
    return [
        P(lease_grant=rpc_pb2.LeaseGrantRequest(ID=7, TTL=60)),
        put(b"a", b"1"),
        put(b"a", b"2", prev_kv=True),  # reads the Put just before it
        put(b"b", b"1", lease=7),
        put(b"b", b"2", lease=99),  # unknown lease: fails alone
        put(b"c", ignore_value=True),  # missing key: fails alone
        put(b"b", ignore_value=True, prev_kv=True),  # keeps "1", drops the lease
        put(b"b", b"3", lease=7),
        P(delete_range=rpc_pb2.DeleteRangeRequest(key=b"a")),
        put(b"a", b"again", prev_kv=True),
        P(txn=rpc_pb2.TxnRequest(success=[rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=b"t"))])),
        put(b"t", b"after the txn", prev_kv=True),
    ]


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[int, list[bytes]]] = []

    def __call__(self, rev: int, events) -> None:
        self.seen.append((rev, [e.SerializeToString() for e in events]))


def result_bytes(result) -> object:
    if isinstance(result, EtcdError):
        return ("error", result.code, result.message)
    return None if result is None else result.SerializeToString()


def apply(store, batches: list[list[P]], first_index: int = 1) -> tuple[list, Events]:
    events = Events()
    store.add_listener(events)
    sm = StateMachine(store, Membership("t", {}))
    results = []
    for index, batch in enumerate(batches, start=first_index):
        entry = raft_entry_pb2.ProposalBatch(origin=1, proposals=batch).SerializeToString()
        results += [result_bytes(r) for r in sm.apply(entry, index)]
    return results, events


def test_one_entry_equals_one_request_per_entry(make_store) -> None:
    together, _ = make_store()
    apart, _ = make_store()
    got, got_events = apply(together, [proposals()])
    want, want_events = apply(apart, [[p] for p in proposals()])
    assert got == want
    assert got_events.seen == want_events.seen
    assert together.revision == apart.revision
    # Every row alike but where each stands in the Raft log.
    assert together.hash_backend(IN_LOG) == apart.hash_backend(IN_LOG)
    assert together.applied_position == (1, len(proposals()) - 1)
    history = rpc_pb2.RangeRequest(key=b"\0", range_end=b"\0")
    for rev in range(1, together.revision + 1):
        history.revision = rev
        assert together.range(history) == apart.range(history)
    assert got[4][0] == "error" and got[5][0] == "error"  # the unknown lease, the missing key


def test_a_replay_skips_the_puts_the_store_holds(make_store) -> None:
    """After a restart the entry is applied again; a persistent store already
    holds its Puts (its applied position is the last one) and must not apply
    them twice."""
    store, _ = make_store()
    batch = [put(b"k%d" % i) for i in range(5)]
    apply(store, [batch])
    rev = store.revision
    results, events = apply(store, [batch])
    assert results == [None] * 5 and events.seen == [] and store.revision == rev


@pytest.mark.parametrize("failing", [0, 2, 4])
def test_all_puts_failing_writes_nothing(make_store, failing: int) -> None:
    store, _ = make_store()
    before = store.hash_backend()
    batch = [put(b"x%d" % i, lease=1000 + i) for i in range(failing + 1)]
    results, events = apply(store, [batch])
    assert all(r[0] == "error" for r in results) and events.seen == []
    assert store.hash_backend() == before and store.revision == 1


def test_a_run_of_puts_is_one_backend_write(make_store, monkeypatch: pytest.MonkeyPatch) -> None:
    store, _ = make_store()
    writes = []
    real = store.backend.write
    monkeypatch.setattr(store.backend, "write", lambda batch: writes.append(len(batch)) or real(batch))
    apply(store, [[put(b"k%d" % i) for i in range(10)]])
    assert len(writes) == 1 and store.revision == 11


def test_a_big_run_with_keys_put_again_equals_one_at_a_time(make_store) -> None:
    """More rows than an engine writes in one go (RocksDB puts big batches'
    history ahead, the memory engine applies them in bulk)."""
    batch = [put(b"k%03d" % (i % 150), b"v%d" % i, prev_kv=True) for i in range(600)]
    together, _ = make_store()
    apart, _ = make_store()
    got, got_events = apply(together, [batch])
    want, want_events = apply(apart, [[p] for p in batch])
    assert got == want and got_events.seen == want_events.seen
    assert together.hash_backend(IN_LOG) == apart.hash_backend(IN_LOG)


def test_a_failed_write_fails_the_run_and_leaves_nothing(make_store, monkeypatch: pytest.MonkeyPatch) -> None:
    store, _ = make_store()
    reference, _ = make_store()
    for s in (store, reference):
        apply(s, [[put(b"a", b"0")]])
    real = store.backend.write

    def full_disk(batch):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store.backend, "write", full_disk)
    results, events = apply(store, [[put(b"a", b"1"), put(b"b", b"1")]], first_index=2)
    assert [r[0] for r in results] == ["error", "error"] and events.seen == []
    monkeypatch.setattr(store.backend, "write", real)
    assert store.revision == reference.revision
    assert store.hash_backend() == reference.hash_backend()
