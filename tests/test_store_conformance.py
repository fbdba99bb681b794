"""Store conformance: etcd's KV semantics, run against every engine.

Each test takes the `store` (or `make_store`) fixture, parametrized over
store_engines.ENGINES, so a new engine passes or fails the same suite.
"""
from __future__ import annotations

import random
import threading
from typing import Callable, Iterable

import pytest

from metastore import errors
from metastore.api.pb import kv_pb2
from metastore.api.pb import rpc_pb2 as pb
from metastore.errors import EtcdError
from metastore.mvcc import MVCCStore
from store_fixtures import engine, make_store, reopen, store  # noqa: F401  (fixtures)

RR = pb.RangeRequest
C = pb.Compare
ALL = (b"\x00", b"\x00")  # etcd's "every key"


# -- helpers ------------------------------------------------------------------
def put(s: MVCCStore, key: bytes, value: bytes = b"", **kw) -> pb.PutResponse:
    return s.put(pb.PutRequest(key=key, value=value, **kw))


def get(s: MVCCStore, key: bytes, range_end: bytes = b"", **kw) -> pb.RangeResponse:
    return s.range(RR(key=key, range_end=range_end, **kw))


def grant(s: MVCCStore, *leases: int, ttl: int = 60) -> None:
    for lease in leases:
        s.lease_grant(pb.LeaseGrantRequest(ID=lease, TTL=ttl))


def delete(s: MVCCStore, key: bytes, range_end: bytes = b"", **kw) -> pb.DeleteRangeResponse:
    return s.delete_range(pb.DeleteRangeRequest(key=key, range_end=range_end, **kw))


def keys(resp: pb.RangeResponse) -> list[bytes]:
    return [kv.key for kv in resp.kvs]


def op_put(key: bytes, value: bytes = b"", **kw) -> pb.RequestOp:
    return pb.RequestOp(request_put=pb.PutRequest(key=key, value=value, **kw))


def op_get(key: bytes, range_end: bytes = b"", **kw) -> pb.RequestOp:
    return pb.RequestOp(request_range=RR(key=key, range_end=range_end, **kw))


def op_del(key: bytes, range_end: bytes = b"", **kw) -> pb.RequestOp:
    return pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=key, range_end=range_end, **kw))


def op_txn(compare=(), success=(), failure=()) -> pb.RequestOp:
    return pb.RequestOp(request_txn=pb.TxnRequest(compare=compare, success=success, failure=failure))


def txn(s: MVCCStore, compare=(), success=(), failure=()) -> pb.TxnResponse:
    return s.txn(pb.TxnRequest(compare=compare, success=success, failure=failure))


def raises(err: EtcdError, fn: Callable, *args, **kwargs) -> None:
    with pytest.raises(EtcdError) as info:
        fn(*args, **kwargs)
    assert info.value == err, f"got {info.value.message!r}, want {err.message!r}"


def rows(s: MVCCStore, table: str) -> int:
    return sum(1 for _ in s.backend.scan(table, b"", None))


def kvt(kv: kv_pb2.KeyValue) -> tuple:
    return (kv.key, kv.create_revision, kv.mod_revision, kv.version, kv.value, kv.lease)


