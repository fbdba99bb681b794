"""A Python etcd client library from PyPI against a real 3-member cluster.

The client is etcd-sdk-python (imported as `pyetcd`), a fork of python-etcd3
with protos regenerated for current protobuf and the same synchronous API:
`pyetcd.client(host, port)`, `get`/`put`/`get_prefix`/`transaction`/`watch`/
`lease`/`lock`/`members`/`status`/`compact`. Everything here goes through the library only; the
cluster comes from `metastore.testing.LocalCluster`.

Every Python etcd client ships its own generated etcdserverpb/mvccpb modules
in protobuf's default descriptor pool; metastore keeps its own in a private
pool (api/pb/_pool.py), so both import in one process -- this file is also
the test of that.
"""
from __future__ import annotations

import queue
import threading
import time
import uuid
from typing import Any

import grpc
import pyetcd
import pytest
from pyetcd import events as etcd_events
from pyetcd import exceptions as etcd_exceptions

from metastore.testing import LocalCluster, Member, wait_for

# A hung stream (a watch that never answers, a keep-alive that never ends)
# must fail the test, not the whole run.
pytestmark = pytest.mark.timeout(60)

RPC_TIMEOUT = 10  # seconds, for every unary RPC the client makes


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(3) as c:
        yield c


@pytest.fixture
def connect(cluster: LocalCluster, request: pytest.FixtureRequest):
    """connect(member) -> a pyetcd client on that member, closed after the test.

    A fresh client per test: pyetcd marks an endpoint "failed" for 300 s after
    one UNAVAILABLE/DEADLINE_EXCEEDED/INTERNAL answer and then refuses to use
    it, so one failing test must not poison the next."""
    clients = []

    def make(member: Member | None = None):
        m = member or cluster.leader()
        c = pyetcd.client(host="127.0.0.1", port=m.client_port, timeout=RPC_TIMEOUT)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        request.node.add_report_section("call", "metastore logs", cluster.logs()[-20000:])


@pytest.fixture
def client(connect, cluster: LocalCluster):
    """A client on a follower: writes are forwarded to the leader."""
    return connect(cluster.followers()[0])


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix of this test's own: the tests share one cluster."""
    return f"/pyclient/{request.node.name}/{uuid.uuid4().hex[:8]}/"


def rev_of(put_response) -> int:
    return put_response.header.revision


class Collector:
    """A watch callback that queues what it gets; next() waits with a deadline."""

    def __init__(self) -> None:
        self.q: queue.Queue = queue.Queue()

    def __call__(self, response_or_error: Any) -> None:
        self.q.put(response_or_error)

    def next_response(self, timeout: float = 10.0):
        try:
            item = self.q.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no watch response within {timeout}s") from None
        if isinstance(item, BaseException):
            raise item
        return item

    def events(self, n: int, timeout: float = 10.0) -> list:
        """The next n events (a response may carry several)."""
        deadline = time.monotonic() + timeout
        got: list = []
        while len(got) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"got {len(got)} of {n} watch events within {timeout}s: {got}")
            got.extend(self.next_response(remaining).events)
        assert len(got) == n, f"more events than expected: {got}"
        return got

    def empty(self) -> bool:
        return self.q.empty()


def describe(events: list) -> list[tuple[str, bytes, bytes]]:
    return [(type(e).__name__, e.key, e.value) for e in events]


# -- KV -----------------------------------------------------------------------

