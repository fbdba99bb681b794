"""etcd's watch guarantees under failure, on real processes.

Watchers on every member record each response while writers put and delete
through all members and the leader is killed with SIGKILL. A watcher whose
member dies resumes on another member from the revision after the last one it
saw (etcd's "resumable"). In the end, per watcher: responses come in strictly
increasing revision order, no revision is split across responses, and the
events equal the store's history for the whole span -- nothing missing,
nothing twice -- and include every write a client saw acknowledged.
"""
from __future__ import annotations

import queue
import random
import signal
import threading
import time

import grpc

from metastore.api.pb import kv_pb2, rpc_pb2, rpc_pb2_grpc
from metastore.testing import LocalCluster, Member, wait_for

PREFIX = b"g/"
PREFIX_END = b"g0"
PUT = kv_pb2.Event.PUT

Event = tuple[int, int, bytes, bytes]  # revision, type, key, value


class ResumingWatcher(threading.Thread):
    """Watches PREFIX from `start`, moving to another live member (from the
    next revision) whenever its stream breaks."""

    def __init__(self, cluster: LocalCluster, first: Member, start: int) -> None:
        super().__init__(daemon=True)
        self.cluster, self.member, self.next_rev = cluster, first, start
        self.responses: list[list[Event]] = []  # one list per response with events
        self.members_used: list[str] = []
        self.done = threading.Event()
        self.call = None
        self.error: BaseException | None = None

    @property
    def last_rev(self) -> int:
        return self.next_rev - 1

    def run(self) -> None:
        try:
            while not self.done.is_set():
                self._watch_once()
                if not self.done.is_set():
                    live = [m for m in self.cluster.members if m.running and not m.stopped]
                    self.member = random.choice(live)
        except BaseException as exc:  # surfaced by the test
            self.error = exc

    def _watch_once(self) -> None:
        requests: queue.Queue = queue.Queue()
        requests.put(rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(
            key=PREFIX, range_end=PREFIX_END, start_revision=self.next_rev)))

        def gen():
            while True:
                item = requests.get()
                if item is None:
                    return
                yield item

        channel = grpc.insecure_channel(self.member.endpoint)
        self.members_used.append(self.member.name)
        try:
            self.call = rpc_pb2_grpc.WatchStub(channel).Watch(gen())
            for resp in self.call:
                assert not resp.canceled, f"watch canceled: {resp}"
                if not resp.events:
                    continue
                evs = [(e.kv.mod_revision, e.type, e.kv.key, e.kv.value) for e in resp.events]
                self.responses.append(evs)
                self.next_rev = max(r for r, *_ in evs) + 1
        except grpc.RpcError:
            pass  # the member died or the test ended: resume elsewhere
        finally:
            requests.put(None)
            channel.close()

    def stop(self) -> None:
        self.done.set()
        if self.call is not None:
            self.call.cancel()


def history(member: Member, start: int, end: int) -> list[Event]:
    """The store's events for PREFIX over [start, end], from a fresh watch."""
    out: list[Event] = []
    channel = grpc.insecure_channel(member.endpoint)
    req = rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(
        key=PREFIX, range_end=PREFIX_END, start_revision=start))
    call = rpc_pb2_grpc.WatchStub(channel).Watch(iter([req]), timeout=30)
    try:
        for resp in call:
            out.extend((e.kv.mod_revision, e.type, e.kv.key, e.kv.value) for e in resp.events)
            if out and out[-1][0] >= end:
                break
    finally:
        call.cancel()
        channel.close()
    return [e for e in out if e[0] <= end]


def test_watchers_on_all_members_see_every_event_once_in_order_through_a_leader_kill():
    with LocalCluster(3) as cluster:
        leader = cluster.leader()
        start = leader.kv().Range(rpc_pb2.RangeRequest(key=b"x"), timeout=5).header.revision + 1
        watchers = [ResumingWatcher(cluster, m, start) for m in cluster.members for _ in range(2)]
        for w in watchers:
            w.start()

        acknowledged: list[Event] = []
        ack_lock = threading.Lock()
        stop_writing = threading.Event()

        def writer(seed: int) -> None:
            rnd = random.Random(seed)
            i = 0
            while not stop_writing.is_set():
                live = [m for m in cluster.members if m.running and not m.stopped]
                m = rnd.choice(live)
                key = PREFIX + b"%02d" % rnd.randrange(20)
                try:
                    if rnd.random() < 0.8:
                        value = b"w%d-%d" % (seed, i)
                        rev = m.kv().Put(rpc_pb2.PutRequest(key=key, value=value), timeout=5).header.revision
                        with ack_lock:
                            acknowledged.append((rev, PUT, key, value))
                    else:
                        m.kv().DeleteRange(rpc_pb2.DeleteRangeRequest(key=key), timeout=5)
                except (grpc.RpcError, ValueError):
                    # Leader gone or member killed (its channel closed under
                    # us: ValueError): retry elsewhere.
                    time.sleep(0.05)
                i += 1

        writers = [threading.Thread(target=writer, args=(s,), daemon=True) for s in range(3)]
        for t in writers:
            t.start()
        wait_for(lambda: len(acknowledged) >= 200, 30, "writes before the leader kill")
        cluster.kill(leader, signal.SIGKILL)
        new_leader = cluster.leader(timeout=20)
        count = len(acknowledged)
        wait_for(lambda: len(acknowledged) >= count + 200, 30, "writes after the leader kill")
        stop_writing.set()
        for t in writers:
            t.join(10)

        end = new_leader.kv().Range(rpc_pb2.RangeRequest(key=b"x"), timeout=5).header.revision
        wait_for(lambda: all(w.last_rev >= end for w in watchers), 30,
                 f"every watcher to reach the final revision {end}")
        for w in watchers:
            w.stop()
        expected = history(new_leader, start, end)
        assert expected and expected[-1][0] == end
        acked = {(rev, key, value) for rev, _t, key, value in acknowledged}
        assert acked <= {(rev, key, value) for rev, t, key, value in expected if t == PUT}, \
            "an acknowledged write is missing from the history"

        resumed = 0
        for w in watchers:
            assert w.error is None, w.error
            resumed += len(w.members_used) > 1
            revs_per_response = [sorted({r for r, *_ in resp}) for resp in w.responses]
            flat = [r for revs in revs_per_response for r in revs]
            assert flat == sorted(set(flat)), \
                f"{w.members_used}: revisions out of order, repeated or split across responses"
            seen = [e for resp in w.responses for e in resp if e[0] <= end]
            assert seen == expected, f"watcher via {w.members_used} differs from the history"
        assert resumed >= 2, "the watchers on the killed leader resumed on other members"
