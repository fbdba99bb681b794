"""Watch on a real 3-member cluster: etcdctl 3.4's `watch` and raw gRPC.

etcdctl runs as a subprocess with its stdout read by a thread, and the tests
compare its exact output. A watch without --rev starts "now", so a test first
writes a marker until etcdctl prints it: from then on the watch is live and
everything after it is deterministic.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import threading
from typing import Iterator, Sequence

import grpc
import pytest

from metastore.api.pb import rpc_pb2, rpc_pb2_grpc
from metastore.testing import LocalCluster, Member, wait_for
from store_engines import ENGINES

pytestmark = pytest.mark.usefixtures("etcdctl_installed")

TIMEOUT = 15.0


@pytest.fixture(scope="module", params=ENGINES)
def cluster(request):
    with LocalCluster(3, engine=request.param) as c:
        yield c


class EtcdctlWatch:
    """`etcdctl watch ...` running in the background; its output collected
    line by line as it is printed."""

    def __init__(self, cluster: LocalCluster, *args: str, endpoints: Sequence[Member] | None = None,
                 interactive: bool = False) -> None:
        eps = ",".join(m.endpoint for m in endpoints) if endpoints else cluster.endpoints
        self.proc = subprocess.Popen(
            [shutil.which("etcdctl") or "etcdctl", "--endpoints", eps, "watch", *args],
            stdin=subprocess.PIPE if interactive else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, ETCDCTL_API="3"))
        self._out: list[str] = []
        self._err: list[str] = []
        self._threads = [threading.Thread(target=self._pump, args=(self.proc.stdout, self._out), daemon=True),
                         threading.Thread(target=self._pump, args=(self.proc.stderr, self._err), daemon=True)]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(pipe, sink: list[str]) -> None:
        for line in iter(pipe.readline, ""):
            sink.append(line)

    @property
    def stdout(self) -> str:
        return "".join(self._out)

    @property
    def stderr(self) -> str:
        return "".join(self._err)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def expect(self, expected: str, timeout: float = TIMEOUT) -> None:
        """Wait until etcdctl printed as much as `expected`, then compare exactly."""
        try:
            wait_for(lambda: len(self.stdout) >= len(expected), timeout, "etcdctl watch output")
        except TimeoutError:
            pass
        assert self.stdout == expected, f"stderr: {self.stderr}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=10)
        for t in self._threads:
            t.join(timeout=5)

    def __enter__(self) -> "EtcdctlWatch":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_live(cluster: LocalCluster, w: EtcdctlWatch, key: str, endpoints: Sequence[Member] | None = None) -> str:
    """Put key=marker-N (N = 1, 2, ...) until the watch prints one; returns
    what it printed, which must be markers first..last: the watch started
    between two puts and missed none after."""
    puts = 0

    def seen() -> bool:
        nonlocal puts
        if "marker-" in w.stdout:
            return True
        puts += 1
        cluster.etcdctl("put", key, f"marker-{puts}", endpoints=endpoints)
        return False

    wait_for(seen, TIMEOUT, "etcdctl watch to be established", interval=0.2)
    first = int(w.stdout.split("marker-", 1)[1].split("\n", 1)[0])
    expected = "".join(f"PUT\n{key}\nmarker-{i}\n" for i in range(first, puts + 1))
    w.expect(expected)
    return expected


def revision(cluster: LocalCluster) -> int:
    return cluster.members[0].kv().Range(rpc_pb2.RangeRequest(key=b"x"), timeout=5).header.revision


# -- etcdctl watch ---------------------------------------------------------------------
def test_watch_key_prints_puts_and_deletes(cluster):
    with EtcdctlWatch(cluster, "wkey") as w:
        out = make_live(cluster, w, "wkey")
        cluster.etcdctl("put", "wkey-other", "no")
        cluster.etcdctl("put", "wkey", "v1")
        cluster.etcdctl("del", "wkey")
        cluster.etcdctl("put", "wkey", "v2")
        w.expect(out + "PUT\nwkey\nv1\nDELETE\nwkey\n\nPUT\nwkey\nv2\n")


def test_watch_prefix_from_a_past_revision_replays_then_follows(cluster):
    cluster.etcdctl("put", "wpfx/a", "1")
    first = revision(cluster)
    cluster.etcdctl("put", "wpfy", "not in prefix")
    cluster.etcdctl("put", "wpfx/b", "2")
    with EtcdctlWatch(cluster, "--prefix", "wpfx/", "--rev", str(first)) as w:
        w.expect("PUT\nwpfx/a\n1\nPUT\nwpfx/b\n2\n")
        cluster.etcdctl("del", "--prefix", "wpfx/")
        cluster.etcdctl("put", "wpfx/c", "3")
        w.expect("PUT\nwpfx/a\n1\nPUT\nwpfx/b\n2\nDELETE\nwpfx/a\n\nDELETE\nwpfx/b\n\nPUT\nwpfx/c\n3\n")


def test_watch_prev_kv(cluster):
    cluster.etcdctl("put", "wprev", "old")
    start = revision(cluster) + 1
    with EtcdctlWatch(cluster, "--prev-kv", "--rev", str(start), "wprev") as w:
        cluster.etcdctl("put", "wprev", "new")
        cluster.etcdctl("del", "wprev")
        cluster.etcdctl("put", "wprev", "again")
        w.expect("PUT\nwprev\nold\nwprev\nnew\n"
                 "DELETE\nwprev\nnew\nwprev\n\n"
                 "PUT\nwprev\nagain\n")


def test_watch_on_a_follower_sees_writes_through_the_leader(cluster):
    leader = cluster.leader()
    follower = cluster.followers()[0]
    with EtcdctlWatch(cluster, "--prefix", "wfol/", endpoints=[follower]) as w:
        out = make_live(cluster, w, "wfol/k", endpoints=[leader])
        for i in range(5):
            cluster.etcdctl("put", f"wfol/{i}", str(i), endpoints=[leader])
        w.expect(out + "".join(f"PUT\nwfol/{i}\n{i}\n" for i in range(5)))


def test_watch_interactive_progress(cluster):
    with EtcdctlWatch(cluster, "-i", interactive=True) as w:
        w.send("watch wint")
        out = make_live(cluster, w, "wint")
        cluster.etcdctl("put", "wint", "x")
        out += "PUT\nwint\nx\n"
        w.expect(out)
        rev = revision(cluster)
        w.send("progress")
        w.expect(out + f"progress notify: {rev}\n")


def test_watch_compacted_revision_is_an_error(cluster):
    cluster.etcdctl("put", "wcomp", "1")
    old = revision(cluster)
    cluster.etcdctl("put", "wcomp", "2")
    now = revision(cluster)
    cluster.etcdctl("compact", str(now))
    proc = cluster.etcdctl("watch", "--rev", str(old), "wcomp", check=False, timeout=TIMEOUT)
    assert proc.returncode == 5, proc
    assert proc.stdout == ""
    assert proc.stderr == ("watch was canceled (etcdserver: mvcc: required revision has been compacted)\n"
                           "Error: watch is canceled by the server\n")
    # etcd's cancel carries the compact revision, and no revision in its header.
    proc = cluster.etcdctl("watch", "--rev", str(old), "wcomp", "-w", "json", check=False, timeout=TIMEOUT)
    assert proc.returncode == 5, proc
    canceled = json.loads(proc.stdout)
    assert canceled["Canceled"] and canceled["CompactRevision"] == now, canceled
    assert canceled["Header"]["member_id"] and "revision" not in canceled["Header"], canceled


# -- raw gRPC ----------------------------------------------------------------------------
class RawWatch:
    """A Watch stream driven request by request; responses read by a thread."""

    def __init__(self, member: Member) -> None:
        self._requests: queue.Queue = queue.Queue()
        self._responses: queue.Queue = queue.Queue()
        self._reading = threading.Event()  # cleared: stop taking responses off the wire
        self._reading.set()
        self._call = rpc_pb2_grpc.WatchStub(member.channel()).Watch(self._iter())
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _iter(self) -> Iterator[rpc_pb2.WatchRequest]:
        while True:
            req = self._requests.get()
            if req is None:
                return
            yield req

    def _read(self) -> None:
        try:
            for resp in self._call:
                self._responses.put(resp)
                self._reading.wait()
        except grpc.RpcError as err:
            self._responses.put(err)

    def send(self, **kw) -> None:
        self._requests.put(rpc_pb2.WatchRequest(**kw))

    def create(self, **kw) -> None:
        self.send(create_request=rpc_pb2.WatchCreateRequest(**kw))

    def recv(self, timeout: float = TIMEOUT) -> rpc_pb2.WatchResponse:
        resp = self._responses.get(timeout=timeout)
        assert not isinstance(resp, grpc.RpcError), resp
        return resp

    def pause(self) -> None:
        self._reading.clear()

    def resume(self) -> None:
        self._reading.set()

    def close(self) -> None:
        self._requests.put(None)
        self._call.cancel()
        self._reading.set()
        self._thread.join(timeout=5)


def test_grpc_many_watches_on_one_stream_ids_cancel_duplicate_progress(cluster):
    leader = cluster.leader()
    kv = leader.kv()
    w = RawWatch(leader)
    try:
        w.create(key=b"gw/a", watch_id=7)
        created = w.recv()
        assert (created.created, created.watch_id, created.canceled) == (True, 7, False)
        assert created.header.revision == revision(cluster)
        assert created.header.cluster_id and created.header.member_id and created.header.raft_term
        w.create(key=b"gw/", range_end=b"gw0", watch_id=8, prev_kv=True)
        assert (w.recv().watch_id, True) == (8, True)
        w.create(key=b"gw/", watch_id=7)
        dup = w.recv()
        assert (dup.created, dup.canceled, dup.watch_id) == (True, True, -1)
        assert dup.cancel_reason == "mvcc: duplicate watch ID provided on the WatchStream"
        w.create()  # auto id: 0, the first free one
        assert w.recv().watch_id == 0

        rev = kv.Put(rpc_pb2.PutRequest(key=b"gw/a", value=b"1"), timeout=5).header.revision
        got = {r.watch_id: r for r in (w.recv(), w.recv())}
        assert set(got) == {7, 8}
        for r in got.values():
            assert [(e.kv.key, e.kv.value, e.kv.mod_revision) for e in r.events] == [(b"gw/a", b"1", rev)]
            assert r.header.revision == rev

        w.send(cancel_request=rpc_pb2.WatchCancelRequest(watch_id=7))
        canceled = w.recv()
        assert (canceled.watch_id, canceled.canceled, canceled.created) == (7, True, False)
        w.send(cancel_request=rpc_pb2.WatchCancelRequest(watch_id=12345))  # unknown: no answer

        rev2 = kv.Put(rpc_pb2.PutRequest(key=b"gw/a", value=b"2"), timeout=5).header.revision
        r = w.recv()
        assert r.watch_id == 8, "the canceled watch gets nothing more; unknown cancel is not answered"
        [ev] = r.events
        assert (ev.kv.value, ev.kv.mod_revision, ev.prev_kv.value) == (b"2", rev2, b"1")

        w.send(progress_request=rpc_pb2.WatchProgressRequest())
        progress = w.recv()
        assert (progress.watch_id, progress.header.revision) == (-1, rev2)
        assert not (progress.events or progress.created or progress.canceled)
    finally:
        w.close()


def test_grpc_bad_requests_do_not_break_the_stream(cluster):
    member = cluster.members[0]
    w = RawWatch(member)
    try:
        w.create(key=b"b", range_end=b"a")
        empty = w.recv()
        assert (empty.created, empty.canceled, empty.watch_id) == (True, True, -1)
        assert empty.cancel_reason == "mvcc: watcher range is empty"
        w.send()  # no request set at all
        w.create(key=b"gb", start_revision=-5, filters=[5, 6])  # nonsense values
        ok = w.recv()
        assert ok.created and not ok.canceled
        w.send(progress_request=rpc_pb2.WatchProgressRequest())
        kinds = set()
        while -1 not in kinds:  # the history replay (if any) comes before the progress answer
            kinds.add(w.recv().watch_id)
    finally:
        w.close()
    # The member still serves watches.
    w = RawWatch(member)
    try:
        w.create(key=b"gb")
        assert w.recv().created
    finally:
        w.close()


def test_grpc_client_that_stops_reading_still_gets_every_event():
    """A client that reads nothing while ~40 MB of events are written: the
    server stops queueing for it (bounded memory, writes unaffected) and later
    replays what it skipped from history, with no gap and no duplicate."""
    with LocalCluster(1, extra_args=["--log-level", "debug", "--unsafe-no-fsync"]) as single:
        member = single.members[0]
        kv = member.kv()
        w = RawWatch(member)
        try:
            w.create(key=b"slow/", range_end=b"slow0")
            start = w.recv().header.revision + 1
            w.pause()
            last = 0
            value = b"x" * 20_000
            for j in range(0, 2000, 100):
                futures = [kv.Put.future(rpc_pb2.PutRequest(key=b"slow/%d" % (i % 50), value=value), timeout=30)
                           for i in range(j, j + 100)]
                last = max([last] + [f.result().header.revision for f in futures])
            assert "send queue full, continuing from history" in member.log(), \
                "the unread stream was switched to history"
            w.resume()
            revs: list[int] = []
            while not revs or revs[-1] < last:
                revs.extend(e.kv.mod_revision for e in w.recv().events)
            assert revs == list(range(start, last + 1))
        finally:
            w.close()