def test_put_get_delete(client, connect, cluster, prefix):
    key = prefix + "k"
    assert client.get(key) == (None, None)

    r1 = client.put(key, "v1")
    value, meta = client.get(key)
    assert value == b"v1"
    assert meta.key == key.encode()
    assert (meta.version, meta.create_revision, meta.mod_revision) == (1, rev_of(r1), rev_of(r1))
    assert meta.lease_id == 0
    assert meta.response_header.revision >= rev_of(r1)

    r2 = client.put(key, b"v2", prev_kv=True)
    assert rev_of(r2) == rev_of(r1) + 1
    assert r2.prev_kv.value == b"v1" and r2.prev_kv.mod_revision == rev_of(r1)
    value, meta = client.get(key)
    assert value == b"v2"
    assert (meta.version, meta.create_revision, meta.mod_revision) == (2, rev_of(r1), rev_of(r2))

    # Linearizable reads see the write on every member; serializable ones once applied.
    for m in cluster.members:
        c = connect(m)
        assert c.get(key)[0] == b"v2", m.name
        wait_for(lambda: c.get(key, serializable=True)[0] == b"v2", 10, f"{m.name} to apply the write")

    deleted = client.delete(key, prev_kv=True, return_response=True)
    assert deleted.deleted == 1
    assert [kv.value for kv in deleted.prev_kvs] == [b"v2"]
    assert rev_of(deleted) == rev_of(r2) + 1
    assert client.get(key) == (None, None)
    assert client.delete(key) is False, "deleting a missing key deletes nothing"

    # Recreated: a new key lifetime, version starts over.
    r3 = client.put(key, "v3")
    _, meta = client.get(key)
    assert (meta.version, meta.create_revision) == (1, rev_of(r3))
    assert client.delete(key) is True


def test_get_prefix_and_delete_prefix(client, prefix):
    names = ["a", "b", "c", "d", "e"]
    for i, n in enumerate(names):
        client.put(prefix + "dir/" + n, f"value-{i}")
    client.put(prefix + "dir0", "outside: shares the characters, not the prefix")
    client.put(prefix + "di", "outside: shorter")

    got = list(client.get_prefix(prefix + "dir/"))
    assert [m.key for _, m in got] == [(prefix + "dir/" + n).encode() for n in names]
    assert [v for v, _ in got] == [f"value-{i}".encode() for i in range(5)]

    keys_only = list(client.get_prefix(prefix + "dir/", keys_only=True))
    assert [m.key for _, m in keys_only] == [(prefix + "dir/" + n).encode() for n in names]
    assert all(v == b"" for v, _ in keys_only)

    counted = client.get_prefix_response(prefix + "dir/", count_only=True)
    assert counted.count == 5 and len(counted.kvs) == 0

    ranged = list(client.get_range(prefix + "dir/b", prefix + "dir/d"))
    assert [m.key for _, m in ranged] == [(prefix + "dir/b").encode(), (prefix + "dir/c").encode()]

    assert list(client.get_prefix(prefix + "nothing/")) == []

    resp = client.delete_prefix(prefix + "dir/")
    assert resp.deleted == 5
    assert list(client.get_prefix(prefix + "dir/")) == []
    assert client.get(prefix + "dir0")[0] is not None
    assert client.get(prefix + "di")[0] is not None
    assert client.delete_prefix(prefix + "dir/").deleted == 0