class Recorder:
    """A store listener that keeps every (revision, events) call."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, list[kv_pb2.Event]]] = []

    def __call__(self, rev: int, events) -> None:
        self.calls.append((rev, [_copy_event(e) for e in events]))


def _copy_event(e: kv_pb2.Event) -> kv_pb2.Event:
    c = kv_pb2.Event()
    c.CopyFrom(e)
    return c


def sort_fixture(s: MVCCStore) -> None:
    """k1: create 2 mod 5 ver 2 "w"; k2: create 3 mod 7 ver 3 "u"; k3: create 4 mod 4 ver 1 "x".
    Every sort target orders these three differently."""
    put(s, b"k1", b"z")
    put(s, b"k2", b"y")
    put(s, b"k3", b"x")
    put(s, b"k1", b"w")
    put(s, b"k2", b"v")
    put(s, b"k2", b"u")
    assert s.revision == 7


# -- revisions and basic put ----------------------------------------------------
def test_new_store_is_at_revision_1(store: MVCCStore) -> None:
    assert store.revision == 1
    assert store.compact_revision == 0
    resp = get(store, *ALL)
    assert resp.header.revision == 1 and resp.count == 0 and not resp.kvs


def test_one_revision_per_put(store: MVCCStore) -> None:
    assert put(store, b"a", b"1").header.revision == 2
    assert put(store, b"b", b"2").header.revision == 3
    assert store.revision == 3
    (kv,) = get(store, b"a").kvs
    assert kvt(kv) == (b"a", 2, 2, 1, b"1", 0)


def test_version_counts_puts_and_recreate_restarts(store: MVCCStore) -> None:
    put(store, b"a", b"1")  # 2
    put(store, b"a", b"2")  # 3
    assert kvt(get(store, b"a").kvs[0]) == (b"a", 2, 3, 2, b"2", 0)
    delete(store, b"a")  # 4
    assert get(store, b"a").count == 0
    put(store, b"a", b"3")  # 5
    assert kvt(get(store, b"a").kvs[0]) == (b"a", 5, 5, 1, b"3", 0)


def test_put_prev_kv(store: MVCCStore) -> None:
    assert not put(store, b"a", b"1", prev_kv=True).HasField("prev_kv")
    resp = put(store, b"a", b"2", prev_kv=True)
    assert kvt(resp.prev_kv) == (b"a", 2, 2, 1, b"1", 0)
    assert not put(store, b"a", b"3").HasField("prev_kv")  # only when asked


def test_put_lease_is_stored(store: MVCCStore) -> None:
    grant(store, 42)
    put(store, b"a", b"1", lease=42)
    assert get(store, b"a").kvs[0].lease == 42
    put(store, b"a", b"2")  # a put without lease detaches
    assert get(store, b"a").kvs[0].lease == 0


def test_put_ignore_value(store: MVCCStore) -> None:
    raises(errors.KEY_NOT_FOUND, put, store, b"a", b"", ignore_value=True)
    assert store.revision == 1
    grant(store, 5, 6)
    put(store, b"a", b"keep", lease=5)
    resp = put(store, b"a", ignore_value=True, lease=6, prev_kv=True)
    assert resp.header.revision == 3 and resp.prev_kv.value == b"keep"
    assert kvt(get(store, b"a").kvs[0]) == (b"a", 2, 3, 2, b"keep", 6)


def test_put_ignore_lease(store: MVCCStore) -> None:
    raises(errors.KEY_NOT_FOUND, put, store, b"a", b"v", ignore_lease=True)
    assert store.revision == 1
    grant(store, 9)
    put(store, b"a", b"1", lease=9)
    put(store, b"a", b"2", ignore_lease=True)
    assert kvt(get(store, b"a").kvs[0]) == (b"a", 2, 3, 2, b"2", 9)


def test_put_needs_an_existing_lease(store: MVCCStore) -> None:
    grant(store, 1)
    put(store, b"a", b"1", lease=1)
    raises(errors.LEASE_NOT_FOUND, put, store, b"a", b"2", lease=2)
    raises(errors.LEASE_NOT_FOUND, txn, store, (), [op_put(b"b", lease=3)])
    assert store.revision == 2


def test_lease_grant_and_revoke(store: MVCCStore) -> None:
    rec = Recorder()
    store.add_listener(rec)
    resp = store.lease_grant(pb.LeaseGrantRequest(ID=7, TTL=30))
    assert (resp.ID, resp.TTL, resp.header.revision) == (7, 30, 1)  # no revision for a grant
    raises(errors.LEASE_EXISTS, store.lease_grant, pb.LeaseGrantRequest(ID=7, TTL=5))
    assert store.lease_ttl(7) == 30 and store.leases() == {7: 30} and store.lease_ttl(8) is None
    grant(store, 8)
    put(store, b"a", b"1", lease=7)  # 2
    put(store, b"b", b"1", lease=7)  # 3
    put(store, b"c", b"1", lease=8)  # 4
    put(store, b"b", b"2", lease=8)  # 5: b moves to lease 8
    put(store, b"d", b"1", lease=7)  # 6
    delete(store, b"d")  # 7: d no longer attached
    assert store.lease_keys(7) == [b"a"]
    assert store.lease_keys(8) == [b"b", b"c"]
    rec.calls.clear()
    out = store.lease_revoke(pb.LeaseRevokeRequest(ID=8))
    assert out.header.revision == 8 and store.revision == 8  # both keys in one revision
    assert [(rev, [(e.type, e.kv.key) for e in evs]) for rev, evs in rec.calls] == [
        (8, [(kv_pb2.Event.DELETE, b"b"), (kv_pb2.Event.DELETE, b"c")])]
    assert keys(get(store, *ALL)) == [b"a"]
    assert store.lease_ttl(8) is None and store.lease_keys(8) == []
    raises(errors.LEASE_NOT_FOUND, store.lease_revoke, pb.LeaseRevokeRequest(ID=8))
    # A lease with no keys goes without a revision.
    put(store, b"a", b"2")  # 9: detached from 7
    store.lease_revoke(pb.LeaseRevokeRequest(ID=7))
    assert store.revision == 9 and keys(get(store, *ALL)) == [b"a"] and store.leases() == {}


def test_leases_survive_reopen(make_store, reopen) -> None:
    store, path = make_store()
    grant(store, 11, ttl=15)
    put(store, b"k", b"v", lease=11)
    again = reopen(store, path)
    assert again.leases() == {11: 15} and again.lease_keys(11) == [b"k"]
    again.lease_revoke(pb.LeaseRevokeRequest(ID=11))
    assert get(again, b"k").count == 0


# -- range: which keys --------------------------------------------------------------
@pytest.mark.parametrize(
    "key, range_end, want",
    [
        (b"b", b"", [b"b"]),  # single key
        (b"bb", b"", []),  # missing single key
        (b"b", b"d", [b"b", b"c"]),  # half-open
        (b"b", b"\x00", [b"b", b"c", b"d"]),  # every key >= key
        (b"\x00", b"\x00", [b"a", b"b", b"c", b"d"]),  # everything
        (b"a", b"b", [b"a"]),  # prefix "a"
        (b"c", b"b", []),  # range_end < key
        (b"c", b"c", []),  # range_end == key
    ],
)
def test_range_key_forms(store: MVCCStore, key: bytes, range_end: bytes, want: list[bytes]) -> None:
    for k in (b"a", b"b", b"c", b"d"):
        put(store, k, k.upper())
    resp = get(store, key, range_end)
    assert keys(resp) == want
    assert resp.count == len(want) and not resp.more
    assert resp.header.revision == 5


def test_range_limit_more_count(store: MVCCStore) -> None:
    for i in range(5):
        put(store, b"k%d" % i, b"v")
    resp = get(store, b"k", b"l", limit=2)
    assert keys(resp) == [b"k0", b"k1"] and resp.more and resp.count == 5
    resp = get(store, b"k", b"l", limit=5)
    assert len(resp.kvs) == 5 and not resp.more and resp.count == 5
    resp = get(store, b"k", b"l", limit=0)
    assert len(resp.kvs) == 5 and not resp.more
    resp = get(store, b"k2", b"\x00", limit=1)
    assert keys(resp) == [b"k2"] and resp.more and resp.count == 3
    resp = get(store, b"k1", limit=1)
    assert keys(resp) == [b"k1"] and not resp.more and resp.count == 1


@pytest.mark.parametrize(
    "order, target, want",
    [
        (RR.NONE, RR.KEY, [b"k1", b"k2", b"k3"]),
        (RR.ASCEND, RR.KEY, [b"k1", b"k2", b"k3"]),
        (RR.DESCEND, RR.KEY, [b"k3", b"k2", b"k1"]),
        (RR.ASCEND, RR.VERSION, [b"k3", b"k1", b"k2"]),
        (RR.DESCEND, RR.VERSION, [b"k2", b"k1", b"k3"]),
        (RR.ASCEND, RR.CREATE, [b"k1", b"k2", b"k3"]),
        (RR.DESCEND, RR.CREATE, [b"k3", b"k2", b"k1"]),
        (RR.ASCEND, RR.MOD, [b"k3", b"k1", b"k2"]),
        (RR.DESCEND, RR.MOD, [b"k2", b"k1", b"k3"]),
        (RR.ASCEND, RR.VALUE, [b"k2", b"k1", b"k3"]),
        (RR.DESCEND, RR.VALUE, [b"k3", b"k1", b"k2"]),
        # etcd: order NONE with a non-KEY target sorts ascending.
        (RR.NONE, RR.VERSION, [b"k3", b"k1", b"k2"]),
        (RR.NONE, RR.CREATE, [b"k1", b"k2", b"k3"]),
        (RR.NONE, RR.MOD, [b"k3", b"k1", b"k2"]),
        (RR.NONE, RR.VALUE, [b"k2", b"k1", b"k3"]),
    ],
)
def test_range_sort(store: MVCCStore, order: int, target: int, want: list[bytes]) -> None:
    sort_fixture(store)
    resp = get(store, b"k", b"l", sort_order=order, sort_target=target)
    assert keys(resp) == want and resp.count == 3 and not resp.more
    # The limit applies after sorting all matches.
    resp = get(store, b"k", b"l", sort_order=order, sort_target=target, limit=2)
    assert keys(resp) == want[:2] and resp.more and resp.count == 3


def test_range_sort_ties_keep_key_order(store: MVCCStore) -> None:
    for k in (b"c", b"a", b"b"):
        put(store, k, b"same")
    resp = get(store, *ALL, sort_order=RR.ASCEND, sort_target=RR.VALUE)
    assert keys(resp) == [b"a", b"b", b"c"]


def test_range_keys_only_and_count_only(store: MVCCStore) -> None:
    sort_fixture(store)
    resp = get(store, b"k", b"l", keys_only=True)
    assert keys(resp) == [b"k1", b"k2", b"k3"]
    assert all(kv.value == b"" for kv in resp.kvs)
    assert kvt(resp.kvs[1]) == (b"k2", 3, 7, 3, b"", 0)
    resp = get(store, b"k", b"l", count_only=True)
    assert not resp.kvs and resp.count == 3 and not resp.more
    resp = get(store, b"k", b"l", count_only=True, limit=1)
    assert not resp.kvs and resp.count == 3 and not resp.more
    resp = get(store, b"k2", count_only=True)
    assert resp.count == 1 and not resp.kvs


@pytest.mark.parametrize(
    "bounds, want",
    [
        (dict(min_mod_revision=5), [b"k1", b"k2"]),
        (dict(max_mod_revision=5), [b"k1", b"k3"]),
        (dict(min_mod_revision=5, max_mod_revision=5), [b"k1"]),
        (dict(min_create_revision=3), [b"k2", b"k3"]),
        (dict(max_create_revision=3), [b"k1", b"k2"]),
        (dict(min_create_revision=3, max_create_revision=3), [b"k2"]),
        (dict(min_mod_revision=8), []),
    ],
)
def test_range_revision_filters(store: MVCCStore, bounds: dict, want: list[bytes]) -> None:
    sort_fixture(store)
    resp = get(store, b"k", b"l", **bounds)
    assert keys(resp) == want
    # etcd counts the keys in the range before the filters (etcd-io/etcd#18267).
    assert resp.count == 3
    assert not resp.more
    resp = get(store, b"k", b"l", limit=1, **bounds)
    assert keys(resp) == want[:1]
    assert resp.more == (len(want) > 1)


def test_range_filters_with_sort(store: MVCCStore) -> None:
    sort_fixture(store)
    resp = get(store, b"k", b"l", min_mod_revision=5, sort_order=RR.DESCEND, sort_target=RR.VERSION)
    assert keys(resp) == [b"k2", b"k1"]


# -- range: older revisions --------------------------------------------------------------
def test_range_at_revision(store: MVCCStore) -> None:
    sort_fixture(store)
    delete(store, b"k3")  # 8
    put(store, b"k4", b"new")  # 9
    at4 = get(store, b"k", b"l", revision=4)
    assert [kvt(kv) for kv in at4.kvs] == [
        (b"k1", 2, 2, 1, b"z", 0),
        (b"k2", 3, 3, 1, b"y", 0),
        (b"k3", 4, 4, 1, b"x", 0),
    ]
    assert at4.header.revision == 9  # header carries the current revision
    assert keys(get(store, b"k", b"l", revision=2)) == [b"k1"]
    assert keys(get(store, b"k", b"l", revision=1)) == []
    assert keys(get(store, b"k", b"l", revision=7)) == [b"k1", b"k2", b"k3"]
    assert keys(get(store, b"k", b"l", revision=8)) == [b"k1", b"k2"]
    assert keys(get(store, b"k", b"l", revision=9)) == [b"k1", b"k2", b"k4"]
    assert kvt(get(store, b"k3", revision=5).kvs[0]) == (b"k3", 4, 4, 1, b"x", 0)
    assert get(store, b"k3", revision=8).count == 0
    assert get(store, b"k2", revision=6).kvs[0].value == b"v"
    resp = get(store, b"k", b"l", revision=6, sort_order=RR.DESCEND, sort_target=RR.MOD, limit=1)
    assert keys(resp) == [b"k2"] and resp.count == 3 and resp.more


def test_range_future_revision(store: MVCCStore) -> None:
    put(store, b"a")
    raises(errors.FUTURE_REV, get, store, b"a", b"", revision=3)
    assert get(store, b"a", revision=2).count == 1
    assert get(store, b"a", revision=-1).count == 1  # <= 0 means current


def test_keys_with_zero_bytes_keep_their_history_apart(store: MVCCStore) -> None:
    tricky = [b"a", b"a\x00", b"a\x00\x00", b"a\x00\x01", b"a\x00\xff", b"a\x01", b"ab", b"\x00", b"\xff"]
    for k in tricky:
        put(store, k, b"1" + k)
    mid = store.revision
    for k in tricky:
        put(store, k, b"2" + k)
    delete(store, b"a\x00", b"a\x01")
    old = get(store, b"a", b"b", revision=mid)
    assert keys(old) == sorted(k for k in tricky if b"a" <= k < b"b")
    assert all(kv.value == b"1" + kv.key for kv in old.kvs)
    now = get(store, *ALL)
    assert keys(now) == sorted(k for k in tricky if not (b"a\x00" <= k < b"a\x01"))
    assert all(kv.value == b"2" + kv.key for kv in now.kvs)
    assert keys(get(store, b"a\x00", b"a\x00\x01", revision=mid)) == [b"a\x00", b"a\x00\x00"]


# -- delete_range ------------------------------------------------------------------------
def test_delete_range(store: MVCCStore) -> None:
    for k in (b"a", b"b", b"c", b"d"):
        put(store, k, k)
    resp = delete(store, b"b", b"d", prev_kv=True)
    assert resp.deleted == 2 and resp.header.revision == 6
    assert [kvt(kv) for kv in resp.prev_kvs] == [(b"b", 3, 3, 1, b"b", 0), (b"c", 4, 4, 1, b"c", 0)]
    assert keys(get(store, *ALL)) == [b"a", b"d"]
    resp = delete(store, b"a")
    assert resp.deleted == 1 and not resp.prev_kvs and resp.header.revision == 7
    resp = delete(store, b"\x00", b"\x00")
    assert resp.deleted == 1 and store.revision == 8
    assert get(store, *ALL).count == 0


def test_delete_nothing_does_not_bump_revision(store: MVCCStore) -> None:
    put(store, b"a")
    rec = Recorder()
    store.add_listener(rec)
    for key, end in ((b"zz", b""), (b"b", b"c"), (b"c", b"b"), (b"b", b"\x00")):
        resp = delete(store, key, end)
        assert resp.deleted == 0 and resp.header.revision == 2
    assert store.revision == 2 and rec.calls == []


def test_delete_gte_form(store: MVCCStore) -> None:
    for k in (b"a", b"b", b"c"):
        put(store, k)
    assert delete(store, b"b", b"\x00").deleted == 2
    assert keys(get(store, *ALL)) == [b"a"]


def test_delete_of_many_keys_takes_exactly_the_range(store: MVCCStore) -> None:
    """Enough keys for a backend to clear `kv` with one range op: the keys
    around the range (its end itself, the key just past the last one
    deleted) stay, history before the delete still reads, and each deleted
    key gets its own event."""
    inside = [b"m%03d" % i for i in range(100)] + [b"m099\x00\x00"]
    end = b"m099\x00\x00\x00"  # the key right after the last one deleted
    outside = [b"l", b"m", end, b"n"]
    for k in outside + inside:
        put(store, k, b"v" + k)
    before = store.revision
    rec = Recorder()
    store.add_listener(rec)
    resp = delete(store, b"m000", end)
    assert resp.deleted == len(inside) and resp.header.revision == before + 1
    assert keys(get(store, *ALL)) == sorted(outside)
    old = get(store, b"m000", end, revision=before)
    assert keys(old) == sorted(inside) and all(kv.value == b"v" + kv.key for kv in old.kvs)
    assert [(rev, e.type, e.kv.key) for rev, events in rec.calls for e in events] == [
        (before + 1, kv_pb2.Event.DELETE, k) for k in sorted(inside)]
    # every key written again after it: a fresh key (version 1) each
    for k in inside:
        put(store, k, b"w")
    assert [kv.version for kv in get(store, b"m000", end).kvs] == [1] * len(inside)


def test_txn_put_then_delete_of_many_keys_and_put_again(store: MVCCStore) -> None:
    """In one txn: a key put before a big DeleteRange goes with it, one
    put after it in its range stays."""
    for i in range(100):
        put(store, b"k%03d" % i)
    put(store, b"z")
    resp = store.txn(pb.TxnRequest(success=[
        op_put(b"k0500"), op_del(b"k", b"l"), op_put(b"k050", b"back"), op_put(b"k200")]))
    assert resp.succeeded and resp.responses[1].response_delete_range.deleted == 101
    now = get(store, *ALL)
    assert keys(now) == [b"k050", b"k200", b"z"]
    assert now.kvs[0].value == b"back" and now.kvs[0].version == 1


# -- txn ------------------------------------------------------------------------------------
_FIELD = {C.VERSION: "version", C.CREATE: "create_revision", C.MOD: "mod_revision", C.VALUE: "value", C.LEASE: "lease"}


def _cmp(key: bytes, target: int, result: int, value, range_end: bytes = b"") -> pb.Compare:
    return C(key=key, range_end=range_end, target=target, result=result, **{_FIELD[target]: value})


# k: create 2, mod 3, version 2, value "m", lease 7
_ACTUAL = {C.VERSION: 2, C.CREATE: 2, C.MOD: 3, C.VALUE: b"m", C.LEASE: 7}
_BELOW = {C.VERSION: 1, C.CREATE: 1, C.MOD: 2, C.VALUE: b"l", C.LEASE: 6}
_ABOVE = {C.VERSION: 3, C.CREATE: 3, C.MOD: 4, C.VALUE: b"n", C.LEASE: 8}
_EXPECT = {  # result -> (vs actual, vs below, vs above)
    C.EQUAL: (True, False, False),
    C.NOT_EQUAL: (False, True, True),
    C.GREATER: (False, True, False),
    C.LESS: (False, False, True),
}


@pytest.mark.parametrize("target", list(_FIELD))
@pytest.mark.parametrize("result", list(_EXPECT))
def test_txn_compare_result_and_target(store: MVCCStore, target: int, result: int) -> None:
    grant(store, 7)
    put(store, b"k", b"m", lease=7)
    put(store, b"k", b"m", lease=7)
    for operand, want in zip((_ACTUAL, _BELOW, _ABOVE), _EXPECT[result]):
        resp = txn(store, [_cmp(b"k", target, result, operand[target])], [op_get(b"k")], [op_get(b"nope")])
        assert resp.succeeded is want, (operand[target], want)
        assert resp.responses[0].response_range.count == (1 if want else 0)
    assert store.revision == 3  # read-only txns do not bump the revision


@pytest.mark.parametrize(
    "target, result, value, want",
    [
        (C.VERSION, C.EQUAL, 0, True),
        (C.CREATE, C.EQUAL, 0, True),
        (C.MOD, C.EQUAL, 0, True),
        (C.LEASE, C.EQUAL, 0, True),
        (C.VERSION, C.GREATER, 0, False),
        (C.MOD, C.LESS, 1, True),
        # A VALUE compare on a missing key always fails.
        (C.VALUE, C.EQUAL, b"", False),
        (C.VALUE, C.NOT_EQUAL, b"x", False),
        (C.VALUE, C.LESS, b"x", False),
    ],
)
def test_txn_compare_missing_key(store: MVCCStore, target: int, result: int, value, want: bool) -> None:
    put(store, b"other", b"x")
    assert txn(store, [_cmp(b"missing", target, result, value)]).succeeded is want


def test_txn_compare_target_union_mismatch_counts_as_zero(store: MVCCStore) -> None:
    put(store, b"k", b"v")
    c = C(key=b"k", target=C.VERSION, result=C.GREATER, create_revision=100)
    assert txn(store, [c]).succeeded  # version 1 > 0, the create_revision is ignored


def test_txn_range_compare(store: MVCCStore) -> None:
    put(store, b"r1", b"a")
    put(store, b"r2", b"b")
    put(store, b"r2", b"b")
    put(store, b"s", b"zzz")

    def ok(*cmps: pb.Compare) -> bool:
        return txn(store, list(cmps)).succeeded

    assert ok(_cmp(b"r", C.VERSION, C.GREATER, 0, range_end=b"s"))
    assert not ok(_cmp(b"r", C.VERSION, C.EQUAL, 1, range_end=b"s"))  # r2 has version 2
    assert ok(_cmp(b"r", C.VERSION, C.LESS, 3, range_end=b"s"))
    assert ok(_cmp(b"r", C.VALUE, C.LESS, b"c", range_end=b"s"))
    assert not ok(_cmp(b"r", C.VALUE, C.LESS, b"c", range_end=b"\x00"))  # includes "s"
    assert ok(_cmp(b"r", C.MOD, C.LESS, 5, range_end=b"s"), _cmp(b"s", C.MOD, C.EQUAL, 5))
    # No key in range: compares as a zero KeyValue, VALUE fails.
    assert ok(_cmp(b"x", C.VERSION, C.EQUAL, 0, range_end=b"y"))
    assert ok(_cmp(b"x", C.CREATE, C.EQUAL, 0, range_end=b"\x00"))
    assert not ok(_cmp(b"x", C.VALUE, C.EQUAL, b"", range_end=b"y"))
    # All compares must hold.
    assert not ok(_cmp(b"r1", C.VERSION, C.EQUAL, 1), _cmp(b"r2", C.VERSION, C.EQUAL, 1))


def test_txn_branches_and_responses_in_order(store: MVCCStore) -> None:
    put(store, b"a", b"1")  # 2
    put(store, b"b", b"2")  # 3
    success = [op_get(b"a"), op_put(b"c", b"3", prev_kv=True), op_del(b"b", prev_kv=True), op_get(b"\x00", b"\x00")]
    failure = [op_get(b"b")]
    resp = txn(store, [_cmp(b"a", C.VALUE, C.EQUAL, b"1")], success, failure)
    assert resp.succeeded and resp.header.revision == 4
    kinds = [r.WhichOneof("response") for r in resp.responses]
    assert kinds == ["response_range", "response_put", "response_delete_range", "response_range"]
    r0, r1, r2, r3 = resp.responses
    assert keys(r0.response_range) == [b"a"] and r0.response_range.header.revision == 3
    assert not r1.response_put.HasField("prev_kv") and r1.response_put.header.revision == 4
    assert r2.response_delete_range.deleted == 1 and r2.response_delete_range.prev_kvs[0].value == b"2"
    # Reads inside a txn see the txn's earlier writes.
    assert keys(r3.response_range) == [b"a", b"c"] and r3.response_range.header.revision == 4
    assert r3.response_range.kvs[1].mod_revision == 4

    resp = txn(store, [_cmp(b"a", C.VALUE, C.EQUAL, b"nope")], success, failure)
    assert not resp.succeeded and resp.header.revision == 4
    assert [r.WhichOneof("response") for r in resp.responses] == ["response_range"]
    assert resp.responses[0].response_range.count == 0
    assert store.revision == 4


def test_txn_one_revision_with_sub_revisions(store: MVCCStore) -> None:
    put(store, b"x", b"old")
    rec = Recorder()
    store.add_listener(rec)
    resp = txn(store, [], [op_put(b"c", b"1"), op_put(b"a", b"2"), op_del(b"x"), op_put(b"b", b"3")])
    assert resp.header.revision == 3 and store.revision == 3
    assert [kv.mod_revision for kv in get(store, *ALL).kvs] == [3, 3, 3]
    assert len(rec.calls) == 1
    rev, events = rec.calls[0]
    assert rev == 3
    assert [(e.type, e.kv.key) for e in events] == [
        (kv_pb2.Event.PUT, b"c"),
        (kv_pb2.Event.PUT, b"a"),
        (kv_pb2.Event.DELETE, b"x"),
        (kv_pb2.Event.PUT, b"b"),
    ]


def test_txn_read_your_writes_and_revision_reads(store: MVCCStore) -> None:
    put(store, b"k", b"v1")  # 2
    resp = txn(
        store,
        [],
        [
            op_get(b"k"),
            op_put(b"k", b"v2"),
            op_get(b"k"),
            op_get(b"k", revision=2),
            op_del(b"k"),
            op_get(b"k"),
            op_put(b"n", b"x"),
        ],
    )
    r = [x.response_range for x in resp.responses if x.WhichOneof("response") == "response_range"]
    assert r[0].kvs[0].value == b"v1" and r[0].header.revision == 2
    assert kvt(r[1].kvs[0]) == (b"k", 2, 3, 2, b"v2", 0) and r[1].header.revision == 3
    assert r[2].kvs[0].value == b"v1"  # an explicit revision reads committed history
    assert r[3].count == 0
    assert store.revision == 3 and get(store, b"k").count == 0


def test_txn_range_revision_checked_before_applying(store: MVCCStore) -> None:
    put(store, b"a")
    raises(errors.FUTURE_REV, txn, store, [], [op_put(b"b"), op_get(b"a", revision=3)])
    assert store.revision == 2 and get(store, b"b").count == 0


def test_txn_nested(store: MVCCStore) -> None:
    put(store, b"flag", b"on")  # 2
    inner = op_txn(
        # Evaluated against the state before the outer txn (etcd decides every
        # branch first): "a" does not exist yet although the outer txn put it.
        [_cmp(b"a", C.VERSION, C.EQUAL, 0)],
        [op_put(b"then", b"t"), op_get(b"a")],
        [op_put(b"else", b"e")],
    )
    resp = txn(store, [_cmp(b"flag", C.VALUE, C.EQUAL, b"on")], [op_put(b"a", b"1"), inner], [op_put(b"outer-else")])
    assert resp.succeeded and resp.header.revision == 3
    nested = resp.responses[1].response_txn
    assert resp.responses[1].WhichOneof("response") == "response_txn"
    assert nested.succeeded
    assert [r.WhichOneof("response") for r in nested.responses] == ["response_put", "response_range"]
    assert keys(nested.responses[1].response_range) == [b"a"]  # reads do see earlier writes
    assert keys(get(store, *ALL)) == [b"a", b"flag", b"then"]

    # Nested txn in the failure branch, taking its own failure branch.
    resp = txn(
        store,
        [_cmp(b"flag", C.VALUE, C.EQUAL, b"off")],
        [op_put(b"x")],
        [op_txn([_cmp(b"then", C.VALUE, C.EQUAL, b"zzz")], [op_put(b"y")], [op_put(b"z"), op_txn()])],
    )
    assert not resp.succeeded
    nested = resp.responses[0].response_txn
    assert not nested.succeeded
    assert nested.responses[1].WhichOneof("response") == "response_txn"
    assert keys(get(store, *ALL)) == [b"a", b"flag", b"then", b"z"]
    assert store.revision == 4


def test_txn_failure_applies_nothing(store: MVCCStore) -> None:
    put(store, b"b", b"1")  # 2
    rec = Recorder()
    store.add_listener(rec)
    before = get(store, *ALL)
    # Detected before applying: ignore_value on a key missing before the txn.
    raises(errors.KEY_NOT_FOUND, txn, store, [], [op_put(b"a", b"1"), op_put(b"zz", ignore_value=True)])
    # Only detectable while applying: the key is deleted earlier in the txn
    # (validation would reject this txn; the store must still stay atomic).
    raises(errors.KEY_NOT_FOUND, txn, store, [], [op_put(b"a", b"1"), op_del(b"b"), op_put(b"b", ignore_lease=True)])
    raises(
        errors.KEY_NOT_FOUND, txn, store, [], [op_put(b"a", b"1"), op_txn([], [op_put(b"c", ignore_value=True)])]
    )
    assert store.revision == 2 and rec.calls == []
    assert get(store, *ALL) == before
    assert rows(store, "rev") == 1


def test_txn_same_key_twice_unvalidated(store: MVCCStore) -> None:
    """Validation forbids it, but the store must still keep exact history."""
    rec = Recorder()
    store.add_listener(rec)
    txn(store, [], [op_put(b"k", b"1"), op_put(b"k", b"2")])
    assert kvt(get(store, b"k").kvs[0]) == (b"k", 2, 2, 2, b"2", 0)
    replay = list(store.events_since(2, b"k"))
    assert replay == rec.calls


# -- compaction ---------------------------------------------------------------------------------
def _history(s: MVCCStore) -> None:
    """Writes, overwrites, deletes and re-creates over revisions 2..13."""
    put(s, b"a", b"a1")  # 2
    put(s, b"b", b"b1")  # 3
    put(s, b"a", b"a2")  # 4
    delete(s, b"b")  # 5
    put(s, b"c", b"c1")  # 6
    txn(s, [], [op_put(b"a", b"a3"), op_put(b"d", b"d1")])  # 7
    put(s, b"b", b"b2")  # 8
    delete(s, b"c")  # 9
    put(s, b"e", b"e1")  # 10
    put(s, b"a", b"a4")  # 11
    delete(s, b"d")  # 12
    put(s, b"b", b"b3")  # 13


def _snapshot(s: MVCCStore, rev: int) -> list[tuple]:
    return [kvt(kv) for kv in get(s, *ALL, revision=rev).kvs]


def test_compact_errors(store: MVCCStore) -> None:
    raises(errors.COMPACTED, store.compact, pb.CompactionRequest(revision=0))
    raises(errors.FUTURE_REV, store.compact, pb.CompactionRequest(revision=2))
    put(store, b"a")
    put(store, b"a")
    assert store.compact(pb.CompactionRequest(revision=2)).header.revision == 3
    raises(errors.COMPACTED, store.compact, pb.CompactionRequest(revision=2))
    raises(errors.COMPACTED, store.compact, pb.CompactionRequest(revision=1))
    raises(errors.FUTURE_REV, store.compact, pb.CompactionRequest(revision=4))
    store.compact(pb.CompactionRequest(revision=3))
    assert store.compact_revision == 3 and store.revision == 3


@pytest.mark.parametrize("at", [2, 5, 7, 9, 12, 13])
def test_compaction_keeps_answers_at_and_after(store: MVCCStore, at: int) -> None:
    _history(store)
    cur = store.revision
    before = {rev: _snapshot(store, rev) for rev in range(1, cur + 1)}
    per_key = {(k, rev): get(store, k, revision=rev) for k in (b"a", b"b", b"c", b"d", b"e") for rev in range(1, cur + 1)}
    rec = Recorder()
    store.add_listener(rec)
    store.compact(pb.CompactionRequest(revision=at))
    assert store.revision == cur and store.compact_revision == at and rec.calls == []
    for rev in range(1, cur + 1):
        if rev < at:
            raises(errors.COMPACTED, get, store, b"\x00", b"\x00", revision=rev)
            raises(errors.COMPACTED, get, store, b"a", b"", revision=rev)
        else:
            assert _snapshot(store, rev) == before[rev], rev
            for k in (b"a", b"b", b"c", b"d", b"e"):
                assert get(store, k, revision=rev) == per_key[(k, rev)]
    assert _snapshot(store, 0) == before[cur]


def compact_physically(store: MVCCStore, rev: int) -> None:
    """Record a compaction and wait for the background compactor to finish it."""
    store.compact(pb.CompactionRequest(revision=rev))
    assert store.wait_compacted(rev, timeout=30)


def test_compaction_reclaims_history(store: MVCCStore) -> None:
    _history(store)
    hist, revs = rows(store, "hist"), rows(store, "rev")
    assert hist > 0 and revs == 13
    compact_physically(store, 9)
    mid_hist, mid_revs = rows(store, "hist"), rows(store, "rev")
    assert mid_hist < hist and mid_revs == 5  # revisions 9..13 remain (9: a watch may start there)
    # At 9 only "b" (b2 at 8, current b3 at 13) still needs an old version.
    assert [kvt(kv) for kv in get(store, b"b", revision=9).kvs] == [(b"b", 8, 8, 1, b"b2", 0)]
    assert mid_hist == 1 + 1 + 2  # b2; a3 (a4 at 11); d1 + its tombstone at 12
    used_before = store.db_size()[1]
    compact_physically(store, 13)
    assert rows(store, "hist") == 0 and rows(store, "rev") == 1  # revision 13's change
    assert store.db_size()[1] < used_before
    assert _snapshot(store, 13) == _snapshot(store, 0)


def test_compaction_keeps_deleted_keys_visible_at_compact_revision(store: MVCCStore) -> None:
    put(store, b"gone", b"v")  # 2
    put(store, b"x", b"1")  # 3
    delete(store, b"gone")  # 4
    store.compact(pb.CompactionRequest(revision=3))
    assert keys(get(store, *ALL, revision=3)) == [b"gone", b"x"]
    compact_physically(store, 4)
    assert keys(get(store, *ALL, revision=4)) == [b"x"]
    assert rows(store, "hist") == 0


def test_compaction_survives_reopen(make_store, reopen) -> None:
    store, path = make_store()
    _history(store)
    store.compact(pb.CompactionRequest(revision=7))
    expected = {rev: _snapshot(store, rev) for rev in range(7, 14)}
    again = reopen(store, path)
    assert again.compact_revision == 7 and again.revision == 13
    raises(errors.COMPACTED, get, again, b"a", b"", revision=6)
    assert {rev: _snapshot(again, rev) for rev in range(7, 14)} == expected
    raises(errors.COMPACTED, again.compact, pb.CompactionRequest(revision=7))


def test_interrupted_compaction_finishes_on_reopen(make_store, reopen, monkeypatch) -> None:
    import metastore.mvcc as mvcc_module
    from metastore.mvcc_compact import next_compaction_batch

    store, path = make_store()
    for i in range(30):
        put(store, b"k%d" % (i % 3), b"%d" % i)
    expected = _snapshot(store, 25)

    crashed = threading.Event()
    calls = []

    def crashing(backend, target, chunk=0, start=b"", reclaimed=None):
        calls.append(target)
        if len(calls) > 1:
            crashed.set()
            raise RuntimeError("simulated crash in the middle of a compaction")
        return next_compaction_batch(backend, target, chunk=5, start=start, reclaimed=reclaimed)

    monkeypatch.setattr(mvcc_module, "next_compaction_batch", crashing)
    store.compact(pb.CompactionRequest(revision=25))
    assert crashed.wait(10)
    assert not store.wait_compacted(25, timeout=0.2)
    assert rows(store, "rev") > 6  # only partly done
    assert _snapshot(store, 25) == expected  # and invisible to reads
    monkeypatch.undo()
    again = reopen(store, path)
    assert again.compact_revision == 25
    assert again.wait_compacted(25, timeout=0)  # finished before the store opened
    assert rows(again, "rev") == 7  # revisions 25..31
    assert _snapshot(again, 25) == expected
    # Per key: its version at 25 and the one superseded after 25.
    assert rows(again, "hist") == 3 * 2


def test_compaction_runs_beside_writes(store: MVCCStore, monkeypatch) -> None:
    """Writes applied while a compaction is half done land, stay readable,
    and the compaction still ends with exactly what it must keep."""
    import types

    import metastore.mvcc as mvcc_module
    import metastore.mvcc_compact as compact_module

    for i in range(200):
        put(store, b"k%03d" % (i % 50), b"v%d" % i)
    target = store.revision - 10
    paused, go_on = threading.Event(), threading.Event()

    def pause(_seconds: float) -> None:  # the compactor's pause between two batches
        paused.set()
        assert go_on.wait(10)

    monkeypatch.setattr(compact_module, "time", types.SimpleNamespace(sleep=pause))
    real = compact_module.next_compaction_batch
    monkeypatch.setattr(mvcc_module, "next_compaction_batch",
                        lambda b, rev, chunk=0, start=b"", reclaimed=None: real(b, rev, chunk=20, start=start,
                                                                                reclaimed=reclaimed))
    expected_at_target = _snapshot(store, target)
    store.compact(pb.CompactionRequest(revision=target))
    assert paused.wait(10)
    assert 10 < rows(store, "rev") < 200  # one batch done, more to do
    # Meanwhile the apply side goes on: the compactor holds no lock between batches.
    for i in range(20):
        put(store, b"k%03d" % i, b"late%d" % i)
    go_on.set()
    assert store.wait_compacted(target, timeout=30)
    assert _snapshot(store, target) == expected_at_target
    assert [kv.value for kv in get(store, b"k000").kvs] == [b"late0"]
    # Exactly the rows a one-shot compaction keeps: the rev rows from target on.
    assert rows(store, "rev") == store.revision - target + 1


def test_new_compaction_while_the_walk_is_among_the_old_targets_rows(make_store, monkeypatch) -> None:
    """A DeleteRange at the compaction target lists many keys at that one
    revision; the walk goes over them a chunk at a time. A newer compaction
    recorded meanwhile must still drop those rows (they are below it now):
    the store ends with exactly what compacting once at the newer revision
    leaves."""
    import types

    import metastore.mvcc as mvcc_module
    import metastore.mvcc_compact as compact_module
    from metastore.mvcc_layout import pack_rev

    a, _ = make_store()
    b, _ = make_store()
    for s in (a, b):
        for i in range(60):
            put(s, b"k%02d" % (i % 40), b"v%d" % i)
        delete(s, b"k", b"l")  # 40 keys at one revision
        for i in range(5):
            put(s, b"k%02d" % i, b"again%d" % i)
    first = a.revision - 5  # the DeleteRange's revision
    second = a.revision - 1
    in_target_rows, go_on = threading.Event(), threading.Event()

    def pause(_seconds: float) -> None:  # the compactor's pause between two batches
        if a._compact_cursor > pack_rev(first, 0) and not in_target_rows.is_set():
            in_target_rows.set()
            assert go_on.wait(10)

    monkeypatch.setattr(compact_module, "time", types.SimpleNamespace(sleep=pause))
    real = compact_module.next_compaction_batch
    monkeypatch.setattr(mvcc_module, "next_compaction_batch",
                        lambda backend, rev, chunk=0, start=b"", reclaimed=None: real(
                            backend, rev, chunk=7, start=start, reclaimed=reclaimed))
    a.compact(pb.CompactionRequest(revision=first))
    assert in_target_rows.wait(10)  # part of the DeleteRange's rows walked
    a.compact(pb.CompactionRequest(revision=second))
    go_on.set()
    b.compact(pb.CompactionRequest(revision=second))
    assert a.wait_compacted(second, timeout=30) and b.wait_compacted(second, timeout=30)
    assert rows(a, "rev") == rows(b, "rev") == a.revision - second + 1
    assert rows(a, "hist") == rows(b, "hist")
    assert a.hash_kv(0) == b.hash_kv(0)
    assert a.hash_backend() == b.hash_backend()


def test_a_key_put_below_the_target_and_deleted_at_it_is_looked_at_once(make_store, monkeypatch) -> None:
    """A prefix delete at the compaction target: the walk meets each key at
    its put and again at the delete; the second look would find nothing
    (ReclaimedKeys). The result is the same as looking twice."""
    import metastore.mvcc_compact as compact_module

    looked: list[int] = []
    real = compact_module.scan_ranges

    def counting(backend, table, ranges):
        ranges = list(ranges)
        looked.append(len(ranges))
        return real(backend, table, ranges)

    monkeypatch.setattr(compact_module, "scan_ranges", counting)
    twice, _ = make_store()
    once, _ = make_store()
    for s in (twice, once):
        for i in range(100):
            put(s, b"p%03d" % i, b"v")
        put(s, b"p007", b"again")  # one key with history below the target too
        delete(s, b"p", b"q")
    target = once.revision
    monkeypatch.setattr(compact_module.ReclaimedKeys, "MAX_KEYS", 0)  # remembers nothing
    twice.compact(pb.CompactionRequest(revision=target))
    assert twice.wait_compacted(target, timeout=30)
    looked_twice = sum(looked)
    looked.clear()
    monkeypatch.setattr(compact_module.ReclaimedKeys, "MAX_KEYS", 500_000)
    once.compact(pb.CompactionRequest(revision=target))
    assert once.wait_compacted(target, timeout=30)
    assert looked_twice == 200 and sum(looked) == 100
    assert rows(once, "hist") == rows(twice, "hist") == 0
    assert once.hash_kv(0) == twice.hash_kv(0)
    assert once.hash_backend() == twice.hash_backend()


def test_remembered_keys_written_between_batches_and_a_failed_write(make_store, monkeypatch) -> None:
    """Writes between two batches of a compaction, to keys it has already
    reclaimed (re-created, overwritten, deleted again), and a batch whose
    write fails once: the store ends with the rows of one that compacted
    looking at every key twice, then took the same writes."""
    import types

    import metastore.mvcc as mvcc_module
    import metastore.mvcc_compact as compact_module

    def fill(s: MVCCStore) -> None:
        for i in range(60):
            put(s, b"p%03d" % i, b"v")
        for i in range(10):
            put(s, b"x%03d" % i, b"v")  # stay live, current record below the target
        put(s, b"p007", b"again")
        delete(s, b"p", b"q")

    def writes(s: MVCCStore) -> None:
        put(s, b"p000", b"back")  # re-created
        put(s, b"p001", b"back")
        put(s, b"p001", b"twice")
        put(s, b"x001", b"newer")  # its record below the target moves into history
        delete(s, b"x002")
        delete(s, b"p001")

    looked_at_every_key, _ = make_store()
    remembered, _ = make_store()
    for s in (looked_at_every_key, remembered):
        fill(s)
    target = remembered.revision
    real = compact_module.next_compaction_batch
    monkeypatch.setattr(mvcc_module, "next_compaction_batch",
                        lambda backend, rev, chunk=0, start=b"", reclaimed=None: real(
                            backend, rev, chunk=9, start=start, reclaimed=reclaimed))
    monkeypatch.setattr(compact_module.ReclaimedKeys, "MAX_KEYS", 0)
    looked_at_every_key.compact(pb.CompactionRequest(revision=target))
    assert looked_at_every_key.wait_compacted(target, timeout=30)
    writes(looked_at_every_key)

    monkeypatch.setattr(compact_module.ReclaimedKeys, "MAX_KEYS", 500_000)
    pauses = []

    def pause(_seconds: float) -> None:  # the compactor between two batches (or after a failure)
        pauses.append(1)
        if len(pauses) == 3:
            writes(remembered)

    monkeypatch.setattr(compact_module, "time", types.SimpleNamespace(sleep=pause))
    backend = remembered.backend
    real_write, compactor_writes = backend.write, []

    def failing_once(batch):
        if threading.current_thread().name == "metastore-compactor":
            compactor_writes.append(1)
            if len(compactor_writes) == 2:
                raise OSError(28, "No space left on device")
        return real_write(batch)

    monkeypatch.setattr(backend, "write", failing_once)
    remembered.compact(pb.CompactionRequest(revision=target))
    assert remembered.wait_compacted(target, timeout=30)
    assert len(pauses) > 3 and len(compactor_writes) > 2  # writes landed mid-walk, one write failed
    assert remembered.revision == looked_at_every_key.revision
    assert remembered.hash_kv(0) == looked_at_every_key.hash_kv(0)
    assert remembered.hash_backend() == looked_at_every_key.hash_backend()


def test_hash_waits_for_compaction(make_store) -> None:
    a, _ = make_store()
    b, _ = make_store()
    for s in (a, b):
        for i in range(300):
            put(s, b"k%d" % (i % 7), b"v%d" % i)
    b.compact(pb.CompactionRequest(revision=250))
    a.compact(pb.CompactionRequest(revision=250))
    # Right away, whatever each compactor has done so far.
    assert a.hash_kv(0) == b.hash_kv(0)
    assert a.hash_backend() == b.hash_backend()


# -- events ---------------------------------------------------------------------------------------
def test_events_for_each_request(store: MVCCStore) -> None:
    rec = Recorder()
    store.add_listener(rec)
    grant(store, 3)
    put(store, b"a", b"1", lease=3)  # 2
    put(store, b"a", b"2")  # 3
    delete(store, b"a")  # 4
    put(store, b"b", b"1")
    put(store, b"c", b"1")  # 6
    delete(store, b"a", b"z")  # 7: b and c in one call
    assert [rev for rev, _ in rec.calls] == [2, 3, 4, 5, 6, 7]
    (e2,), (e3,), (e4,) = (evs for _, evs in rec.calls[:3])
    assert e2.type == kv_pb2.Event.PUT and kvt(e2.kv) == (b"a", 2, 2, 1, b"1", 3) and not e2.HasField("prev_kv")
    assert kvt(e3.kv) == (b"a", 2, 3, 2, b"2", 0) and kvt(e3.prev_kv) == (b"a", 2, 2, 1, b"1", 3)
    assert e4.type == kv_pb2.Event.DELETE
    assert kvt(e4.kv) == (b"a", 0, 4, 0, b"", 0)
    assert kvt(e4.prev_kv) == (b"a", 2, 3, 2, b"2", 0)
    _, e7 = rec.calls[5]
    assert [(e.type, e.kv.key, e.kv.mod_revision, e.prev_kv.key) for e in e7] == [
        (kv_pb2.Event.DELETE, b"b", 7, b"b"),
        (kv_pb2.Event.DELETE, b"c", 7, b"c"),
    ]


def test_listener_error_does_not_break_writes(store: MVCCStore) -> None:
    def bad(rev, events):
        raise RuntimeError("boom")

    rec = Recorder()
    store.add_listener(bad)
    store.add_listener(rec)
    put(store, b"a")
    assert store.revision == 2 and len(rec.calls) == 1
    store.remove_listener(bad)


def test_events_since_replays_history(store: MVCCStore) -> None:
    rec = Recorder()
    store.add_listener(rec)
    _history(store)
    assert list(store.events_since(1, *ALL)) == rec.calls
    assert list(store.events_since(7, *ALL)) == [c for c in rec.calls if c[0] >= 7]
    assert list(store.events_since(5, *ALL, end_revision=8)) == [c for c in rec.calls if 5 <= c[0] <= 8]
    only_a = [(rev, [e for e in evs if e.kv.key == b"a"]) for rev, evs in rec.calls]
    assert list(store.events_since(1, b"a")) == [c for c in only_a if c[1]]
    b_to_d = [(rev, [e for e in evs if b"b" <= e.kv.key < b"d"]) for rev, evs in rec.calls]
    assert list(store.events_since(1, b"b", b"d")) == [c for c in b_to_d if c[1]]
    assert list(store.events_since(14, *ALL)) == []

    store.compact(pb.CompactionRequest(revision=9))
    raises(errors.COMPACTED, store.events_since, 8, *ALL)
    raises(errors.COMPACTED, store.events_since, 3, *ALL)
    # What follows the compaction replays exactly, prev_kv included.
    assert list(store.events_since(10, *ALL)) == [c for c in rec.calls if c[0] >= 10]
    # etcd lets a watch start at the compacted revision itself. A delete made
    # there is gone with the compaction (etcd drops such tombstones too)...
    assert list(store.events_since(9, *ALL)) == [c for c in rec.calls if c[0] >= 10]
    # ...a put made there replays (its prev_kv may be gone, as in etcd).
    store.compact(pb.CompactionRequest(revision=10))
    at10 = [(rev, [(e.type, e.kv) for e in evs]) for rev, evs in store.events_since(10, *ALL, end_revision=10)]
    assert at10 == [(rev, [(e.type, e.kv) for e in evs]) for rev, evs in rec.calls if rev == 10] and at10


def test_events_since_in_chunks(store: MVCCStore, monkeypatch) -> None:
    import metastore.mvcc as mvcc_module

    monkeypatch.setattr(mvcc_module, "REPLAY_ROWS", 2)
    rec = Recorder()
    store.add_listener(rec)
    for i in range(10):
        txn(store, [], [op_put(b"x%d" % i), op_put(b"y%d" % i), op_put(b"z%d" % i)])
    assert list(store.events_since(1, *ALL)) == rec.calls


def test_listener_events_are_built_on_demand(store: MVCCStore) -> None:
    """Listeners get every key at once, but an event is only built when read
    (a DeleteRange of many keys nobody watches builds none)."""
    from metastore.mvcc_events import LazyEvents, event_keys

    seen = []
    store.add_listener(lambda rev, evs: seen.append((rev, evs)))
    txn(store, [], [op_put(b"a", b"1"), op_put(b"b", b"2"), op_put(b"c", b"3")])
    delete(store, b"a", b"z")
    rev, evs = seen[-1]
    assert isinstance(evs, LazyEvents) and event_keys(evs) == [b"a", b"b", b"c"] and len(evs) == 3
    assert evs._built == [None, None, None]
    second = evs[1]
    assert evs._built[0] is None and evs._built[1] is second and evs[1] is second
    assert second.type == kv_pb2.Event.DELETE and second.kv.mod_revision == rev == 3
    assert second.prev_kv.value == b"2" and second.prev_kv.mod_revision == 2
    assert [e.kv.key for e in evs[0:3:2]] == [b"a", b"c"]
    # Built later, the events are the ones history replays.
    assert list(store.events_since(3, *ALL)) == [(3, list(evs))]


def test_events_since_stops_when_compaction_overtakes(store: MVCCStore, monkeypatch) -> None:
    import metastore.mvcc as mvcc_module

    monkeypatch.setattr(mvcc_module, "REPLAY_ROWS", 1)
    for i in range(6):
        put(store, b"k", b"%d" % i)
    it = store.events_since(2, *ALL)
    assert next(it)[0] == 2
    store.compact(pb.CompactionRequest(revision=5))
    with pytest.raises(EtcdError) as info:
        list(it)
    assert info.value == errors.COMPACTED


# -- persistence, hashing, size, concurrency ---------------------------------------------------------
def test_reopen_keeps_revision_and_data(make_store, reopen) -> None:
    store, path = make_store()
    _history(store)
    snapshots = {rev: _snapshot(store, rev) for rev in range(1, 14)}
    again = reopen(store, path)
    assert again.revision == 13 and again.compact_revision == 0
    assert {rev: _snapshot(again, rev) for rev in range(1, 14)} == snapshots
    assert put(again, b"z").header.revision == 14


def test_reopen_empty_store(make_store, reopen) -> None:
    store, path = make_store()
    again = reopen(store, path)
    assert again.revision == 1 and put(again, b"a").header.revision == 2


def _random_ops(seed: int, n: int) -> list[tuple[str, object]]:
    rnd = random.Random(seed)
    pool = [b"a", b"a\x00", b"a\x00\x01", b"ab", b"b", b"b\x00", b"c", b"\x00", b"\xff"]
    ops: list[tuple[str, object]] = []
    for i in range(n):
        kind = rnd.random()
        if kind < 0.55:
            ops.append(("put", pb.PutRequest(key=rnd.choice(pool), value=b"v%d" % i, lease=rnd.choice([0, 0, 5]))))
        elif kind < 0.7:
            ops.append(("delete", pb.DeleteRangeRequest(key=rnd.choice(pool))))
        elif kind < 0.78:
            lo, hi = sorted(rnd.sample(pool, 2))
            ops.append(("delete", pb.DeleteRangeRequest(key=lo, range_end=hi)))
        elif kind < 0.93:
            ks = rnd.sample(pool, 3)
            ops.append(
                (
                    "txn",
                    pb.TxnRequest(
                        compare=[_cmp(ks[0], C.VERSION, C.GREATER, 0)],
                        success=[op_put(ks[1], b"t%d" % i), op_del(ks[2])],
                        failure=[op_put(ks[0], b"f%d" % i)],
                    ),
                )
            )
        else:
            ops.append(("compact", None))
    return ops


def _apply(s: MVCCStore, ops: Iterable[tuple[str, object]], rnd: random.Random) -> None:
    grant(s, 5)  # the lease _random_ops uses
    for kind, req in ops:
        if kind == "put":
            s.put(req)  # type: ignore[arg-type]
        elif kind == "delete":
            s.delete_range(req)  # type: ignore[arg-type]
        elif kind == "txn":
            s.txn(req)  # type: ignore[arg-type]
        elif s.revision > s.compact_revision + 1:
            s.compact(pb.CompactionRequest(revision=rnd.randint(s.compact_revision + 1, s.revision)))


def test_hash_kv_equal_for_same_requests(make_store) -> None:
    a, _ = make_store()
    b, _ = make_store()
    ops = _random_ops(7, 300)
    _apply(a, ops, random.Random(1))
    _apply(b, ops, random.Random(1))
    assert a.revision == b.revision and a.compact_revision == b.compact_revision
    assert a.hash_kv(0) == b.hash_kv(0)
    assert a.hash_kv(0)[1] == a.compact_revision
    for rev in range(a.compact_revision + 1, a.revision + 1):
        assert a.hash_kv(rev) == b.hash_kv(rev)
    assert a.hash_kv(a.revision)[0] != a.hash_kv(a.revision - 1)[0]
    put(b, b"a", b"different")
    put(a, b"a", b"differenT")
    assert a.hash_kv(0) != b.hash_kv(0)
    raises(errors.COMPACTED, a.hash_kv, a.compact_revision)
    raises(errors.FUTURE_REV, a.hash_kv, a.revision + 1)


def _model(ops: Iterable[tuple[str, object]], rnd: random.Random) -> tuple[dict[int, dict[bytes, tuple]], int]:
    """Plain-dict model of _apply: {revision: {key: kvt}} and the final compact revision."""
    rev, compacted = 1, 0
    live: dict[bytes, tuple] = {}
    states: dict[int, dict[bytes, tuple]] = {1: {}}
    for kind, req in ops:
        new = rev + 1
        state = dict(live)
        wrote = False

        def mput(key: bytes, value: bytes, lease: int) -> None:
            old = state.get(key)
            state[key] = (key, old[1] if old else new, new, old[3] + 1 if old else 1, value, lease)

        def mdel(key: bytes, end: bytes) -> bool:
            victims = [k for k in state if (k == key if not end else key <= k < end)]
            for k in victims:
                del state[k]
            return bool(victims)

        if kind == "put":
            mput(req.key, req.value, req.lease)  # type: ignore[attr-defined]
            wrote = True
        elif kind == "delete":
            wrote = mdel(req.key, req.range_end)  # type: ignore[attr-defined]
        elif kind == "txn":
            put_op = req.success[0].request_put if req.compare[0].key in live else req.failure[0].request_put  # type: ignore[attr-defined]
            mput(put_op.key, put_op.value, put_op.lease)
            if req.compare[0].key in live:  # type: ignore[attr-defined]
                mdel(req.success[1].request_delete_range.key, b"")  # type: ignore[attr-defined]
            wrote = True
        elif rev > compacted + 1:
            compacted = rnd.randint(compacted + 1, rev)
        if wrote:
            rev, live = new, state
            states[rev] = dict(live)
    return states, compacted


def test_random_history_matches_model(make_store) -> None:
    """Every revision kept, after random writes and compactions, against a model."""
    ops = _random_ops(11, 250)
    store, _ = make_store()
    rec = Recorder()
    store.add_listener(rec)
    _apply(store, ops, random.Random(3))
    states, compacted = _model(ops, random.Random(3))
    assert store.revision == max(states) and store.compact_revision == compacted > 0
    for rev in range(1, store.revision + 1):
        if rev < compacted:
            raises(errors.COMPACTED, get, store, b"\x00", b"\x00", revision=rev)
        else:
            assert {kv.key: kvt(kv) for kv in get(store, *ALL, revision=rev).kvs} == states[rev], rev
            for key in (b"a", b"a\x00", b"ab", b"\xff"):
                got = get(store, key, revision=rev).kvs
                assert [kvt(kv) for kv in got] == ([states[rev][key]] if key in states[rev] else [])
    assert list(store.events_since(compacted + 1, *ALL)) == [c for c in rec.calls if c[0] > compacted]


def test_db_size(store: MVCCStore) -> None:
    occupied, used = store.db_size()
    put(store, b"a", b"x" * 1000)
    occupied2, used2 = store.db_size()
    assert used2 >= used + 1000 and occupied2 >= used2


def test_concurrent_reads_see_whole_revisions(store: MVCCStore) -> None:
    """A reader racing the writer only ever sees complete txns."""
    done = threading.Event()
    problems: list[str] = []

    def reader() -> None:
        while not done.is_set():
            resp = get(store, *ALL)
            mods = {kv.mod_revision for kv in resp.kvs}
            if len(mods) > 1 or any(m > resp.header.revision for m in mods):
                problems.append(f"torn read {mods} at {resp.header.revision}")
            if resp.count != len(resp.kvs) or resp.count not in (0, 3):
                problems.append(f"count {resp.count}")

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(300):
            txn(store, [], [op_put(b"a", b"%d" % i), op_put(b"b", b"%d" % i), op_put(b"c", b"%d" % i)])
            if i % 50 == 49:
                store.compact(pb.CompactionRequest(revision=store.revision - 1))
    finally:
        done.set()
        t.join()
    assert problems == []


def test_store_satisfies_protocol(store: MVCCStore) -> None:
    from metastore.store import Store

    def takes(s: Store) -> int:
        return s.revision

    assert takes(store) == 1
    for name in ("range", "put", "delete_range", "txn", "compact", "add_listener", "attach_raft",
                 "get_raft_status", "db_size", "close"):
        assert callable(getattr(store, name))


def test_read_only_txn_does_not_wait_for_a_mutation(store: MVCCStore) -> None:
    put(store, b"a", b"1")
    holding, release = threading.Event(), threading.Event()

    def long_mutation() -> None:
        with store._write_lock:  # what a long compaction holds
            holding.set()
            release.wait(10)

    t = threading.Thread(target=long_mutation)
    t.start()
    try:
        assert holding.wait(10)
        resp = txn(store, [_cmp(b"a", C.VALUE, C.EQUAL, b"1")], [op_get(b"a"), op_txn([], [op_get(b"a")])])
        assert resp.succeeded and resp.responses[0].response_range.count == 1
        assert get(store, b"a").count == 1
    finally:
        release.set()
        t.join()


def _frozen_rows(store: MVCCStore, target: str) -> list[tuple[str, bytes, bytes]]:
    """frozen_copy's rows, whichever form the engine gives them in."""
    rows = store.frozen_copy(target)
    if rows is None:  # a checkpoint: open it as the engine would
        return _frozen_rows_of_checkpoint(target)
    try:
        return list(rows)
    finally:
        getattr(rows, "close", lambda: None)()


