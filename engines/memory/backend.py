"""MemoryBackend: the Backend tables as sorted dicts in this process.

It stores the very bytes objects it is given (no copies): MVCCStore hands the
same key object to `kv` and `rev`, so a key costs its bytes once. Nothing
survives the process; `close` keeps the data so a store can be reopened on the
same backend object (that is what "restart" means for this engine).
"""
from __future__ import annotations

import threading
from bisect import bisect_left
from itertools import repeat
from typing import Iterator

from sortedcontainers import SortedDict

from metastore.backend import TABLES, RangeEnd, WriteBatch

# From this many ops a batch is applied table by table in bulk (_write_bulk).
_BULK_OPS = 1024


class MemoryBackend:
    # A RangeEnd op drops its keys as one slice of the sorted table.
    deletes_ranges = True

    def __init__(self) -> None:
        self._tables: dict[str, SortedDict] = {name: SortedDict() for name in TABLES}
        self._bytes = 0  # keys + values held, for size()
        # One per FrozenRows still open: the rows as they were when it was
        # taken, for every key changed since (see frozen_rows). Replaced, never
        # changed in place, under _pre_lock: copies are closed from any thread.
        self._pre_images: tuple[dict[str, dict[bytes, bytes | None]], ...] = ()
        self._pre_lock = threading.Lock()

    def get(self, table: str, key: bytes) -> bytes | None:
        return self._tables[table].get(key)

    def scan(
        self, table: str, start: bytes, end: bytes | None, reverse: bool = False
    ) -> Iterator[tuple[bytes, bytes]]:
        d = self._tables[table]
        for key in d.irange(start, end, inclusive=(True, False), reverse=reverse):
            yield key, d[key]

    def count(self, table: str, start: bytes, end: bytes | None) -> int:
        """Keys in [start, end) without visiting them (optional capability the
        store uses to count a range whose keys a limit leaves unread)."""
        d = self._tables[table]
        hi = len(d) if end is None else d.bisect_left(end)
        return max(0, hi - d.bisect_left(start))

    def write(self, batch: WriteBatch) -> None:
        # Resolve every table first so a bad table name fails before any op
        # is applied: the batch is all-or-nothing.
        tables = self._tables
        if len(batch) >= _BULK_OPS:
            self._write_bulk(batch)
            return
        named = batch.all_ops()
        ops = [(name, tables[name], key, value) for name, key, value in named]
        for pre in self._pre_images:
            # Before the rows change: a FrozenRows reader checks afterwards.
            for name, key, value in named:
                if value.__class__ is RangeEnd:
                    continue  # kept by _clear_range, when it runs
                kept = pre[name]
                if key not in kept:
                    kept[key] = tables[name].get(key)
        delta = 0
        for name, d, key, value in ops:
            if value.__class__ is RangeEnd:
                delta -= self._clear_range(name, key, value)
                continue
            old = d.get(key)
            if old is not None:
                delta -= len(key) + len(old)
            if value is None:
                if old is not None:
                    del d[key]
            else:
                d[key] = value
                delta += len(key) + len(value)
        self._bytes += delta

    def _write_bulk(self, batch: WriteBatch) -> None:
        """A big batch (a DeleteRange of many keys, a large txn): the rows
        put ahead, each table's whole, then each key's last op per table;
        the new rows of a table go in with one `SortedDict.update`, which
        sorts them once instead of inserting one at a time (half the cost
        at 100k rows, measured here)."""
        tables = self._tables
        for name in batch.ahead:
            tables[name]  # a bad table name fails before anything is applied
        for name, _key, _value in batch.ops:
            tables[name]
        delta = 0
        for name, rows in batch.ahead.items():
            if rows:
                delta += self._put_rows(name, dict(rows))
        final: dict[str, dict[bytes, bytes | None]] = {}
        # A range op deletes the table's keys in it (cleared first, in one
        # slice) and the keys earlier ops of the batch put in it (None in
        # `final`); later ops apply after the clearing, as in order.
        cleared: list[tuple[str, bytes, bytes]] = []
        for name, key, value in batch.ops:
            rows = final.get(name)
            if rows is None:
                rows = final[name] = {}
            if value.__class__ is RangeEnd:
                cleared.append((name, key, value))
                for pending in [k for k in rows if key <= k < value]:
                    rows[pending] = None
                continue
            rows[key] = value
        for name, start, end in cleared:
            delta -= self._clear_range(name, start, end)
        for pre in self._pre_images:
            for name, rows in final.items():
                kept, d = pre[name], tables[name]
                for key in rows:
                    if key not in kept:
                        kept[key] = d.get(key)
        for name, rows in final.items():
            d = tables[name]
            puts: dict[bytes, bytes] = {}
            for key, value in rows.items():
                old = d.get(key)
                if old is not None:
                    delta -= len(key) + len(old)
                if value is None:
                    if old is not None:
                        del d[key]
                else:
                    puts[key] = value
                    delta += len(key) + len(value)
            if puts:
                d.update(puts)
        self._bytes += delta

    def _put_rows(self, name: str, new: dict[bytes, bytes]) -> int:
        """Put every row of `new` into table `name` at once (old rows kept
        for open FrozenRows first); the bytes it adds."""
        d = self._tables[name]
        replaced = new.keys() & dict.keys(d)  # rows put ahead are new: usually none
        for pre in self._pre_images:
            # Only rows that exist can be in a frozen copy (FrozenRows.get
            # answers None for a key it did not hold).
            kept = pre[name]
            for key in replaced:
                if key not in kept:
                    kept[key] = d[key]
        added = sum(len(k) + len(v) for k, v in new.items())
        added -= sum(len(k) + len(d[k]) for k in replaced)
        d.update(new)
        return added

    def _clear_range(self, name: str, start: bytes, end: bytes) -> int:
        """Delete every key of table `name` in [start, end) as one slice
        (after keeping their rows for open FrozenRows); the bytes they held."""
        d = self._tables[name]
        lo, hi = d.bisect_left(start), d.bisect_left(end)
        if lo >= hi:
            return 0
        keys = d.keys()[lo:hi]
        for pre in self._pre_images:
            kept = pre[name]
            for key in keys:
                if key not in kept:
                    kept[key] = d[key]
        freed = sum(len(k) + len(d[k]) for k in keys)
        del d.keys()[lo:hi]
        return freed

    def frozen_rows(self) -> "FrozenRows":
        """Every (table, key, value) as of now, in table then key order, for
        a snapshot written while writes go on; close it when done.

        Copy-on-write, so that freezing a million keys takes milliseconds
        (the caller holds the store's locks, on Raft's thread): only the
        sorted key lists are copied now; from then on every write first keeps
        the old row of each key it changes, and the reader takes a row from
        there when it has one, else from the live table."""
        pre: dict[str, dict[bytes, bytes | None]] = {name: {} for name in self._tables}
        with self._pre_lock:
            self._pre_images = (*self._pre_images, pre)
        keys = [(name, d, d.keys()[:]) for name, d in self._tables.items()]
        return FrozenRows(self, keys, pre)

    def _unfreeze(self, pre: dict[str, dict[bytes, bytes | None]]) -> None:
        with self._pre_lock:
            # By identity: two copies' pre-images can be equal (both empty).
            self._pre_images = tuple(p for p in self._pre_images if p is not pre)

    def size(self) -> tuple[int, int]:
        return self._bytes, self._bytes

    def close(self) -> None:
        """Nothing to release; the data stays for a reopen."""