def test_get_sort_limit_and_revision_options(client, prefix):
    p = prefix + "s/"
    # Written so that key order, value order, and modification order all differ.
    r_c = rev_of(client.put(p + "c", "2"))
    r_a = rev_of(client.put(p + "a", "3"))
    r_b = rev_of(client.put(p + "b", "1"))
    r_a2 = rev_of(client.put(p + "a", "0"))  # a: version 2, newest mod
    r_b2 = rev_of(client.put(p + "b", "1"))  # b: version 2
    r_b3 = rev_of(client.put(p + "b", "1"))  # b: version 3

    def keys(**kw) -> list[str]:
        return [m.key.decode()[len(p):] for _, m in client.get_prefix(p, **kw)]

    assert keys() == ["a", "b", "c"]
    assert keys(sort_order="ascend", sort_target="key") == ["a", "b", "c"]
    assert keys(sort_order="descend", sort_target="key") == ["c", "b", "a"]
    by_value = [v for v, _ in client.get_prefix(p, sort_order="ascend", sort_target="value")]
    assert by_value == [b"0", b"1", b"2"]
    assert keys(sort_order="descend", sort_target="value") == ["c", "b", "a"]
    assert keys(sort_order="ascend", sort_target="create") == ["c", "a", "b"]
    assert keys(sort_order="descend", sort_target="create") == ["b", "a", "c"]
    assert keys(sort_order="ascend", sort_target="mod") == ["c", "a", "b"]
    assert keys(sort_order="descend", sort_target="mod") == ["b", "a", "c"]
    assert keys(sort_order="descend", sort_target="version") == ["b", "a", "c"]
    # etcd: a non-key target with no order sorts ascending.
    assert keys(sort_target="mod") == ["c", "a", "b"]

    # limit applies after sorting; count and more still describe the whole range.
    limited = client.get_prefix_response(p, limit=2)
    assert [kv.key for kv in limited.kvs] == [(p + "a").encode(), (p + "b").encode()]
    assert limited.count == 3 and limited.more is True
    limited = client.get_prefix_response(p, limit=2, sort_order="descend", sort_target="key")
    assert [kv.key for kv in limited.kvs] == [(p + "c").encode(), (p + "b").encode()]
    assert limited.more is True
    everything = client.get_prefix_response(p, limit=3)
    assert len(everything.kvs) == 3 and everything.more is False

    # Reads at a past revision see the store as it was.
    assert client.get(p + "a", revision=r_a)[0] == b"3"
    assert client.get(p + "a", revision=r_a2)[0] == b"0"
    assert client.get(p + "b", revision=r_a)[0] is None, "b did not exist yet"
    old = list(client.get_prefix(p, revision=r_b))
    assert [(m.key.decode()[len(p):], v) for v, m in old] == [("a", b"3"), ("b", b"1"), ("c", b"2")]
    assert client.get(p + "b", revision=r_b2)[1].version == 2

    # Modification-revision filters.
    newer = client.get_prefix_response(p, min_mod_revision=r_a2)
    assert sorted(kv.key for kv in newer.kvs) == [(p + "a").encode(), (p + "b").encode()]
    older = client.get_prefix_response(p, max_mod_revision=r_b)
    assert [kv.key for kv in older.kvs] == [(p + "c").encode()]
    assert r_c < r_a < r_b < r_a2 < r_b2 < r_b3


def test_replace_and_put_if_not_exists(client, prefix):
    key = prefix + "cas"
    assert client.put_if_not_exists(key, "first") is True
    assert client.put_if_not_exists(key, "second") is False
    assert client.get(key)[0] == b"first"

    assert client.replace(key, "wrong", "x") is False
    assert client.get(key)[0] == b"first"
    assert client.replace(key, "first", "replaced") is True
    assert client.get(key)[0] == b"replaced"
    assert client.replace(key, "first", "again") is False
    assert client.get(key)[1].version == 2
    assert client.replace(prefix + "missing", "", "x") is False, "a missing key has no value to compare"


def test_transactions(client, prefix):
    t = client.transactions
    key, other = prefix + "txn", prefix + "txn-other"
    created = rev_of(client.put(key, "v1"))
    modified = rev_of(client.put(key, "v2"))

    # All compares true: the success branch runs; responses in op order.
    ok, responses = client.transaction(
        compare=[
            t.version(key) == 2,
            t.create(key) == created,
            t.mod(key) == modified,
            t.value(key) == "v2",
            t.value(key) != "v1",
            t.version(key) > 1,
            t.mod(key) < modified + 1,
            t.create(other) == 0,  # other does not exist
        ],
        success=[t.put(other, "from-success"), t.get(key), t.put(key, "v3")],
        failure=[t.put(other, "from-failure")],
    )
    assert ok is True
    assert len(responses) == 3
    assert responses[0].response_put.header.revision > modified
    [(value, meta)] = responses[1]
    assert value == b"v2" and meta.version == 2, "the get sees the state before later ops"
    assert client.get(other)[0] == b"from-success"
    assert client.get(key)[0] == b"v3"
    txn_rev = client.get(key)[1].mod_revision
    assert client.get(other)[1].mod_revision == txn_rev, "one transaction, one revision"

    # One compare false: the failure branch runs, the success ops do not.
    ok, responses = client.transaction(
        compare=[t.value(key) == "v3", t.version(key) == 99],
        success=[t.delete(key)],
        failure=[t.get(prefix + "txn", prefix + "txn~"), t.delete(other, prev_kv=True)],
    )
    assert ok is False
    assert sorted(v for v, _ in responses[0]) == [b"from-success", b"v3"]
    assert responses[1].response_delete_range.deleted == 1
    assert responses[1].response_delete_range.prev_kvs[0].value == b"from-success"
    assert client.get(key)[0] == b"v3"
    assert client.get(other) == (None, None)

    # Empty compare list: always the success branch. Nested transactions.
    ok, responses = client.transaction(
        compare=[],
        success=[t.txn(compare=[t.value(key) == "nope"],
                       success=[t.put(key, "inner-success")],
                       failure=[t.put(key, "inner-failure")])],
        failure=[],
    )
    assert ok is True
    assert responses[0].response_txn.succeeded is False
    assert client.get(key)[0] == b"inner-failure"

    # Compare on a missing key's value fails; on its version (0) succeeds.
    ok, _ = client.transaction(compare=[t.version(prefix + "ghost") == 0],
                               success=[t.put(prefix + "ghost", "made")], failure=[])
    assert ok is True and client.get(prefix + "ghost")[0] == b"made"


