"""The WatchHub against a real in-memory MVCCStore.

Mutations run on their own thread, as the Raft apply thread does, so the
hand-off to the event loop is the real one. Every test reads what a watch
stream would send and checks etcd's guarantees: created first, ordered,
no gaps, no duplicates, one revision per response.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import pytest

from metastore.api.pb import kv_pb2, rpc_pb2
from metastore.engines.memory import open_store
from metastore.mvcc import MVCCStore
from metastore.watch_hub import ERR_DUPLICATE_ID, ERR_EMPTY_RANGE, WatchHub, WatchStream

CR = rpc_pb2.WatchCreateRequest
PUT, DELETE = kv_pb2.Event.PUT, kv_pb2.Event.DELETE
TIMEOUT = 10.0


@pytest.fixture(autouse=True, params=["messages", "encoded"])
def stream_kind(request, monkeypatch):
    """Every test runs twice: with streams that queue WatchResponse messages
    (the JSON gateway's, lock and election waits) and with `encoded` streams,
    whose live events are serialized bytes (the gRPC Watch call's)."""
    if request.param == "encoded":
        open_stream = WatchHub.open_stream
        monkeypatch.setattr(WatchHub, "open_stream",
                            lambda self, **kw: open_stream(self, **{"encoded": True, **kw}))
    return request.param


def as_message(resp: rpc_pb2.WatchResponse | bytes | None) -> rpc_pb2.WatchResponse | None:
    return rpc_pb2.WatchResponse.FromString(resp) if type(resp) is bytes else resp


class Applier:
    """Mutates the store from one dedicated thread, like the Raft apply loop."""

    def __init__(self, store: MVCCStore) -> None:
        self.store = store
        self.index = 0
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="apply")

    def _tag(self) -> None:
        self.index += 1
        self.store.set_apply_position(self.index, 0)

    def _put(self, key: bytes, value: bytes) -> int:
        self._tag()
        return self.store.put(rpc_pb2.PutRequest(key=key, value=value)).header.revision

    def _delete(self, key: bytes, range_end: bytes) -> int:
        self._tag()
        return self.store.delete_range(rpc_pb2.DeleteRangeRequest(key=key, range_end=range_end)).header.revision

    def _compact(self, revision: int) -> None:
        self._tag()
        self.store.compact(rpc_pb2.CompactionRequest(revision=revision))

    def _txn_puts(self, items: list[tuple[bytes, bytes]]) -> int:
        self._tag()
        ops = [rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=k, value=v)) for k, v in items]
        return self.store.txn(rpc_pb2.TxnRequest(success=ops)).header.revision

    async def run(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def put(self, key: bytes, value: bytes = b"v") -> int:
        return await self.run(self._put, key, value)

    async def delete(self, key: bytes, range_end: bytes = b"") -> int:
        return await self.run(self._delete, key, range_end)

    async def compact(self, revision: int) -> None:
        await self.run(self._compact, revision)

    async def txn_puts(self, items: list[tuple[bytes, bytes]]) -> int:
        return await self.run(self._txn_puts, items)

    async def puts(self, items: list[tuple[bytes, bytes]]) -> int:
        """Many puts in one apply-thread job (a burst); returns the last revision."""
        def many() -> int:
            rev = 0
            for k, v in items:
                rev = self._put(k, v)
            return rev
        return await self.run(many)


def run(test: Callable[..., object], **hub_kw) -> None:
    """Run `test(hub, applier)` on a fresh loop with a started hub."""
    async def main() -> None:
        store = open_store()
        hub = WatchHub(store, **hub_kw)
        hub.start(asyncio.get_running_loop())
        applier = Applier(store)
        try:
            await test(hub, applier)
        finally:
            hub.stop()
            applier.pool.shutdown(wait=True)
            store.close()
    asyncio.run(main())


async def next_resp(stream: WatchStream, timeout: float = TIMEOUT) -> rpc_pb2.WatchResponse:
    resp = as_message(await asyncio.wait_for(stream.next_response(), timeout))
    assert resp is not None, "stream ended"
    return resp


async def events_until(stream: WatchStream, watch_id: int, last_rev: int,
                       timeout: float = TIMEOUT) -> list[tuple[rpc_pb2.WatchResponse, kv_pb2.Event]]:
    """Every (response, event) of `watch_id` up to revision last_rev, failing
    on anything else for that watch (cancel, empty response)."""
    out: list[tuple[rpc_pb2.WatchResponse, kv_pb2.Event]] = []
    deadline = time.monotonic() + timeout
    while not out or out[-1][1].kv.mod_revision < last_rev:
        resp = await next_resp(stream, max(0.01, deadline - time.monotonic()))
        if resp.watch_id != watch_id:
            continue
        assert not resp.canceled and not resp.created, resp
        assert resp.events, f"unexpected empty response {resp}"
        out.extend((resp, ev) for ev in resp.events)
    return out


def revisions(pairs) -> list[int]:
    return [ev.kv.mod_revision for _, ev in pairs]


async def create(stream: WatchStream, **kw) -> rpc_pb2.WatchResponse:
    stream.handle(rpc_pb2.WatchRequest(create_request=CR(**kw)))
    resp = await next_resp(stream)
    assert resp.created, resp
    return resp


async def assert_nothing_queued(stream: WatchStream, hub: WatchHub, applier: Applier) -> None:
    """After one more write goes through the hub, nothing is queued for stream."""
    await applier.put(b"__sentinel__")
    for _ in range(20):
        await asyncio.sleep(0)
    assert stream.queued == 0


# -- live events -------------------------------------------------------------------
def test_created_comes_first_then_live_events_of_one_key():
    async def t(hub: WatchHub, ap: Applier) -> None:
        await ap.put(b"k", b"old")
        s = hub.open_stream()
        created = await create(s, key=b"k")
        assert created.watch_id == 0 and created.header.revision == 2
        await ap.put(b"other")
        rev = await ap.put(b"k", b"new")
        resp = await next_resp(s)
        assert (resp.watch_id, resp.header.revision) == (0, rev)
        [ev] = resp.events
        assert (ev.type, ev.kv.key, ev.kv.value, ev.kv.mod_revision, ev.kv.version) == (PUT, b"k", b"new", rev, 2)
        assert not ev.HasField("prev_kv"), "prev_kv only when asked for"
        rev = await ap.delete(b"k")
        resp = await next_resp(s)
        assert [(e.type, e.kv.key, e.kv.mod_revision) for e in resp.events] == [(DELETE, b"k", rev)]
        await assert_nothing_queued(s, hub, ap)
    run(t)


def test_prefix_from_key_and_all_keys_ranges():
    async def t(hub: WatchHub, ap: Applier) -> None:
        s = hub.open_stream()
        await create(s, key=b"p/", range_end=b"p0", watch_id=1)         # prefix p/
        await create(s, key=b"m", range_end=b"\x00", watch_id=2)        # every key >= m
        await create(s, key=b"", range_end=b"\x00", watch_id=3)         # everything
        for key in (b"a", b"p/1", b"p0", b"z"):
            await ap.put(key)
        got: dict[int, list[bytes]] = {1: [], 2: [], 3: []}
        while len(got[3]) < 4:
            resp = await next_resp(s)
            got[resp.watch_id].extend(e.kv.key for e in resp.events)
        while len(got[2]) < 3 or len(got[1]) < 1:
            resp = await next_resp(s)
            got[resp.watch_id].extend(e.kv.key for e in resp.events)
        assert got == {1: [b"p/1"], 2: [b"p/1", b"p0", b"z"], 3: [b"a", b"p/1", b"p0", b"z"]}
    run(t)


def test_one_revision_is_one_response_and_never_split():
    async def t(hub: WatchHub, ap: Applier) -> None:
        s = hub.open_stream()
        await create(s, key=b"t/", range_end=b"t0")
        rev = await ap.txn_puts([(b"t/%02d" % i, b"x") for i in range(20)])
        resp = await next_resp(s)
        assert len(resp.events) == 20 and {e.kv.mod_revision for e in resp.events} == {rev}
        assert not resp.fragment
    run(t)


def test_fragment_splits_a_large_revision_only_when_asked():
    async def t(hub: WatchHub, ap: Applier) -> None:
        plain = hub.open_stream(max_response_bytes=1000)
        frag = hub.open_stream(max_response_bytes=1000)
        await create(plain, key=b"f/", range_end=b"f0")
        await create(frag, key=b"f/", range_end=b"f0", fragment=True)
        await ap.txn_puts([(b"f/%02d" % i, b"x" * 100) for i in range(30)])
        whole = await next_resp(plain)
        assert len(whole.events) == 30 and not whole.fragment
        parts = []
        while not parts or parts[-1].fragment:
            parts.append(await next_resp(frag))
        assert len(parts) > 1
        assert all(p.fragment for p in parts[:-1]) and not parts[-1].fragment
        assert all(p.ByteSize() < 1000 for p in parts)
        assert [e.kv.key for p in parts for e in p.events] == [e.kv.key for e in whole.events]
    run(t)


# -- filters and prev_kv ----------------------------------------------------------------
def test_filters_and_prev_kv():
    async def t(hub: WatchHub, ap: Applier) -> None:
        s = hub.open_stream()
        await create(s, key=b"k", watch_id=1, filters=[CR.NOPUT])
        await create(s, key=b"k", watch_id=2, filters=[CR.NODELETE])
        await create(s, key=b"k", watch_id=3, prev_kv=True)
        r1 = await ap.put(b"k", b"a")
        r2 = await ap.put(b"k", b"b")
        r3 = await ap.delete(b"k")
        seen: dict[int, list[tuple]] = {1: [], 2: [], 3: []}
        while len(seen[3]) < 3 or len(seen[2]) < 2 or len(seen[1]) < 1:
            resp = await next_resp(s)
            assert resp.events, "a revision whose events are all filtered sends nothing"
            for e in resp.events:
                prev = e.prev_kv.value if e.HasField("prev_kv") else None
                seen[resp.watch_id].append((e.type, e.kv.mod_revision, e.kv.value, prev))
        assert seen[1] == [(DELETE, r3, b"", None)]
        assert seen[2] == [(PUT, r1, b"a", None), (PUT, r2, b"b", None)]
        assert seen[3] == [(PUT, r1, b"a", None), (PUT, r2, b"b", b"a"), (DELETE, r3, b"", b"b")]
        await assert_nothing_queued(s, hub, ap)
    run(t)


def test_prev_kv_is_stripped_from_copies_not_from_the_shared_events():
    async def t(hub: WatchHub, ap: Applier) -> None:
        shared: list[kv_pb2.Event] = []
        hub.store.add_listener(lambda rev, evs: shared.extend(evs))
        s = hub.open_stream()
        await create(s, key=b"k")
        await ap.put(b"k", b"1")
        await ap.put(b"k", b"2")
        resp = await next_resp(s)
        resp = await next_resp(s)
        assert not resp.events[0].HasField("prev_kv")
        assert shared[-1].prev_kv.value == b"1", "the store's event must not be mutated"
    run(t)


# -- history, the seam and compaction ---------------------------------------------------------
def test_replay_from_the_past_then_live_without_gap_or_duplicate():
    """History is read in small steps while writes keep coming, so the watcher
    crosses from history to live events under load."""
    async def t(hub: WatchHub, ap: Applier) -> None:
        first = await ap.puts([(b"r/%d" % (i % 7), b"%d" % i) for i in range(300)])
        s = hub.open_stream()
        created = await create(s, key=b"r/", range_end=b"r0", start_revision=5, prev_kv=True)
        assert created.header.revision == first

        async def writer() -> int:
            last = 0
            for i in range(40):
                last = await ap.puts([(b"r/%d" % (j % 7), b"live") for j in range(5)])
            return last

        last = await writer()
        pairs = await events_until(s, created.watch_id, last)
        assert revisions(pairs) == list(range(5, last + 1)), "every revision once, in order"
        # Replayed events look exactly like live ones (prev_kv included).
        ev5 = pairs[0][1]
        assert ev5.kv.key == b"r/%d" % (3 % 7) and ev5.prev_kv.mod_revision == 0  # rev 5 = 4th write, first of r/3
        ev9 = pairs[4][1]  # rev 9 = 8th write (i=7): r/0 again, previous version from rev 2
        assert ev9.kv.key == b"r/0" and ev9.prev_kv.mod_revision == 2
        # Header revisions never go backwards and cover the events they carry.
        headers = [r.header.revision for r, _ in pairs]
        assert headers == sorted(headers)
        assert all(r.header.revision >= e.kv.mod_revision for r, e in pairs)
        more = await ap.put(b"r/x")
        pairs = await events_until(s, created.watch_id, more)
        assert revisions(pairs) == [more]
    run(t, history_step_bytes=2000)


def test_future_start_revision_waits_for_it():
    async def t(hub: WatchHub, ap: Applier) -> None:
        s = hub.open_stream()
        created = await create(s, key=b"k", start_revision=hub.last_revision + 3)
        await ap.put(b"k", b"1")
        await ap.put(b"k", b"2")
        r3 = await ap.put(b"k", b"3")
        pairs = await events_until(s, created.watch_id, r3)
        assert [ev.kv.value for _, ev in pairs] == [b"3"]
    run(t)


def test_compacted_start_is_canceled_with_compact_revision():
    async def t(hub: WatchHub, ap: Applier) -> None:
        for i in range(10):
            await ap.put(b"c", b"%d" % i)
        await ap.compact(6)
        s = hub.open_stream()
        created = await create(s, key=b"c", start_revision=3)
        resp = await next_resp(s)
        assert (resp.watch_id, resp.canceled, resp.compact_revision) == (created.watch_id, True, 6)
        assert not resp.events
        # The watcher is gone: further writes send nothing on the stream.
        await assert_nothing_queued(s, hub, ap)
        # Just after the compaction is still readable.
        ok = await create(s, key=b"c", start_revision=7)
        pairs = await events_until(s, ok.watch_id, 11)
        assert revisions(pairs) == [7, 8, 9, 10, 11]
    run(t)


def test_snapshot_install_gap_is_filled_from_history():
    """A follower that installs a snapshot jumps revisions without events; its
    synced watchers must get what they missed from history."""
    async def t(hub: WatchHub, ap: Applier) -> None:
        await ap.put(b"g", b"0")
        s = hub.open_stream()
        created = await create(s, key=b"g")
        leader = open_store()
        for i in range(1, 6):
            leader.set_apply_position(i, 0)
            leader.put(rpc_pb2.PutRequest(key=b"g", value=b"%d" % i))
        await ap.run(lambda: hub.store.import_items(leader.export_items()))
        assert hub.store.revision == 6
        rev = await ap.put(b"g", b"after")
        pairs = await events_until(s, created.watch_id, rev)
        assert revisions(pairs) == [3, 4, 5, 6, 7]
        assert pairs[0][1].kv.value == b"2"
        leader.close()
    run(t)


# -- slow consumers ----------------------------------------------------------------------------
def test_slow_stream_does_not_block_writes_or_others_and_resyncs_from_history():
    async def t(hub: WatchHub, ap: Applier) -> None:
        slow = hub.open_stream()
        fast = hub.open_stream(max_queued_responses=100_000)
        ws = (await create(slow, key=b"s/", range_end=b"s0")).watch_id
        wf = (await create(fast, key=b"s/", range_end=b"s0")).watch_id
        last = 0
        for i in range(30):
            last = await ap.puts([(b"s/%d" % j, b"%d" % i) for j in range(10)])
        # Writes went through although nobody reads `slow`.
        assert slow.queued <= 8, "the slow stream's queue stays bounded"
        [w] = slow.watchers.values()
        assert not w.synced, "the slow watcher was switched to history"
        [f] = fast.watchers.values()
        assert f.synced, "another stream's watcher is unaffected"
        assert revisions(await events_until(fast, wf, last)) == list(range(2, last + 1))
        # The slow one, once read, gets every revision from history, then live.
        pairs = await events_until(slow, ws, last)
        assert revisions(pairs) == list(range(2, last + 1))
        assert w.synced
        rev = await ap.put(b"s/x")
        assert revisions(await events_until(slow, ws, rev)) == [rev]
    run(t, max_queued_responses=8)


def test_slow_watcher_overtaken_by_compaction_is_canceled():
    async def t(hub: WatchHub, ap: Applier) -> None:
        slow = hub.open_stream()
        wid = (await create(slow, key=b"s")).watch_id
        for i in range(20):
            await ap.put(b"s", b"%d" % i)
        await ap.compact(15)
        got: list[rpc_pb2.WatchResponse] = []
        while not (got and got[-1].canceled):
            got.append(await next_resp(slow))
        revs = [e.kv.mod_revision for r in got for e in r.events]
        assert revs == list(range(2, 2 + len(revs))), "what arrived has no gap"
        assert revs[-1] < 15
        assert (got[-1].watch_id, got[-1].compact_revision) == (wid, 15)
    run(t, max_queued_responses=4)


# -- many watchers --------------------------------------------------------------------------------
def test_thousands_of_watchers_each_get_only_their_key():
    async def t(hub: WatchHub, ap: Applier) -> None:
        streams = [hub.open_stream() for _ in range(20)]
        for i in range(5000):
            streams[i % 20].handle(rpc_pb2.WatchRequest(create_request=CR(key=b"key/%d" % i)))
        for s in streams:
            while s.queued:
                assert (await next_resp(s)).created
        assert hub.watcher_count == 5000
        started = time.monotonic()
        revs = {}
        for i in range(0, 5000, 100):
            revs[i] = await ap.put(b"key/%d" % i, b"%d" % i)
        for i in range(0, 5000, 100):
            s = streams[i % 20]
            resp = await next_resp(s)
            [ev] = resp.events
            assert (ev.kv.key, ev.kv.mod_revision) == (b"key/%d" % i, revs[i])
        assert all(s.queued == 0 for s in streams)
        assert time.monotonic() - started < 10
        for s in streams:
            s.close()
        assert hub.watcher_count == 0 and not hub._by_key
    run(t)


# -- ids, cancel, progress ---------------------------------------------------------------------------
def test_ids_duplicates_empty_range_and_cancel():
    async def t(hub: WatchHub, ap: Applier) -> None:
        s = hub.open_stream()
        assert (await create(s, key=b"a", watch_id=1)).watch_id == 1
        assert (await create(s, key=b"a")).watch_id == 0
        assert (await create(s, key=b"a")).watch_id == 2, "auto ids skip ids in use"
        dup = await create(s, key=b"b", watch_id=1)
        assert (dup.watch_id, dup.canceled, dup.cancel_reason) == (-1, True, ERR_DUPLICATE_ID)
        empty = await create(s, key=b"b", range_end=b"a")
        assert (empty.watch_id, empty.canceled, empty.cancel_reason) == (-1, True, ERR_EMPTY_RANGE)
        s.handle(rpc_pb2.WatchRequest(cancel_request=rpc_pb2.WatchCancelRequest(watch_id=1)))
        resp = await next_resp(s)
        assert (resp.watch_id, resp.canceled, resp.created) == (1, True, False)
        s.handle(rpc_pb2.WatchRequest(cancel_request=rpc_pb2.WatchCancelRequest(watch_id=99)))
        s.handle(rpc_pb2.WatchRequest())  # nothing set: ignored
        rev = await ap.put(b"a")
        got = sorted([(await next_resp(s)).watch_id for _ in range(2)])
        assert got == [0, 2], "the canceled watch gets nothing, unknown cancel answered nothing"
        assert s.queued == 0
        # An id freed by cancel can be used again.
        assert (await create(s, key=b"a", watch_id=1)).header.revision == rev
    run(t)


def test_progress_request_waits_until_every_watcher_is_synced():
    async def t(hub: WatchHub, ap: Applier) -> None:
        last = await ap.puts([(b"p", b"%d" % i) for i in range(50)])
        s = hub.open_stream()
        s.handle(rpc_pb2.WatchRequest(progress_request=rpc_pb2.WatchProgressRequest()))
        resp = await next_resp(s)
        assert (resp.watch_id, resp.header.revision) == (-1, last)
        wid = (await create(s, key=b"p", start_revision=2)).watch_id
        s.handle(rpc_pb2.WatchRequest(progress_request=rpc_pb2.WatchProgressRequest()))
        revs = []
        while True:
            resp = await next_resp(s)
            if resp.watch_id == -1:
                break
            assert resp.watch_id == wid
            revs.extend(e.kv.mod_revision for e in resp.events)
        assert revs == list(range(2, last + 1)), "progress comes after every event it vouches for"
        assert resp.header.revision == last and not resp.events
    run(t, history_step_bytes=500)


def test_progress_notify_every_interval_only_when_idle():
    async def t(hub: WatchHub, ap: Applier) -> None:
        s = hub.open_stream()
        wid = (await create(s, key=b"n", progress_notify=True)).watch_id
        await create(s, key=b"n2")  # no progress_notify: never notified
        resp = await next_resp(s, timeout=5)
        assert (resp.watch_id, len(resp.events), resp.header.revision) == (wid, 0, hub.last_revision)
        assert not (resp.created or resp.canceled)
        # A watcher busy with events gets no notification for that interval.
        hub.progress_interval = 3600
        rev = await ap.put(b"n")
        resp = await next_resp(s)
        assert resp.events[0].kv.mod_revision == rev
        hub.notify_progress()  # the tick after events: elided
        assert s.queued == 0
        hub.notify_progress()  # an idle interval: notified
        assert (await next_resp(s)).watch_id == wid
    run(t, progress_interval=0.2)


def test_closing_the_stream_drops_its_watchers_and_stop_ends_streams():
    async def t(hub: WatchHub, ap: Applier) -> None:
        s1, s2 = hub.open_stream(), hub.open_stream()
        await create(s1, key=b"x")
        await create(s1, key=b"y", range_end=b"z")
        await create(s2, key=b"x", start_revision=1)
        s1.close()
        assert hub.watcher_count == 1
        assert await s1.next_response() is None
        hub.stop()
        assert await asyncio.wait_for(s2.next_response(), TIMEOUT) is None
        assert hub.watcher_count == 0
        assert await hub.open_stream().next_response() is None
        await ap.put(b"x")  # the store keeps working after the hub stopped
    run(t)


# -- found in review: stale next revisions ------------------------------------------------
async def _drain_all(stream, timeout=1.0):
    out = []
    while True:
        try:
            out.append(as_message(await asyncio.wait_for(stream.next_response(), timeout)))
        except asyncio.TimeoutError:
            return out


def test_idle_watcher_on_a_full_stream_is_not_canceled_as_compacted():
    async def t(hub, ap):
        s = hub.open_stream()
        await create(s, key=b"busy")
        idle = (await create(s, key=b"idle")).watch_id
        for i in range(20):
            await ap.put(b"other", b"%d" % i)
        await ap.compact(15)
        for i in range(6):
            await ap.put(b"busy", b"%d" % i)       # s fills up: nobody reads it
        rev = await ap.put(b"idle", b"x")
        mine = [r for r in await _drain_all(s) if r.watch_id == idle]
        assert not any(r.canceled for r in mine), mine
        assert [e.kv.mod_revision for r in mine for e in r.events] == [rev]
    run(t, max_queued_responses=4)


def test_watch_from_now_after_a_snapshot_install():
    async def t(hub, ap):
        await ap.put(b"a")
        leader = open_store()
        for i in range(1, 50):
            leader.set_apply_position(i, 0)
            leader.put(rpc_pb2.PutRequest(key=b"z", value=b"%d" % i))
        leader.compact(rpc_pb2.CompactionRequest(revision=45))
        await ap.run(lambda: hub.store.import_items(leader.export_items()))
        s = hub.open_stream()
        created = await create(s, key=b"w")
        assert created.header.revision == hub.store.revision
        rev = await ap.put(b"w", b"new")
        got = await _drain_all(s)
        assert [e.kv.mod_revision for r in got for e in r.events] == [rev] and not any(r.canceled for r in got)
        leader.close()
    run(t)


# -- no watcher, no wake-up ------------------------------------------------------------------
def test_with_no_watcher_writes_do_not_wake_the_loop_and_a_new_watch_starts_after_them():
    async def t(hub: WatchHub, ap: Applier) -> None:
        woken = 0
        drain = hub._drain

        def counting_drain() -> None:
            nonlocal woken
            woken += 1
            drain()
        hub._drain = counting_drain  # type: ignore[method-assign]
        for i in range(20):
            await ap.put(b"k", b"%d" % i)
        assert woken == 0 and not hub._incoming
        s = hub.open_stream()
        created = await create(s, key=b"k")
        assert created.header.revision == ap.store.revision == 21
        rev = await ap.put(b"k", b"watched")
        resp = await next_resp(s)
        assert [(e.kv.value, e.kv.mod_revision) for e in resp.events] == [(b"watched", rev)]
        assert woken >= 1
        s.handle(rpc_pb2.WatchRequest(cancel_request=rpc_pb2.WatchCancelRequest(watch_id=created.watch_id)))
        assert (await next_resp(s)).canceled
        assert not hub._watching
        refused = await create(s, key=b"b", range_end=b"a")  # an empty range is refused
        assert refused.canceled and not hub._watching
        woken = 0
        await ap.put(b"k", b"unwatched")
        assert woken == 0 and hub.last_revision == rev + 1
        past = await create(s, key=b"k", start_revision=rev)  # history still serves a past start
        got = await events_until(s, past.watch_id, rev + 1)
        assert [ev.kv.value for _, ev in got] == [b"watched", b"unwatched"]
    run(t)


def test_watches_created_while_the_key_is_written_see_every_revision_after_their_header():
    """The seam between quiet (no watcher) and watched: a watch created and
    canceled over and over while another thread keeps writing gets, as its
    first event, the revision right after its created header -- never a gap."""
    async def t(hub: WatchHub, ap: Applier) -> None:
        stop = False

        def writer() -> int:
            n = 0
            while not stop:
                ap._put(b"k", b"%d" % n)
                n += 1
                time.sleep(0)  # let the loop in between writes, not only every switch interval
            return n
        writing = asyncio.get_running_loop().run_in_executor(ap.pool, writer)
        try:
            s = hub.open_stream()
            for i in range(50):
                created = await create(s, key=b"k", watch_id=i + 1)
                resp = await next_resp(s)
                assert resp.watch_id == i + 1 and resp.events, resp
                assert resp.events[0].kv.mod_revision == created.header.revision + 1
                s.handle(rpc_pb2.WatchRequest(cancel_request=rpc_pb2.WatchCancelRequest(watch_id=i + 1)))
                while not (await next_resp(s)).canceled:
                    pass
                assert not hub._by_key and not hub._watching
                await asyncio.sleep(0.001)  # let some revisions go by unwatched
        finally:
            stop = True
            assert await writing > 50
    run(t)


def test_next_responses_takes_the_queue_in_order_up_to_a_size_and_frees_room():
    async def t(hub: WatchHub, ap: Applier) -> None:
        s = hub.open_stream(max_queued_responses=8)
        ids = [(await create(s, key=b"k", watch_id=i)).watch_id for i in range(1, 5)]
        await ap.put(b"k", b"x" * 100)
        await ap.put(b"k", b"y" * 100)
        deadline = time.monotonic() + TIMEOUT
        while s.queued < 8:  # 4 watchers x 2 revisions
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert s.full
        first = [as_message(r) for r in await s.next_responses(1)]
        assert len(first) == 1, "at least one, even over the size"
        one = len(first[0].SerializeToString())
        rest = [as_message(r) for r in await s.next_responses(one * 3)]
        assert len(rest) == 3 and not s.full
        rest += [as_message(r) for r in await s.next_responses(1 << 20)]
        got = [(r.watch_id, r.events[0].kv.value[:1]) for r in first + rest]
        assert sorted(got[:4]) == [(i, b"x") for i in ids] and sorted(got[4:]) == [(i, b"y") for i in ids]
        assert s.queued == 0 and s._queued_bytes == 0
        s.close()
        assert await s.next_responses(1 << 20) is None
    run(t)
