"""mvccpb.Event values: from a request just applied, or replayed from history.

Both paths produce identical events for the same write (prev_kv always
filled when there was a previous live version), so a watcher that resumes
from history and then switches to live events cannot tell the difference.
"""
from __future__ import annotations

from typing import Sequence

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


def change_events(rev: int, changes: Sequence[Change]) -> list[kv_pb2.Event]:
    return [_event(rev, ch.key, ch.record, ch.prev) for ch in changes]


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
    backend: Backend, start: int, end: int, keys: KeyRange, max_rows: int
) -> tuple[list[RevisionEvents], int]:
    """Events of revisions start..end (inclusive) touching `keys`, grouped per
    revision, reading about `max_rows` changes at most but never splitting a
    revision. Returns them and the revision to continue from."""
    out: list[RevisionEvents] = []
    current = -1
    events: list[kv_pb2.Event] = []
    rows = 0
    for rk, key in backend.scan("rev", pack_rev(start), pack_rev(end + 1)):
        main, sub = unpack_rev(rk)
        if main != current:
            if events:
                out.append((current, events))
                events = []
            if rows >= max_rows:
                return out, main
            current = main
        rows += 1
        if keys.contains(key):
            ev = _replayed(backend, key, main, sub)
            if ev is not None:
                events.append(ev)
    if events:
        out.append((current, events))
    return out, end + 1