def test_transaction_is_atomic_under_concurrent_increments(connect, cluster, prefix):
    """Compare-and-swap counters from clients on every member never lose an update."""
    key = prefix + "counter"
    connect().put(key, "0")
    per_worker = 15
    errors: list[BaseException] = []

    def worker(member: Member) -> None:
        c = connect(member)
        t = c.transactions
        try:
            done = 0
            while done < per_worker:
                value, meta = c.get(key)
                ok, _ = c.transaction(compare=[t.mod(key) == meta.mod_revision],
                                      success=[t.put(key, str(int(value) + 1))], failure=[])
                done += ok
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(m,)) for m in cluster.members]
    for th in threads:
        th.start()
    for th in threads:
        th.join(45)
    assert not errors, errors
    value, meta = connect().get(key)
    assert int(value) == per_worker * len(cluster.members)
    assert meta.version == per_worker * len(cluster.members) + 1


def test_compaction(client, connect, cluster, prefix):
    key = prefix + "c"
    r1 = rev_of(client.put(key, "v1"))
    r2 = rev_of(client.put(key, "v2"))
    r3 = rev_of(client.put(key, "v3"))
    assert client.get(key, revision=r1)[0] == b"v1"

    client.compact(r2, physical=True)

    # pyetcd does not wrap this code: KV reads below the compaction raise
    # grpc's error with etcd's OUT_OF_RANGE and message.
    for m in cluster.members:
        c = connect(m)
        with pytest.raises(grpc.RpcError) as err:
            c.get(key, revision=r1)
        assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE, m.name
        assert "required revision has been compacted" in err.value.details()
    # The compaction revision itself and later ones stay readable.
    assert client.get(key, revision=r2)[0] == b"v2"
    assert client.get(key, revision=r3)[0] == b"v3"
    assert client.get(key)[0] == b"v3"

    # Compacting again at or below the compacted revision, or past the head.
    with pytest.raises(grpc.RpcError) as err:
        client.compact(r1)
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "required revision has been compacted" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.compact(r3 + 1000)
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "required revision is a future revision" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.get(key, revision=r3 + 1000)
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE


# -- Cluster and Maintenance ---------------------------------------------------

def test_member_list(connect, cluster):
    expected = {(m.name, (m.peer_url,), (m.client_url,)) for m in cluster.members}
    ids_seen = []
    for m in cluster.members:
        members = list(connect(m).members)
        got = {(x.name, tuple(x.peer_urls), tuple(x.client_urls)) for x in members}
        assert got == expected, m.name
        ids = sorted(x.id for x in members)
        assert len(set(ids)) == 3 and 0 not in ids
        ids_seen.append(ids)
    assert ids_seen[0] == ids_seen[1] == ids_seen[2], "every member reports the same ids"