def test_frozen_copy_is_the_state_when_taken(store: MVCCStore, tmp_path) -> None:
    """A snapshot is frozen between two applies and written while applies go
    on: overwrites, deletes, new keys and compaction after the freeze must
    not show in it, and its rows restore the exact store."""
    for i in range(50):
        store.put(pb.PutRequest(key=b"k%02d" % i, value=b"v%d" % i))
    store.put(pb.PutRequest(key=b"k07", value=b"again"))
    before = list(store.export_items())
    rows = store.frozen_copy(str(tmp_path / "frozen"))
    store.put(pb.PutRequest(key=b"k03", value=b"changed"))
    store.delete_range(pb.DeleteRangeRequest(key=b"k10", range_end=b"k20"))
    store.put(pb.PutRequest(key=b"new", value=b"x"))
    store.compact(pb.CompactionRequest(revision=store.revision, physical=True))
    assert store.wait_compacted(store.revision, 30)
    if rows is None:
        got = _frozen_rows_of_checkpoint(str(tmp_path / "frozen"))
    else:
        got = list(rows)
        assert list(rows) == got, "iterable more than once"
        rows.close()
        store.put(pb.PutRequest(key=b"k04", value=b"after close"))
    assert got == before
    assert _frozen_rows(store, str(tmp_path / "again")) == list(store.export_items())


