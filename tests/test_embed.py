"""metastore.embed: members inside the test process, and metastore.client.

Every member here runs in this process (its own event loop thread), so these
tests also prove that several members -- and the test's own threads -- share
one interpreter.
"""
from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import grpc
import pytest

from metastore import embed
from metastore.client import Client, CompactedError, EtcdClientError
from metastore.config import ConfigError
from metastore.testing import wait_for

pytestmark = pytest.mark.timeout(90)

README = Path(__file__).resolve().parent.parent / "README.md"
# Fast Raft timing for the tests: an election in ~0.5 s, a 1 s minimum lease TTL.
FAST = dict(heartbeat_interval_ms=50, election_timeout_ms=500)


def non_daemon_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if not t.daemon and t is not threading.main_thread()}


@pytest.fixture
def no_leaked_threads():
    """The test must leave no non-daemon thread behind (a member left
    running would keep the interpreter alive at exit)."""
    before = non_daemon_threads()
    yield
    assert not (non_daemon_threads() - before), f"threads left running: {non_daemon_threads() - before}"


# -- (1) the README's example is run as written ---------------------------------------
def readme_embedding_blocks() -> list[str]:
    text = README.read_text()
    match = re.search(r"^## Embedding\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, "README.md has no '## Embedding' section"
    return re.findall(r"^```python\n(.*?)^```", match.group(1), re.S | re.M)


def test_readme_embedding_examples_run(no_leaked_threads, tmp_path, monkeypatch):
    blocks = readme_embedding_blocks()
    assert len(blocks) >= 2, "expected the single-member and the three-member examples"
    monkeypatch.chdir(tmp_path)  # nothing the examples write lands in the source tree
    for code in blocks:
        exec(compile(code, f"{README}:## Embedding", "exec"), {"__name__": "readme_example"})
    assert not embed._running, "an example left a member running"


# -- (2) one member, RocksDB, restarted on its data dir ---------------------------------------
def test_single_rocksdb_member_kv_watch_lease_and_restart(no_leaked_threads, tmp_path):
    data_dir = str(tmp_path / "data")
    with embed.start(name="solo", data_dir=data_dir, engine="rocksdb", **FAST) as m:
        assert m.running and m.config.engine == "rocksdb"
        c = m.client(timeout=10)
        assert c.get("missing") is None

        first = c.put("app/a", "1")
        assert first.prev is None and first.revision > 1
        second = c.put(b"app/a", b"2", prev_kv=True)
        assert second.prev is not None and second.prev.value == b"1" and second.revision == first.revision + 1
        c.put("app/b", "x")
        c.put("other", "y")
        value, meta = c.get("app/a")
        assert (value, meta.key, meta.version, meta.mod_revision) == (b"2", b"app/a", 2, second.revision)
        assert [v for v, _ in c.get_prefix("app/")] == [b"2", b"x"]
        assert [kv.key for _, kv in c.get_prefix("")] == [b"app/a", b"app/b", b"other"]

        # compare-and-swap helpers
        assert c.put_if_absent("lock", "me")
        assert not c.put_if_absent("lock", "you")
        assert not c.compare_and_swap("lock", "you", "them")
        assert c.compare_and_swap("lock", "me", "them")
        assert not c.compare_and_delete("lock", "me")
        assert c.compare_and_delete("lock", "them")
        assert c.compare_and_swap("lock", None, "fresh")
        assert c.delete("lock") and not c.delete("lock")

        # watch: live events, then a replay from a past revision
        with c.watch_prefix("app/", prev_kv=True) as w:
            c.put("app/c", "3")
            c.delete("app/b")
            c.put("outside", "ignored")
            e1, e2 = w.get(10), w.get(10)
            assert (e1.type, e1.key, e1.value, e1.prev) == ("PUT", b"app/c", b"3", None)
            assert (e2.type, e2.key) == ("DELETE", b"app/b") and e2.prev.value == b"x"
            assert w.get(0.2) is None
        assert w.get(0.2) is None  # canceled: ended
        replay = c.watch("app/a", start_revision=first.revision)
        try:
            assert [replay.get(10).value, replay.get(10).value] == [b"1", b"2"]
        finally:
            replay.cancel()

        # lease: expiry deletes its key (seen by a watch), keep-alive holds one past its TTL
        lease = c.lease(1)
        assert lease.ttl >= 1 and lease.id in c.leases()
        c.put("ephemeral", "v", lease=lease)
        assert lease.keys() == [b"ephemeral"]
        with c.watch("ephemeral") as w:
            gone = w.get(15)
            assert gone is not None and gone.type == "DELETE"
        assert c.get("ephemeral") is None
        assert lease.time_to_live() == -1 and lease.refresh() == 0
        assert lease.revoke() is False

        held = c.lease(1)
        c.put("held", "v", lease=held)
        keeper = held.keep_alive(interval=0.2)
        t0 = time.monotonic()
        # Poll for 3 TTLs: the key must be there at every look.
        wait_for(lambda: c.get("held") is not None and time.monotonic() - t0 > 3 * held.ttl, 15,
                 "the kept-alive key to outlive three TTLs")
        assert c.get("held") is not None and not keeper.lost.is_set()
        assert held.revoke() is True and not keeper.running
        assert c.get("held") is None

        with pytest.raises(EtcdClientError) as info:
            c.lease(10**12)
        assert info.value.code is grpc.StatusCode.OUT_OF_RANGE
        assert info.value.message == "etcdserver: too large lease TTL"
        assert "too large lease TTL" in str(info.value)

        st = c.status()
        assert st.is_leader and st.member_id == m.member_id and st.errors == ()
        (me,) = c.members()
        assert (me.name, list(me.client_urls)) == ("solo", m.client_urls)
        revision = c.put("last", "write").revision
        member_id = m.member_id
    assert not m.running
    m.stop()  # idempotent
    with pytest.raises(EtcdClientError):
        c.get("last")  # the member's clients are closed with it

    # The same data dir: everything is still there, on the same (remembered) ports.
    with embed.start(name="solo", data_dir=data_dir, engine="rocksdb", **FAST) as again:
        assert again.client_urls == m.client_urls and again.peer_urls == m.peer_urls
        assert again.member_id == member_id
        c2 = again.client()
        value, meta = c2.get("last")
        assert value == b"write" and meta.mod_revision == revision
        assert [v for v, _ in c2.get_prefix("app/")] == [b"2", b"3"]
        assert c2.get("held") is None and c2.get("ephemeral") is None
        assert c2.put("after", "restart").revision == revision + 1
        assert [list(x.client_urls) for x in c2.members()] == [again.client_urls]


# -- (3) three members in one process -----------------------------------------------------------
def test_three_members_in_one_process(no_leaked_threads, tmp_path):
    names = ["n1", "n2", "n3"]
    ports = embed.free_ports(6)
    peer = {n: embed.loopback_url(ports[2 * i]) for i, n in enumerate(names)}
    client = {n: embed.loopback_url(ports[2 * i + 1]) for i, n in enumerate(names)}
    initial = ",".join(f"{n}={peer[n]}" for n in names)
    members: list[embed.Member] = []
    try:
        for n in names:
            members.append(embed.start(
                name=n, data_dir=str(tmp_path / n), listen_client_urls=client[n], initial_cluster=initial,
                initial_cluster_token="embed-test", wait=False, **FAST))
        for m in members:
            m.wait_ready(30)
        assert [m.peer_urls for m in members] == [[peer[n]] for n in names]  # taken from initial_cluster

        clients = [m.client(timeout=10) for m in members]
        statuses = [c.status() for c in clients]
        assert len({s.leader for s in statuses}) == 1 and statuses[0].leader != 0
        assert sum(s.is_leader for s in statuses) == 1
        listed = {x.name: list(x.client_urls) for x in clients[1].members()}
        assert listed == {n: [client[n]] for n in names}

        # A write on any member is visible (linearizably) on every other one.
        with clients[2].watch("shared") as w:
            for i, c in enumerate(clients):
                c.put("shared", f"from-{names[i]}")
                assert all(other.get("shared")[0] == f"from-{names[i]}".encode() for other in clients)
            assert [w.get(10).value for _ in names] == [f"from-{n}".encode() for n in names]

        # Stop the leader: a client whose first endpoint is the stopped
        # member moves on to the next one, for reads and writes.
        leader = members[[s.is_leader for s in statuses].index(True)]
        rest = [m for m in members if m is not leader]
        multi = Client(leader.client_urls + [u for m in rest for u in m.client_urls], timeout=10)
        try:
            watch = multi.watch("after-stop")  # on the leader, resumed elsewhere when it stops
            leader.stop()
            assert not leader.running
            wait_for(lambda: multi.put("after-stop", "ok"), 30, "a write with the leader stopped")
            assert multi.get("after-stop")[0] == b"ok"
            event = watch.get(15)
            assert event is not None and (event.type, event.value) == ("PUT", b"ok")
            assert watch.get(0.3) is None  # exactly once
            watch.cancel()
            assert multi.status().endpoint != leader.endpoints[0]
            assert rest[1].client().get("after-stop")[0] == b"ok"
        finally:
            multi.close()
    finally:
        for m in members:
            m.stop()
    assert not any(m.running for m in members)


# -- (4) startup errors ---------------------------------------------------------------------
def test_startup_errors_raise_cleanly_and_leave_nothing_running(no_leaked_threads, tmp_path):
    before = non_daemon_threads()
    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    busy_url = embed.loopback_url(busy.getsockname()[1])
    try:
        data_dir = str(tmp_path / "d")
        with pytest.raises(embed.StartError, match=r"cannot listen for clients on 127\.0\.0\.1:\d+") as info:
            embed.start(name="m", data_dir=data_dir, engine="rocksdb", listen_client_urls=busy_url, **FAST)
        assert "'m' could not start" in str(info.value) and info.value.__cause__ is not None
        assert non_daemon_threads() == before and not embed._running

        free_client = embed.loopback_url(embed.free_ports(1)[0])
        with pytest.raises(embed.StartError, match=r"cannot listen for peers on 127\.0\.0\.1:\d+"):
            embed.start(name="m", data_dir=str(tmp_path / "d2"), engine="rocksdb", listen_client_urls=free_client,
                        listen_peer_urls=busy_url, **FAST)
        assert non_daemon_threads() == before and not embed._running

        # Bad settings are refused before anything starts.
        with pytest.raises(ConfigError, match="engine"):
            embed.start(name="m", data_dir=data_dir, engine="leveldb")
        with pytest.raises(TypeError, match="unknown metastore setting"):
            embed.start(name="m", data_dir=data_dir, listen_client_url=free_client)
        with pytest.raises(ConfigError):
            embed.start(name="m", data_dir=data_dir, listen_client_urls="not-a-url")
        assert non_daemon_threads() == before

        # The RocksDB data dir (its LOCK) is usable again at once, on the
        # peer port remembered from the first attempt.
        with embed.start(name="m", data_dir=data_dir, engine="rocksdb", **FAST) as m:
            assert m.client().put("k", "v").revision > 1
        # The same data dir with another engine: refused with the reason.
        with pytest.raises(embed.StartError, match="engine=rocksdb"):
            embed.start(name="m", data_dir=data_dir, engine="memory", **FAST)
        # No majority: not ready in time, stopped, and said why.
        lonely = f"a={embed.loopback_url(embed.free_ports(1)[0])},b={embed.loopback_url(embed.free_ports(1)[0])}"
        t0 = time.monotonic()
        with pytest.raises(embed.NotReadyError, match="no leader elected yet: a majority of the 2 members"):
            embed.start(name="a", data_dir=str(tmp_path / "a"), initial_cluster=lonely, timeout=1.5, **FAST)
        assert time.monotonic() - t0 < 15
        assert non_daemon_threads() == before and not embed._running
    finally:
        busy.close()


def test_failed_start_releases_the_client_port(tmp_path):
    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    client_url = embed.loopback_url(embed.free_ports(1)[0])
    try:
        with pytest.raises(embed.StartError, match="cannot listen for peers"):
            embed.start(name="m", data_dir=str(tmp_path / "a"), listen_client_urls=client_url,
                        listen_peer_urls=embed.loopback_url(busy.getsockname()[1]), **FAST)
    finally:
        busy.close()
    with embed.start(name="m", data_dir=str(tmp_path / "b"), listen_client_urls=client_url, **FAST) as m:
        assert m.client().put("k", "v").revision > 1


def test_member_left_running_is_stopped_at_interpreter_exit(tmp_path):
    """A member never stopped must not keep the process alive (pysyncobj's
    Raft thread is not a daemon): the exit hook stops it, and its data is
    on disk."""
    script = textwrap.dedent(f"""
        from metastore import embed
        m = embed.start(name="left", data_dir={str(tmp_path / "d")!r}, engine="rocksdb",
                        heartbeat_interval_ms=50, election_timeout_ms=500)
        m.client().put("k", "left running")
        print("started", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "started" in proc.stdout, proc.stderr[-3000:]
    with embed.start(name="left", data_dir=str(tmp_path / "d"), engine="rocksdb", **FAST) as m:
        assert m.client().get("k")[0] == b"left running"


# -- the client on its own ---------------------------------------------------------------------
def test_client_errors_and_compacted_watch(no_leaked_threads, tmp_path):
    dead = embed.loopback_url(embed.free_ports(1)[0])
    with embed.start(name="c", data_dir=str(tmp_path / "c"), **FAST) as m:
        # Endpoints as URLs or host:port, list or comma-separated; a dead
        # first endpoint is skipped for reads and for writes that never left.
        with Client(f"{dead},{m.endpoints[0]}", timeout=5) as c:
            assert c.put("k", "v1").revision > 0
            assert c.get("k")[0] == b"v1"
            first = c.put("k", "v2").revision
            c.put("k", "v3")
            compact = rpc_compact(m, first + 1)
            with pytest.raises(CompactedError) as info:
                w = c.watch("k", start_revision=first)
                w.get(10)
            assert info.value.compact_revision == compact
        with Client(dead, timeout=2) as c:
            with pytest.raises(EtcdClientError) as err:
                c.get("k")
            assert err.value.code is grpc.StatusCode.UNAVAILABLE
        with pytest.raises(ValueError):
            Client("https://127.0.0.1:1")


def test_member_started_from_a_running_event_loop(no_leaked_threads, tmp_path):
    """The caller's own event loop and the member's are independent."""
    async def app() -> None:
        loop = asyncio.get_running_loop()
        m = embed.start(name="a", data_dir=str(tmp_path / "a"), **FAST)  # blocks this loop meanwhile
        try:
            assert m.loop is not loop and m.loop.is_running()
            c = m.client()
            await asyncio.to_thread(c.put, "k", "v")
            assert (await asyncio.to_thread(c.get, "k"))[0] == b"v"
        finally:
            await asyncio.to_thread(m.stop)
        assert not m.running

    asyncio.run(app())


def rpc_compact(m: embed.Member, revision: int) -> int:
    from metastore.api.pb import rpc_pb2, rpc_pb2_grpc
    with grpc.insecure_channel(m.endpoints[0]) as channel:
        rpc_pb2_grpc.KVStub(channel).Compact(rpc_pb2.CompactionRequest(revision=revision), timeout=10)
    return revision


def test_a_member_whose_raft_log_fails_stops(no_leaked_threads, tmp_path, caplog):
    """A Raft log that can no longer be written (the disk fails) stops the
    member, as a failed WAL write stops etcd, instead of leaving it serving
    and failing every tick; restarted, it has every acknowledged write."""
    data_dir = str(tmp_path / "data")
    with embed.start(name="solo", data_dir=data_dir, **FAST) as m:
        c = m.client(timeout=5)
        acked = c.put("before", "1").revision
        journal = m.node.raft.journal
        # The disk goes bad: the journal's descriptor now refuses writes.
        read_only = os.open(journal.path, os.O_RDONLY)
        try:
            os.dup2(read_only, journal._fd)
        finally:
            os.close(read_only)
        with pytest.raises(EtcdClientError):
            c.put("after", "2")
        wait_for(lambda: not m.running, 10, "the member to stop")
    failures = [r for r in caplog.records if "the Raft log failed" in r.getMessage()]
    assert failures and failures[0].levelname == "CRITICAL"
    # One report, not one per tick until the member stopped.
    assert len([r for r in caplog.records if "failed _onTick" in r.getMessage()]) <= 1
    with embed.start(name="solo", data_dir=data_dir, **FAST) as again:
        c = again.client(timeout=5)
        value, meta = c.get("before")
        assert value == b"1" and meta.mod_revision == acked
        assert c.put("later", "3").revision > acked