# Keys read from the live table at a time (C-level map and zip per chunk
# rather than Python per row: a snapshot of a big store reads millions).
_FROZEN_CHUNK = 1024


class FrozenRows:
    """The rows of MemoryBackend.frozen_rows; can be iterated more than once,
    from any thread, until closed."""

    def __init__(self, backend: MemoryBackend, tables: list[tuple[str, SortedDict, list[bytes]]],
                 pre: dict[str, dict[bytes, bytes | None]]) -> None:
        self._backend: MemoryBackend | None = backend
        self._tables = tables
        self._keys = {name: keys for name, _live, keys in tables}
        self._pre = pre

    def __iter__(self) -> Iterator[tuple[str, bytes, bytes]]:
        if self._backend is None:
            raise RuntimeError("frozen rows read after close()")
        for name, live, keys in self._tables:
            kept = self._pre[name]
            get = live.get
            for start in range(0, len(keys), _FROZEN_CHUNK):
                chunk = keys[start:start + _FROZEN_CHUNK]
                # Live first, then the kept rows: a writer keeps the old row
                # before changing the live one, so a change that lands
                # between the two reads is always seen as kept (and before
                # any write, `kept` is empty).
                values = list(map(get, chunk))
                if kept:
                    values = [kept[k] if k in kept else v for k, v in zip(chunk, values)]
                assert None not in values  # every key existed when frozen
                yield from zip(repeat(name), chunk, values)

    def get(self, table: str, key: bytes) -> bytes | None:
        """A row as it was when frozen (None: there was none)."""
        if self._backend is None:
            raise RuntimeError("frozen rows read after close()")
        keys = self._keys[table]
        i = bisect_left(keys, key)
        if i == len(keys) or keys[i] != key:
            return None  # a row written since (writers keep no old row for it)
        # Live first, then the kept rows, as in __iter__: a writer keeps the
        # old row before it changes the live one.
        live = self._backend.get(table, key)
        kept = self._pre[table]
        return kept[key] if key in kept else live

    def scan(self, table: str, start: bytes, end: bytes | None) -> Iterator[tuple[bytes, bytes]]:
        """The rows of one table with start <= key < end, as when frozen."""
        for name, _live, keys in self._tables:
            if name == table:
                lo = bisect_left(keys, start)
                hi = len(keys) if end is None else bisect_left(keys, end)
                for key in keys[lo:hi]:
                    value = self.get(table, key)
                    assert value is not None  # every key existed when frozen
                    yield key, value
                return
        raise KeyError(table)

    def close(self) -> None:
        """Stop keeping old rows for this copy (writes go back to full speed)."""
        backend, self._backend = self._backend, None
        if backend is not None:
            backend._unfreeze(self._pre)

    def __del__(self) -> None:  # a reader that forgot close() must not slow writes forever
        self.close()