def _frozen_rows_of_checkpoint(target: str) -> list[tuple[str, bytes, bytes]]:
    from metastore.backend import TABLES
    from metastore.engines.rocksdb import RocksDBBackend

    backend = RocksDBBackend(target)
    try:
        return [(t, k, v) for t in TABLES for k, v in backend.scan(t, b"", None)]
    finally:
        backend.close()


class _CrashAfterAhead(Exception):
    pass


@pytest.mark.parametrize("restart", [True, False], ids=["crash", "failed-write"])
def test_rows_put_ahead_of_a_write_that_never_lands_leave_no_trace(make_store, reopen, restart) -> None:
    """A big request's `hist` and `rev` rows may reach disk before the rest
    (WriteBatch.put_ahead). If the rest never lands -- the member dies in
    between, or the write fails -- the store must hold exactly what it held
    before the request, and applying the request again (Raft's replay after a
    restart) must leave the same bytes as applying it once."""
    def fill(s: MVCCStore) -> None:
        for i in range(1500):  # enough rows for the RocksDB engine to split the write
            s.put(pb.PutRequest(key=b"d/%04d" % i, value=b"v%d" % i * 20))
        s.put(pb.PutRequest(key=b"d/0007", value=b"again"))

    delete = pb.DeleteRangeRequest(key=b"d/", range_end=b"d0", prev_kv=True)
    reference, _ = make_store()
    fill(reference)
    reference.delete_range(delete)

    store, path = make_store()
    fill(store)
    rev = store.revision
    before = list(store.export_items())
    hash_before = store.hash_kv(0)
    real_write = store.backend.write
    from metastore.backend import WriteBatch

    def write_ahead_then_fail(batch) -> None:
        if not batch.ahead_count():
            if restart:
                raise _CrashAfterAhead  # dead: nothing more reaches the disk
            return real_write(batch)  # the store dropping what went ahead
        real_write(WriteBatch(ahead=batch.ahead))
        raise _CrashAfterAhead

    store.backend.write = write_ahead_then_fail  # type: ignore[method-assign]
    with pytest.raises(_CrashAfterAhead):
        store.delete_range(delete)
    store.backend.write = real_write  # type: ignore[method-assign]
    if restart:
        store = reopen(store, path)

    assert store.revision == rev
    assert list(store.export_items()) == before, "nothing of the request is left"
    assert store.hash_kv(0) == hash_before
    replayed = [(r, [ev.kv.key for ev in events]) for r, events in store.events_since(rev, b"d/", b"d0")]
    assert replayed == [(rev, [b"d/0007"])], "watch history ends at the current revision"

    store.delete_range(delete)  # the replay
    assert list(store.export_items()) == list(reference.export_items())
