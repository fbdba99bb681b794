"""Reading MVCC state out of a Backend: the current state and older revisions.

Everything here yields raw (user key, record) pairs in key order; turning them
into protobuf happens later, outside the store lock, only for what is returned.
Callers hold whatever lock keeps the backend from changing while they iterate.
"""
from __future__ import annotations

from typing import Iterator, Protocol

from metastore.backend import Backend
from metastore.mvcc_layout import (
    TOMBSTONE,
    escape,
    hist_group,
    hist_key_for,
    hist_main,
    hist_prefix,
    record_mod,
    unescape_group,
)

Item = tuple[bytes, bytes]  # (user key, record)


class View(Protocol):
    """The state at one revision, as a compare or a read inside a txn sees it."""

    def get(self, key: bytes) -> bytes | None: ...

    def scan(self, start: bytes, end: bytes | None) -> Iterator[Item]: ...


class CurrentView:
    """The committed current state: the `kv` table as it is."""

    __slots__ = ("_backend",)

    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    def get(self, key: bytes) -> bytes | None:
        return self._backend.get("kv", key)

    def scan(self, start: bytes, end: bytes | None) -> Iterator[Item]:
        return self._backend.scan("kv", start, end)


class HistoricalView:
    """The committed state as of an older revision `rev`.

    A key's version at `rev` is its current record when that is old enough,
    else the newest `hist` row at or below `rev` (a tombstone meaning absent).
    """

    __slots__ = ("_backend", "_rev")

    def __init__(self, backend: Backend, rev: int) -> None:
        self._backend = backend
        self._rev = rev

    def get(self, key: bytes) -> bytes | None:
        cur = self._backend.get("kv", key)
        if cur is not None and record_mod(cur) <= self._rev:
            return cur
        prefix = hist_prefix(key)
        for _hk, rec in self._backend.scan(
            "hist", prefix, hist_key_for(prefix, self._rev + 1, 0), reverse=True
        ):
            return rec if rec != TOMBSTONE else None
        return None

    def scan(self, start: bytes, end: bytes | None) -> Iterator[Item]:
        rev = self._rev
        current = self._backend.scan("kv", start, end)
        older = _newest_at(
            self._backend.scan("hist", escape(start), None if end is None else escape(end)), rev
        )
        cur_item = next(current, None)
        old_item = next(older, None)
        while cur_item is not None or old_item is not None:
            if old_item is None or (cur_item is not None and cur_item[0] < old_item[0]):
                # Only a current record: the key has no history at all.
                if record_mod(cur_item[1]) <= rev:  # type: ignore[index]
                    yield cur_item  # type: ignore[misc]
                cur_item = next(current, None)
            elif cur_item is None or old_item[0] < cur_item[0]:
                # Only history: the key is deleted now.
                if old_item[1]:
                    yield old_item
                old_item = next(older, None)
            else:
                if record_mod(cur_item[1]) <= rev:
                    yield cur_item
                elif old_item[1]:
                    yield old_item
                cur_item = next(current, None)
                old_item = next(older, None)


def _newest_at(rows: Iterator[Item], rev: int) -> Iterator[Item]:
    """Per user key in `rows` (hist rows in order): (key, newest record at or
    below rev), with TOMBSTONE when that is a delete or nothing is old enough."""
    group: bytes | None = None
    best = TOMBSTONE
    for hk, rec in rows:
        g = hist_group(hk)
        if g != group:
            if group is not None:
                yield unescape_group(group), best
            group, best = g, TOMBSTONE
        if hist_main(hk) <= rev:
            best = rec
    if group is not None:
        yield unescape_group(group), best


def previous_record(backend: Backend, key: bytes, main: int, sub: int) -> bytes | None:
    """The version of `key` just before (main, sub), if it was a live one."""
    prefix = hist_prefix(key)
    for _hk, rec in backend.scan("hist", prefix, hist_key_for(prefix, main, sub), reverse=True):
        return rec if rec != TOMBSTONE else None
    return None