def test_status(connect, cluster):
    leader = cluster.leader()
    statuses = {m.name: connect(m).status() for m in cluster.members}
    for name, st in statuses.items():
        assert st.leader is not None, f"{name}: the leader id is one of member list's ids"
        assert st.leader.name == leader.name, name
        assert st.leader.client_urls == [leader.client_url]
        assert st.raft_term >= 1
        assert st.raft_index >= 1
        assert st.version, "a version string (etcdctl and clients parse it)"
        assert st.db_size >= 0
    assert len({st.raft_term for st in statuses.values()}) == 1

    c = connect(leader)
    before = c.status().raft_index
    for i in range(3):
        c.put(f"/pyclient/status/{i}", "x")
    assert c.status().raft_index >= before + 3


# -- Watch ---------------------------------------------------------------------

def test_watch_key_events_and_cancel(client, prefix):
    key = prefix + "w"
    events = Collector()
    watch_id = client.add_watch_callback(key, events)

    r1 = rev_of(client.put(key, "v1"))
    client.put(prefix + "w-sibling", "not watched")  # same prefix, other key
    r2 = rev_of(client.put(key, "v2"))
    r3 = rev_of(client.delete(key, return_response=True))
    got = events.events(3)
    assert [type(e) for e in got] == [etcd_events.PutEvent, etcd_events.PutEvent, etcd_events.DeleteEvent]
    assert [e.key for e in got] == [key.encode()] * 3
    assert [e.value for e in got[:2]] == [b"v1", b"v2"]
    assert [e.mod_revision for e in got] == [r1, r2, r3]
    assert [e.version for e in got[:2]] == [1, 2]
    assert got[0].create_revision == got[1].create_revision == r1

    client.cancel_watch(watch_id)
    # After the cancel, a new watch on the same stream and key gets the next
    # put and the canceled one gets nothing (pyetcd drops the callback at
    # cancel and ignores late responses for its id, so this checks that the
    # stream keeps working after a cancel more than the server's cancel).
    again = Collector()
    watch_id2 = client.add_watch_callback(key, again)
    client.put(key, "after-cancel")
    assert [e.value for e in again.events(1)] == [b"after-cancel"]
    assert events.empty(), "a canceled watch got events"
    client.cancel_watch(watch_id2)


def test_watch_prefix_iterator(client, prefix):
    p = prefix + "dir/"
    events, cancel = client.watch_prefix(p)
    timer = threading.Timer(20, cancel)  # never hang on a missing event
    timer.start()
    try:
        client.put(p + "a", "1")
        client.put(prefix + "outside", "x")
        client.put(p + "b/c", "2")
        client.delete(p + "a")
        got = []
        for e in events:
            got.append(e)
            if len(got) == 3:
                break
    finally:
        timer.cancel()
        cancel()
    assert describe(got) == [("PutEvent", (p + "a").encode(), b"1"),
                             ("PutEvent", (p + "b/c").encode(), b"2"),
                             ("DeleteEvent", (p + "a").encode(), b"")]


def test_watch_from_past_revision_replays_history(client, prefix):
    key = prefix + "h"
    revs = [rev_of(client.put(key, f"v{i}")) for i in range(3)]
    events = Collector()
    watch_id = client.add_watch_callback(key, events, start_revision=revs[1], prev_kv=True)
    try:
        got = events.events(2)
        assert [(e.value, e.mod_revision) for e in got] == [(b"v1", revs[1]), (b"v2", revs[2])]
        assert [e.prev_value for e in got] == [b"v0", b"v1"], "prev_kv requested"
        live = rev_of(client.put(key, "live"))
        [e] = events.events(1)
        assert (e.value, e.mod_revision) == (b"live", live)
    finally:
        client.cancel_watch(watch_id)

    # watch_once with a start revision already in the past returns at once.
    event = client.watch_once(key, timeout=10, start_revision=revs[0])
    assert (event.value, event.mod_revision) == (b"v0", revs[0])


