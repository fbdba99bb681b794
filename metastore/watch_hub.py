"""The watch hub: fans the store's committed events out to etcd watchers.

One hub per member. The store calls `WatchHub._on_commit` on the Raft apply
thread after every revision; the hub only appends the revision to a deque and
wakes the event loop once per burst, so the apply thread never waits for a
watcher. While the member has no watcher at all it only notes the revision (no
wake-up); the first watch created afterwards counts it as dispatched. Everything
else runs on the event loop:

* **Streams.** A `WatchStream` is one gRPC Watch call: many watchers, one
  bounded FIFO send queue of `WatchResponse`s (for the gRPC call, live events
  as serialized bytes: metastore/watch_wire.py). Control responses (created,
  canceled, progress) and events share that queue, which is what orders a
  watch's `created` response before its events and a progress notification
  after every event it vouches for.
* **Synced watchers** receive live revisions: revision R goes to a watcher iff
  R >= its `next_rev` (the first revision it has not been given yet), which
  then becomes R + 1. Single-key watchers are indexed by key, range watchers
  kept apart, so dispatching a revision costs O(events + range watchers), not
  O(all watchers).
* **Unsynced watchers** (created with a past start revision, or whose stream's
  queue overflowed because the client reads too slowly) are caught up from the
  store's history (`MVCCStore.events_since`, in an executor thread) by their
  stream's resync task, in bounded steps, only while the stream's queue has
  room. A watcher becomes synced again only once its `next_rev` is past the
  last revision the hub has dispatched; otherwise it reads history again. So
  at the seam between history and live events nothing is lost or repeated.
  If the history it needs was compacted, the watcher is canceled with
  `compact_revision`, as etcd does.

Guarantees per watcher, as etcd's: revisions strictly increase, no gaps, no
duplicates, all events of one revision in one response (unless the client
asked for `fragment`).
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from typing import Callable, Iterable, Sequence

from metastore import errors, watch_wire
from metastore.api.pb import kv_pb2, rpc_pb2
from metastore.errors import EtcdError
from metastore.mvcc import MVCCStore
from metastore.mvcc_events import event_keys
from metastore.mvcc_range import KeyRange, key_range

log = logging.getLogger("metastore.watch")

PUT = kv_pb2.Event.PUT
DELETE = kv_pb2.Event.DELETE
NOPUT = rpc_pb2.WatchCreateRequest.NOPUT
NODELETE = rpc_pb2.WatchCreateRequest.NODELETE

# etcd's default --experimental-watch-progress-notify-interval (10 minutes):
# how often a progress_notify watcher with no events hears the revision.
PROGRESS_NOTIFY_INTERVAL = 600.0
# A stream's send queue bound. Past it, watchers of the stream stop taking live
# events and are caught up from history once the client has read the backlog
# down to half of it (so a slow client costs bounded memory, never a blocked
# apply thread or a lost event).
MAX_QUEUED_RESPONSES = 1024
MAX_QUEUED_BYTES = 16 * 1024 * 1024
# History read for one watcher in one catch-up step (events' bytes): keeps a
# far-behind watcher from monopolising the executor or its stream's queue.
HISTORY_STEP_BYTES = 1024 * 1024
# etcd's --max-request-bytes default; responses are batched (and, with
# fragment, split) against it. The API layer passes the configured value.
DEFAULT_MAX_RESPONSE_BYTES = 1572864

# etcd's cancel reasons (mvcc package errors), sent as cancel_reason.
ERR_DUPLICATE_ID = "mvcc: duplicate watch ID provided on the WatchStream"
ERR_EMPTY_RANGE = "mvcc: watcher range is empty"

HeaderFiller = Callable[[rpc_pb2.ResponseHeader, int], None]


def _revision_only(header: rpc_pb2.ResponseHeader, revision: int) -> None:
    header.revision = revision


def _varint_len(n: int) -> int:
    size = 1
    while n >= 0x80:
        n >>= 7
        size += 1
    return size


def _event_field_size(ev: kv_pb2.Event) -> int:
    """Bytes an event adds to a WatchResponse (field 11: tag + length + body)."""
    body = ev.ByteSize()
    return 1 + _varint_len(body) + body


class Watcher:
    """One watch: its key range, options and delivery position. Cheap when
    idle -- a handful of attributes, no task."""

    __slots__ = (
        "id", "stream", "key", "range_end", "keys", "single", "next_rev", "synced",
        "no_put", "no_delete", "prev_kv", "fragment", "progress_notify", "removed", "had_events",
    )

    def __init__(self, stream: "WatchStream", watch_id: int, key: bytes, range_end: bytes,
                 keys: KeyRange, next_rev: int, creq: rpc_pb2.WatchCreateRequest) -> None:
        self.id = watch_id
        self.stream = stream
        self.key = key
        self.range_end = range_end
        self.keys = keys
        self.single = keys.single
        self.next_rev = next_rev
        self.synced = False
        filters = set(creq.filters)
        self.no_put = NOPUT in filters
        self.no_delete = NODELETE in filters
        self.prev_kv = creq.prev_kv
        self.fragment = creq.fragment
        self.progress_notify = creq.progress_notify
        self.removed = False
        # Events sent since the last progress tick (etcd elides the next
        # progress notification for a watcher that just got events).
        self.had_events = False

    def select(self, events: Sequence[kv_pb2.Event]) -> Sequence[kv_pb2.Event]:
        """The events this watcher's filters keep (the shared objects, uncopied;
        `events` itself when it has no filter, so watchers given one list
        share its encoding)."""
        if not (self.no_put or self.no_delete):
            return events
        return [ev for ev in events
                if not ((ev.type == PUT and self.no_put) or (ev.type == DELETE and self.no_delete))]

    def response(self, events: Iterable[kv_pb2.Event]) -> rpc_pb2.WatchResponse:
        """A header-less response carrying copies of `events`, prev_kv stripped
        unless asked for (the store's events are shared and never mutated)."""
        resp = rpc_pb2.WatchResponse(watch_id=self.id)
        resp.events.extend(events)  # copies
        if not self.prev_kv:
            for ev in resp.events:
                if ev.HasField("prev_kv"):
                    ev.ClearField("prev_kv")
        return resp


class WatchStream:
    """One Watch RPC: its watchers, its send queue and its resync task.

    All methods run on the hub's event loop. The API layer feeds requests to
    `handle` and sends what `next_response` (one at a time) or
    `next_responses` (all that is queued) returns until it returns None.
    """

    def __init__(self, hub: "WatchHub", max_response_bytes: int, fill_header: HeaderFiller,
                 max_queued_responses: int, max_queued_bytes: int, encoded: bool = False) -> None:
        self._hub = hub
        # Live events may be queued as serialized WatchResponses (bytes, see
        # metastore.watch_wire) for a consumer that sends them as they are.
        self.encoded = encoded
        self.max_response_bytes = max_response_bytes
        self._fill_header = fill_header
        self._max_responses = max_queued_responses
        self._max_bytes = max_queued_bytes
        self.watchers: dict[int, Watcher] = {}
        self._next_auto_id = 0
        self._queue: deque[tuple[rpc_pb2.WatchResponse | bytes, int]] = deque()
        self._queued_bytes = 0
        self._readable = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self.unsynced: set[Watcher] = set()
        self._resync_order: deque[Watcher] = deque()
        self._resync_task: asyncio.Task | None = None
        self._progress_deferred = False
        self.closed = False

    # -- requests ------------------------------------------------------------
    def handle(self, req: rpc_pb2.WatchRequest) -> None:
        """Apply one WatchRequest; unknown or empty requests are ignored (etcd
        keeps the stream open rather than failing it)."""
        which = req.WhichOneof("request_union")
        if which == "create_request":
            self.create(req.create_request)
        elif which == "cancel_request":
            self.cancel(req.cancel_request.watch_id)
        elif which == "progress_request":
            self.request_progress()

    def create(self, creq: rpc_pb2.WatchCreateRequest) -> int:
        """etcd's create: answer `created` (with the current revision) before
        any event of the watch; -1 with created+canceled if refused."""
        if self.closed:
            return -1
        hub = self._hub
        hub._watch_begins()
        try:
            return self._create(creq, hub)
        finally:
            hub._watch_ends_if_idle()  # refused (or failed): quiet again if nobody watches

    def _create(self, creq: rpc_pb2.WatchCreateRequest, hub: "WatchHub") -> int:
        current = hub.last_revision
        key = creq.key or b"\x00"  # \x00 is the smallest key
        range_end = creq.range_end
        if range_end and range_end != b"\x00" and key >= range_end:
            self._refuse(current, ERR_EMPTY_RANGE)
            return -1
        watch_id = creq.watch_id
        if watch_id == 0:
            while self._next_auto_id in self.watchers:
                self._next_auto_id += 1
            watch_id = self._next_auto_id
            self._next_auto_id += 1
        elif watch_id in self.watchers:
            self._refuse(current, ERR_DUPLICATE_ID)
            return -1
        start = creq.start_revision
        if start == 0:
            start = current + 1
        # A negative start would be nonsense; read it as "from the oldest
        # revision", which gets the compaction answer if history is gone.
        start = max(start, 1)
        w = Watcher(self, watch_id, key, range_end, key_range(key, range_end), start, creq)
        self.watchers[watch_id] = w
        self._push_control(rpc_pb2.WatchResponse(watch_id=watch_id, created=True), current)
        hub._add(w)
        if start > current:
            w.synced = True  # everything it wants is still to come live
        else:
            self._mark_unsynced(w)
        return watch_id

    def _refuse(self, revision: int, reason: str) -> None:
        self._push_control(rpc_pb2.WatchResponse(
            watch_id=-1, created=True, canceled=True, cancel_reason=reason), revision)

    def cancel(self, watch_id: int) -> None:
        """Cancel one watch; etcd ignores an id it does not know."""
        w = self.watchers.get(watch_id)
        if w is None or self.closed:
            return
        self._push_control(rpc_pb2.WatchResponse(watch_id=watch_id, canceled=True),
                           self._hub.last_revision)
        self._remove(w)

    def request_progress(self) -> None:
        """Answer with watch_id -1 and the current revision once every watcher
        of the stream is synced: only then has each been sent every event up to
        that revision (etcd 3.5's fixed behaviour; 3.4 answered at once)."""
        if self.closed:
            return
        if self.unsynced:
            self._progress_deferred = True
            return
        self._push_control(rpc_pb2.WatchResponse(watch_id=-1), self._hub.last_revision)

    # -- the send queue --------------------------------------------------------
    @property
    def full(self) -> bool:
        return len(self._queue) >= self._max_responses or self._queued_bytes >= self._max_bytes

    @property
    def _has_room_for_history(self) -> bool:
        return len(self._queue) < self._max_responses // 2 and self._queued_bytes < self._max_bytes // 2

    def _push(self, resp: rpc_pb2.WatchResponse, revision: int) -> None:
        self._fill_header(resp.header, revision)
        self._enqueue(resp)

    def _enqueue(self, resp: rpc_pb2.WatchResponse | bytes) -> None:
        size = len(resp) if type(resp) is bytes else resp.ByteSize()  # type: ignore[union-attr]
        self._queue.append((resp, size))
        self._queued_bytes += size
        self._readable.set()
        if not self._has_room_for_history:
            self._room.clear()

    def _push_control(self, resp: rpc_pb2.WatchResponse, revision: int) -> None:
        if not self.closed:
            self._push(resp, revision)

    def _push_events(self, w: Watcher, resp: rpc_pb2.WatchResponse, revision: int) -> None:
        """Queue an event response, split into fragments if the watcher asked
        for them and it is too big (etcd's sendFragments)."""
        w.had_events = True
        self._fill_header(resp.header, revision)
        if w.fragment and len(resp.events) > 1 and resp.ByteSize() >= self.max_response_bytes:
            for part in _fragments(resp, self.max_response_bytes):
                self._enqueue(part)
        else:
            self._enqueue(resp)

    def _push_encoded(self, w: Watcher, data: bytes, selected: Sequence[kv_pb2.Event],
                      revision: int) -> None:
        """Queue a serialized event response (an `encoded` stream); one to be
        fragmented goes the message way."""
        if w.fragment and len(selected) > 1 and len(data) >= self.max_response_bytes:
            self._push_events(w, w.response(selected), revision)
            return
        w.had_events = True
        self._enqueue(data)

    async def wait_for_room(self) -> None:
        """Until the send queue is below its bound (or the stream closed): the
        reader waits here, so a client that sends requests but never reads
        answers cannot grow the queue without limit (etcd does the same)."""
        while self.full and not self.closed:
            await self._room.wait()

    async def _until_queued(self) -> bool:
        """Until something is queued (True) or the stream is closed with
        nothing left (False)."""
        while not self._queue:
            if self.closed:
                return False
            self._readable.clear()
            await self._readable.wait()
        return True

    async def next_response(self) -> rpc_pb2.WatchResponse | bytes | None:
        """The next response to send (bytes: serialized, only on an `encoded`
        stream); None once the stream is closed."""
        if not await self._until_queued():
            return None
        resp, size = self._queue.popleft()
        self._queued_bytes -= size
        if self._has_room_for_history:
            self._room.set()
        return resp

    async def next_responses(self, max_bytes: int) -> list[rpc_pb2.WatchResponse | bytes] | None:
        """Every queued response, in order, up to about `max_bytes` (at least
        one); None once the stream is closed. A sender that writes them in
        one go pays one write per wake-up instead of one per response."""
        if not await self._until_queued():
            return None
        queue = self._queue
        out = []
        taken = 0
        while queue and (not out or taken + queue[0][1] <= max_bytes):
            resp, size = queue.popleft()
            out.append(resp)
            taken += size
        self._queued_bytes -= taken
        if self._has_room_for_history:
            self._room.set()
        return out

    @property
    def queued(self) -> int:
        return len(self._queue)

    # -- sync state --------------------------------------------------------------
    def _mark_unsynced(self, w: Watcher) -> None:
        w.synced = False
        if w not in self.unsynced:
            self.unsynced.add(w)
            self._resync_order.append(w)
        if self._resync_task is None and not self.closed:
            self._resync_task = asyncio.get_running_loop().create_task(self._resync())

    def _mark_synced(self, w: Watcher) -> None:
        w.synced = True
        self.unsynced.discard(w)
        if not self.unsynced and self._progress_deferred:
            self._progress_deferred = False
            self._push_control(rpc_pb2.WatchResponse(watch_id=-1), self._hub.last_revision)

    def _remove(self, w: Watcher) -> None:
        w.removed = True
        self.watchers.pop(w.id, None)
        self.unsynced.discard(w)
        self._hub._discard(w)
        if not self.unsynced and self._progress_deferred:
            self._progress_deferred = False
            self._push_control(rpc_pb2.WatchResponse(watch_id=-1), self._hub.last_revision)

    def _compacted(self, w: Watcher) -> None:
        """etcd's answer to a watcher whose history is gone: canceled with the
        compact revision (etcdctl prints the compaction error and exits)."""
        self._push_control(rpc_pb2.WatchResponse(
            watch_id=w.id, canceled=True, compact_revision=self._hub.store.compact_revision),
            0)  # etcd's header here carries no revision
        self._remove(w)

    async def _resync(self) -> None:
        """Catch unsynced watchers up from history, one bounded step at a time,
        round robin, only while the client is keeping up with the queue."""
        hub = self._hub
        try:
            while self._resync_order and not self.closed:
                await self._room.wait()
                if self.closed:
                    return
                w = self._resync_order.popleft()
                if w.removed or w.synced:
                    continue
                await hub._catch_up(w)
                if not w.removed and not w.synced:
                    self._resync_order.append(w)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug must not leave watchers silently stuck
            log.exception("watch resync failed; closing the stream")
            self.close()
        finally:
            self._resync_task = None

    # -- lifecycle -----------------------------------------------------------------
    def close(self) -> None:
        """Drop every watcher and end `next_response(s)` (client gone or
        server stopping)."""
        if self.closed:
            return
        self.closed = True
        for w in list(self.watchers.values()):
            self._remove(w)
        self._queue.clear()
        self._queued_bytes = 0
        self._readable.set()
        self._room.set()
        if self._resync_task is not None and self._resync_task is not asyncio.current_task():
            self._resync_task.cancel()
        self._hub._streams.discard(self)


class _RevisionWire:
    """The encoded parts of one revision's event responses, made once each:
    the header per header filler, the events per distinct list (and prev_kv
    choice). Lives for one dispatch; keeps every list it encoded, so no id()
    it is keyed by is reused meanwhile."""

    __slots__ = ("revision", "_headers", "_events")

    def __init__(self, revision: int) -> None:
        self.revision = revision
        self._headers: dict[HeaderFiller, bytes] = {}
        self._events: dict[tuple[int, bool], tuple[Sequence[kv_pb2.Event], bytes]] = {}

    def response(self, w: Watcher, selected: Sequence[kv_pb2.Event]) -> bytes:
        fill = w.stream._fill_header
        header = self._headers.get(fill)
        if header is None:
            msg = rpc_pb2.ResponseHeader()
            fill(msg, self.revision)
            header = self._headers[fill] = watch_wire.header_field(msg)
        key = (id(selected), w.prev_kv)
        entry = self._events.get(key)
        if entry is None:
            entry = self._events[key] = (selected, watch_wire.events_field(selected, w.prev_kv))
        return watch_wire.event_response(header, w.id, entry[1])


class WatchHub:
    """Fans the store's applied events out to watchers on the event loop."""

    def __init__(self, store: MVCCStore, *, progress_interval: float = PROGRESS_NOTIFY_INTERVAL,
                 max_queued_responses: int = MAX_QUEUED_RESPONSES,
                 max_queued_bytes: int = MAX_QUEUED_BYTES,
                 history_step_bytes: int = HISTORY_STEP_BYTES) -> None:
        self.store = store
        self.progress_interval = progress_interval
        self.max_queued_responses = max_queued_responses
        self.max_queued_bytes = max_queued_bytes
        self.history_step_bytes = history_step_bytes
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False
        # Apply thread -> loop hand-off.
        self._lock = threading.Lock()
        self._incoming: deque[tuple[int, Sequence[kv_pb2.Event]]] = deque()
        self._drain_scheduled = False
        # While no watcher exists (most members, most of the time) the apply
        # thread only notes the revision here: no loop wake-up per revision.
        # Written by the loop (under the lock), read by the apply thread.
        self._watching = False
        self._quiet_rev = 0
        # Loop-owned state.
        self._last_rev = store.revision
        self._by_key: dict[bytes, set[Watcher]] = {}
        # Range watchers grouped by their exact range: thousands watching the
        # same prefix cost one match per revision, not one each.
        self._ranged: dict[tuple[bytes, bytes], dict[Watcher, None]] = {}
        self._progress_watchers: dict[Watcher, None] = {}
        self._streams: set[WatchStream] = set()
        self._progress_task: asyncio.Task | None = None
        store.add_listener(self._on_commit)

    # -- lifecycle -----------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            self._loop = loop
            self._last_rev = self.store.revision
            self._incoming.clear()
        self._progress_task = loop.create_task(self._progress_loop())

    def stop(self) -> None:
        """End every stream cleanly (their RPCs finish) and stop listening."""
        with self._lock:
            self._stopped = True
            self._incoming.clear()
        for stream in list(self._streams):
            stream.close()
        if self._progress_task is not None:
            self._progress_task.cancel()
            self._progress_task = None

    @property
    def last_revision(self) -> int:
        """The last revision dispatched to watchers, or noted while no watcher
        existed: what a new watch calls "current" (its created header, its
        start when start_revision is 0)."""
        if not self._watching:
            with self._lock:
                self._last_rev = max(self._last_rev, self._quiet_rev)
        return self._last_rev

    def _watch_begins(self) -> None:
        """(loop) A watcher is about to be added: from here on every revision
        is queued for the loop, and the quiet ones before count as dispatched
        (nobody was watching them)."""
        if not self._watching:
            with self._lock:
                self._watching = True
                self._last_rev = max(self._last_rev, self._quiet_rev)

    def _watch_ends_if_idle(self) -> None:
        """(loop) Back to noting revisions only, once no watcher is left."""
        if self._watching and not self._by_key and not self._ranged:
            with self._lock:
                self._watching = False

    def open_stream(self, *, max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
                    fill_header: HeaderFiller | None = None,
                    max_queued_responses: int | None = None,
                    max_queued_bytes: int | None = None, encoded: bool = False) -> WatchStream:
        """A new stream (one Watch RPC). Call on the loop; close it when the RPC
        ends. The queue bounds default to the hub's. `encoded`: its consumer
        takes serialized responses too (the gRPC Watch call)."""
        stream = WatchStream(self, max_response_bytes, fill_header or _revision_only,
                             max_queued_responses or self.max_queued_responses,
                             max_queued_bytes or self.max_queued_bytes, encoded)
        if self._stopped or self._loop is None:
            stream.close()
        else:
            self._streams.add(stream)
        return stream

    @property
    def watcher_count(self) -> int:
        return sum(len(s.watchers) for s in self._streams)

    # -- apply thread ----------------------------------------------------------------
    def _on_commit(self, revision: int, events: Sequence[kv_pb2.Event]) -> None:
        """Store listener (Raft apply thread): queue and wake the loop once per
        burst -- or, with no watcher, only note the revision. Never blocks on
        watchers."""
        with self._lock:
            loop = self._loop
            if loop is None or self._stopped:
                return  # no watcher can exist yet (or any more)
            if not self._watching:
                self._quiet_rev = revision
                return
            self._incoming.append((revision, events))
            if self._drain_scheduled:
                return
            self._drain_scheduled = True
        try:
            loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: the server is stopping
            pass

    # -- loop: live dispatch -------------------------------------------------------------
    def _drain(self) -> None:
        with self._lock:
            items = list(self._incoming)
            self._incoming.clear()
            self._drain_scheduled = False
        for revision, events in items:
            if revision <= self._last_rev:
                continue
            if revision > self._last_rev + 1:
                # Revisions arrived without events (a snapshot was installed):
                # whoever is synced missed them and must read them from history.
                self._resync_all_synced(revision)
            try:
                self._dispatch(revision, events)
            except Exception:
                log.exception("watch dispatch failed at revision %d", revision)
                # Whoever did not get it reads it from history: never a gap.
                self._resync_all_synced(revision + 1)
            self._last_rev = revision

    def _resync_all_synced(self, revision: int) -> None:
        """Send synced watchers that lack `revision - 1` back to history. A
        synced watcher has everything dispatched so far, however long ago its
        own last event was: it resumes after that, not from a stale revision
        a compaction may have passed."""
        for stream in list(self._streams):
            for w in list(stream.watchers.values()):
                if w.synced and w.next_rev < revision:
                    w.next_rev = max(w.next_rev, self._last_rev + 1)
                    stream._mark_unsynced(w)

    def _dispatch(self, revision: int, events: Sequence[kv_pb2.Event]) -> None:
        # By index, so that events no watcher matches are never built (LazyEvents).
        keys = event_keys(events)
        matched: dict[Watcher, Sequence[kv_pb2.Event]] = {}
        by_key = self._by_key
        if by_key:
            # Watchers of one key share one list: its encoding is made once.
            per_key: dict[bytes, list[kv_pb2.Event]] = {}
            for i, key in enumerate(keys):
                if key in by_key:
                    per_key.setdefault(key, []).append(events[i])
            for key, evs in per_key.items():
                for w in by_key[key]:
                    matched[w] = evs
        for group in self._ranged.values():
            contains = next(iter(group)).keys.contains
            mine = [events[i] for i, key in enumerate(keys) if contains(key)]
            if mine:
                for w in group:
                    matched[w] = mine
        wire: _RevisionWire | None = None
        # Watchers with the same filters over one list share one selection
        # (and so its encoding); the lists in `matched` live through the loop.
        filtered: dict[tuple[int, bool, bool], Sequence[kv_pb2.Event]] = {}
        for w, evs in matched.items():
            if not w.synced or revision < w.next_rev:
                continue
            if w.no_put or w.no_delete:
                fkey = (id(evs), w.no_put, w.no_delete)
                selected = filtered.get(fkey)  # type: ignore[assignment]
                if selected is None:
                    selected = filtered[fkey] = w.select(evs)
            else:
                selected = evs
            if not selected:
                w.next_rev = revision + 1
                continue
            stream = w.stream
            if stream.full:
                # Slow client: stop queueing for it; the revision (and what
                # follows) will come from history once it has read the backlog.
                log.debug("watch %d: send queue full, continuing from history at revision %d",
                          w.id, revision)
                w.next_rev = max(w.next_rev, revision)  # it had everything before
                stream._mark_unsynced(w)
                continue
            if stream.encoded:
                if wire is None:
                    wire = _RevisionWire(revision)
                stream._push_encoded(w, wire.response(w, selected), selected, revision)
            else:
                stream._push_events(w, w.response(selected), revision)
            w.next_rev = revision + 1

    # -- loop: catching up from history -----------------------------------------------------
    async def _catch_up(self, w: Watcher) -> None:
        """One history step for an unsynced watcher: read (off the loop) from
        its next revision up to what the hub has dispatched, queue it, and
        declare it synced if nothing newer has been dispatched meanwhile."""
        stream = w.stream
        end = self._last_rev
        if w.next_rev > end:
            stream._mark_synced(w)
            return
        loop = asyncio.get_running_loop()
        try:
            parts, next_rev = await loop.run_in_executor(
                None, self._read_history, w, w.next_rev, end, self.history_step_bytes)
        except EtcdError as err:
            if w.removed:
                return
            if err == errors.COMPACTED:
                stream._compacted(w)
                return
            raise
        if w.removed:
            return
        for resp, covered in parts:
            stream._push_events(w, resp, covered)
        w.next_rev = next_rev
        if w.next_rev > self._last_rev:
            stream._mark_synced(w)

    def _read_history(self, w: Watcher, start: int, end: int,
                      budget: int) -> tuple[list[tuple[rpc_pb2.WatchResponse, int]], int]:
        """(executor thread) Header-less responses for w's events of revisions
        start..end, at most about `budget` bytes, never splitting a revision,
        each with the revision it completes; and the revision to continue from."""
        max_bytes = w.stream.max_response_bytes
        parts: list[tuple[rpc_pb2.WatchResponse, int]] = []
        batch: list[kv_pb2.Event] = []
        batch_bytes = 0
        batch_rev = 0
        total = 0
        last = start - 1
        finished = True
        for revision, events in self.store.events_since(start, w.key, w.range_end, end_revision=end):
            selected = w.select(events)
            last = revision
            if not selected:
                continue
            size = sum(_event_field_size(ev) for ev in selected)
            if batch and batch_bytes + size > max_bytes:
                parts.append((w.response(batch), batch_rev))
                batch, batch_bytes = [], 0
            batch.extend(selected)
            batch_bytes += size
            batch_rev = revision
            total += size
            if total >= budget:
                finished = revision >= end
                break
        if finished:
            last = end
        if batch:
            parts.append((w.response(batch), last if finished else batch_rev))
        return parts, last + 1

    # -- loop: progress notifications ---------------------------------------------------------
    async def _progress_loop(self) -> None:
        """Every progress interval, tell each synced progress_notify watcher
        that had no events the current revision (an empty response)."""
        while True:
            await asyncio.sleep(self.progress_interval)
            try:
                self.notify_progress()
            except Exception:
                log.exception("watch progress notification failed")

    def notify_progress(self) -> None:
        for w in list(self._progress_watchers):
            stream = w.stream
            if w.synced and not w.had_events and not stream.full:
                stream._push_control(rpc_pb2.WatchResponse(watch_id=w.id), self._last_rev)
            w.had_events = False

    # -- loop: the watcher index ------------------------------------------------------------------
    def _add(self, w: Watcher) -> None:
        if w.single:
            self._by_key.setdefault(w.key, set()).add(w)
        else:
            self._ranged.setdefault((w.key, w.range_end), {})[w] = None
        if w.progress_notify:
            self._progress_watchers[w] = None

    def _discard(self, w: Watcher) -> None:
        if w.single:
            bucket = self._by_key.get(w.key)
            if bucket is not None:
                bucket.discard(w)
                if not bucket:
                    del self._by_key[w.key]
        else:
            group = self._ranged.get((w.key, w.range_end))
            if group is not None:
                group.pop(w, None)
                if not group:
                    del self._ranged[(w.key, w.range_end)]
        self._watch_ends_if_idle()
        self._progress_watchers.pop(w, None)


def _fragments(resp: rpc_pb2.WatchResponse, max_bytes: int) -> list[rpc_pb2.WatchResponse]:
    """etcd's sendFragments: split the events over responses below max_bytes
    (at least one event each), fragment=true on all but the last."""
    base = rpc_pb2.WatchResponse()
    base.CopyFrom(resp)
    del base.events[:]
    base.fragment = True
    base_size = base.ByteSize()
    out: list[rpc_pb2.WatchResponse] = []
    cur = rpc_pb2.WatchResponse()
    cur.CopyFrom(base)
    size = base_size
    for ev in resp.events:
        add = _event_field_size(ev)
        if len(cur.events) >= 1 and size + add >= max_bytes:
            out.append(cur)
            cur = rpc_pb2.WatchResponse()
            cur.CopyFrom(base)
            size = base_size
        cur.events.append(ev)
        size += add
    cur.fragment = False
    out.append(cur)
    return out
