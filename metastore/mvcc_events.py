"""mvccpb.Event values: from a request just applied, or replayed from history.

Both paths produce identical events for the same write (prev_kv always
filled when there was a previous live version), so a watcher that resumes
from history and then switches to live events cannot tell the difference.
"""
from __future__ import annotations

from typing import Iterator, Sequence, overload

from metastore.api.pb import kv_pb2
from metastore.backend import Backend
from metastore.mvcc_layout import TOMBSTONE, hist_key, pack_rev, record_header, unpack_rev
from metastore.mvcc_range import KeyRange, fill_kv
from metastore.mvcc_read import previous_record
from metastore.mvcc_write import Change

PUT = kv_pb2.Event.PUT
DELETE = kv_pb2.Event.DELETE

RevisionEvents = tuple[int, list[kv_pb2.Event]]


def _event(rev: int, key: bytes, rec: bytes | None, prev: bytes | None) -> kv_pb2.Event:
    ev = kv_pb2.Event()
    if rec is None:
        ev.type = DELETE
        ev.kv.key = key
        ev.kv.mod_revision = rev
    else:
        ev.type = PUT
        fill_kv(ev.kv, key, rec)
    if prev is not None:
        fill_kv(ev.prev_kv, key, prev)
    return ev


class LazyEvents(Sequence[kv_pb2.Event]):
    """The events of one applied revision, each built the first time it is read.

    Store listeners run on the Raft apply thread for every revision, but most
    events are never read: no watcher matches them (a DeleteRange of 60,000
    keys nobody watches). Building a protobuf Event, prev_kv included, costs
    more than applying the change, so the listeners get the keys at once
    (`keys`: what a watch matches on) and each event only on demand --
    usually on the event loop, off the apply thread. The changes hold only
    immutable bytes, so building later gives the same event.
    """

    __slots__ = ("revision", "keys", "_changes", "_built")

    def __init__(self, revision: int, changes: Sequence[Change]) -> None:
        self.revision = revision
        self.keys: list[bytes] = [ch.key for ch in changes]
        self._changes = changes
        self._built: list[kv_pb2.Event | None] = [None] * len(changes)

    def __len__(self) -> int:
        return len(self._changes)

    @overload
    def __getitem__(self, i: int) -> kv_pb2.Event: ...

    @overload
    def __getitem__(self, i: slice) -> list[kv_pb2.Event]: ...

    def __getitem__(self, i: int | slice) -> kv_pb2.Event | list[kv_pb2.Event]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        ev = self._built[i]
        if ev is None:
            ch = self._changes[i]
            ev = self._built[i] = _event(self.revision, ch.key, ch.record, ch.prev)
        return ev

    def __iter__(self) -> Iterator[kv_pb2.Event]:
        for i in range(len(self._changes)):
            yield self[i]


def event_keys(events: Sequence[kv_pb2.Event]) -> list[bytes]:
    """The key of each event, without building a LazyEvents' events."""
    if isinstance(events, LazyEvents):
        return events.keys
    return [ev.kv.key for ev in events]


def _replayed(backend: Backend, key: bytes, main: int, sub: int) -> kv_pb2.Event | None:
    rec = backend.get("hist", hist_key(key, main, sub))
    if rec is None:
        # Not superseded yet: it is the key's current record.
        rec = backend.get("kv", key)
        if rec is None or record_header(rec)[1:3] != (main, sub):
            return None  # history already compacted away under us
    prev = previous_record(backend, key, main, sub)
    return _event(main, key, None if rec == TOMBSTONE else rec, prev)


def read_events(
    backend: Backend, start: int, end: int, keys: KeyRange, max_rows: int, compacted_at: int = 0
) -> tuple[list[RevisionEvents], int]:
    """Events of revisions start..end (inclusive) touching `keys`, grouped per
    revision, reading about `max_rows` changes at most but never splitting a
    revision. Returns them and the revision to continue from.

    The events of `compacted_at` (the compaction revision) are given as a
    finished compaction leaves them, however far the background compaction
    has got: per key only the last change, only if it is a put, and without
    prev_kv -- so every member replays the same events."""
    out: list[RevisionEvents] = []
    current = -1
    events: list[kv_pb2.Event] = []
    rows = 0

    def close_revision() -> None:
        if current == compacted_at:
            events[:] = _as_compacted(events)
        if events:
            out.append((current, list(events)))
        events.clear()

    for rk, key in backend.scan("rev", pack_rev(start), pack_rev(end + 1)):
        main, sub = unpack_rev(rk)
        if main != current:
            close_revision()
            if rows >= max_rows:
                return out, main
            current = main
        rows += 1
        if keys.contains(key):
            ev = _replayed(backend, key, main, sub)
            if ev is not None:
                events.append(ev)
    close_revision()
    return out, end + 1


def _as_compacted(events: list[kv_pb2.Event]) -> list[kv_pb2.Event]:
    last: dict[bytes, kv_pb2.Event] = {}
    for ev in events:
        last.pop(ev.kv.key, None)  # re-inserted: keeps the order of last changes
        last[ev.kv.key] = ev
    kept = [ev for ev in last.values() if ev.type == PUT]
    for ev in kept:
        ev.ClearField("prev_kv")
    return kept