def test_watch_compacted_revision_raises(client, prefix):
    key = prefix + "wc"
    r1 = rev_of(client.put(key, "v1"))
    r2 = rev_of(client.put(key, "v2"))
    client.compact(r2)
    events = Collector()
    # etcd answers created, then a response with compact_revision set and the
    # watch canceled; pyetcd turns that into RevisionCompactedError (raised
    # here by add_watch_callback if it arrives with the creation, else handed
    # to the callback).
    with pytest.raises(etcd_exceptions.RevisionCompactedError) as err:
        client.add_watch_callback(key, events, start_revision=r1)
        events.next_response()
    assert err.value.compacted_revision == r2
    # The same stream still serves new watches from revisions still in history.
    r3 = rev_of(client.put(key, "v3"))
    events2 = Collector()
    client.add_watch_callback(key, events2, start_revision=r3)
    [e] = events2.events(1)
    assert (e.value, e.mod_revision) == (b"v3", r3)


def test_watch_from_the_compaction_revision_itself(client, prefix):
    """etcd cancels a watch only when start_revision < the compact revision
    (mvcc watcher_group chooseAll: `w.minRev < compactRev`): the compaction
    revision itself is kept, for reads (Range at it works) and for watches."""
    key = prefix + "wcr"
    client.put(key, "v1")
    r2 = rev_of(client.put(key, "v2"))
    client.compact(r2)
    assert client.get(key, revision=r2)[0] == b"v2"
    events = Collector()
    client.add_watch_callback(key, events, start_revision=r2)
    [e] = events.events(1)
    assert (e.value, e.mod_revision) == (b"v2", r2)


# -- Leases --------------------------------------------------------------------

def test_lease_grant_attach_time_to_live_revoke(client, connect, cluster, prefix):
    key = prefix + "leased"
    lease = client.lease(30)
    assert lease.id != 0 and lease.ttl == 30
    client.put(key, "v", lease=lease)
    client.put(prefix + "other-leased", "v", lease=lease.id)
    assert client.get(key)[1].lease_id == lease.id

    info = client.get_lease_info(lease.id)
    assert info.ID == lease.id and info.grantedTTL == 30
    assert 0 < info.TTL <= 30
    assert sorted(info.keys) == sorted([key.encode(), (prefix + "other-leased").encode()])
    assert lease.granted_ttl == 30
    # Leases are cluster state: every member knows this one.
    for m in cluster.members:
        assert connect(m).get_lease_info(lease.id).grantedTTL == 30, m.name

    lease.revoke()
    assert client.get(key) == (None, None), "revoking a lease deletes its keys"
    assert client.get(prefix + "other-leased") == (None, None)
    assert client.get_lease_info(lease.id).TTL == -1, "etcd: TTL -1 for an unknown lease"

    # A lease granted with a chosen id keeps it.
    wanted = int(uuid.uuid4().int % (1 << 62)) + 1
    chosen = client.lease(30, lease_id=wanted)
    assert chosen.id == wanted
    chosen.revoke()


def test_lease_keepalive_then_expiry(client, prefix):
    ttl = 3
    key = prefix + "ephemeral"
    lease = client.lease(ttl)
    client.put(key, "alive", lease=lease)
    # Refresh for well past one TTL: the key stays.
    deadline = time.monotonic() + ttl + 1.5
    while time.monotonic() < deadline:
        [resp] = lease.refresh()
        assert resp.ID == lease.id and resp.TTL == ttl
        assert client.get(key)[0] == b"alive"
        time.sleep(0.5)  # the keep-alive period, not a condition
    assert lease.remaining_ttl > 0

    # Stop refreshing: the lease expires and takes the key with it.
    stopped = time.monotonic()
    wait_for(lambda: client.get(key) == (None, None), ttl + 10, "the lease to expire")
    assert time.monotonic() - stopped >= ttl - 1.5, "expired well before its TTL"
    assert client.get_lease_info(lease.id).TTL == -1
    # etcd answers a keep-alive for an unknown lease with TTL 0, not an error.
    [resp] = lease.refresh()
    assert resp.TTL == 0


def test_put_with_unknown_lease_fails(client, prefix):
    with pytest.raises(grpc.RpcError) as err:
        client.put(prefix + "k", "v", lease=0x7EADBEEF)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "requested lease not found" in err.value.details()
    assert client.get(prefix + "k") == (None, None)


# -- Lock (pyetcd's own recipe: a lease, a create-revision txn, a delete watch) --

def test_lock_holders_take_turns(connect, cluster, prefix):
    name = prefix.strip("/").replace("/", "-")
    first = connect(cluster.members[0]).lock(name, ttl=30)
    second = connect(cluster.members[1]).lock(name, ttl=30)
    order: list[str] = []

    assert first.acquire(timeout=10) is True
    order.append("first acquired")
    assert first.is_acquired() and not second.is_acquired()
    assert second.acquire(timeout=0) is False, "the lock is held"

    result: dict[str, Any] = {}

    def wait_for_second() -> None:
        try:
            result["acquired"] = second.acquire(timeout=30)
            order.append("second acquired")
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            result["error"] = exc

    th = threading.Thread(target=wait_for_second)
    th.start()
    try:
        # Wait until the second holder is blocked in its watch for the lock
        # key's deletion (pyetcd's watcher registers one callback), so the
        # release below must wake it through the watch.
        watcher = second.etcd_client.watcher
        wait_for(lambda: len(watcher._callbacks) == 1 and th.is_alive(), 10,
                 "the second holder to wait on the lock key")
        assert first.is_acquired()
        order.append("first releasing")
        assert first.release() is True
    finally:
        th.join(35)
    assert "error" not in result, result.get("error")
    assert result.get("acquired") is True
    assert order == ["first acquired", "first releasing", "second acquired"]
    assert second.is_acquired() and not first.is_acquired()
    assert second.release() is True
    assert not second.is_acquired()

    # The context-manager form.
    with connect(cluster.members[2]).lock(name, ttl=30) as third:
        assert third.is_acquired()
    assert not third.is_acquired()


def test_lock_released_when_its_lease_expires(connect, cluster, prefix):
    name = prefix.strip("/").replace("/", "-")
    crashed = connect(cluster.members[0]).lock(name, ttl=2)
    assert crashed.acquire(timeout=10) is True
    # The holder never refreshes nor releases (a crashed process).
    waiter = connect(cluster.members[1]).lock(name, ttl=30)
    start = time.monotonic()
    assert waiter.acquire(timeout=20) is True, "the lock was never freed by lease expiry"
    assert time.monotonic() - start >= 0.5, "acquired while the first holder's lease was live"
    assert waiter.is_acquired() and not crashed.is_acquired()
    assert crashed.release() is False, "the expired holder cannot release the new holder's lock"
    assert waiter.release() is True


# -- Failover ------------------------------------------------------------------

def test_multi_endpoint_client_fails_over_when_its_member_dies(cluster, prefix):
    """A multi-endpoint client with failover: after its member is killed the
    next call fails (pyetcd does not retry), and a retry goes elsewhere."""
    endpoints = [pyetcd.Endpoint("127.0.0.1", m.client_port, secure=False, time_retry=1.0)
                 for m in cluster.members]
    client = pyetcd.MultiEndpointEtcd3Client(endpoints=endpoints, timeout=5, failover=True)
    key = prefix + "k"
    try:
        client.put(key, "before")
        in_use = client.endpoint_in_use.netloc
        victim = next(m for m in cluster.members if m.endpoint == in_use)
        cluster.kill(victim)
        try:
            with pytest.raises((etcd_exceptions.ConnectionFailedError,
                                etcd_exceptions.ConnectionTimeoutError)):
                client.get(key)

            def put_after() -> bool:
                client.put(key, "after")
                return True

            wait_for(put_after, 30, "a write through another member")
            assert client.endpoint_in_use.netloc != in_use
            assert client.get(key)[0] == b"after"
        finally:
            cluster.restart(victim)
        # The restarted member caught up.
        c = pyetcd.client("127.0.0.1", victim.client_port, timeout=RPC_TIMEOUT)
        try:
            wait_for(lambda: c.get(key)[0] == b"after", 20, f"{victim.name} to catch up")
        finally:
            c.close()
    finally:
        client.close()
