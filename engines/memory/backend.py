"""MemoryBackend: the Backend tables as sorted dicts in this process.

It stores the very bytes objects it is given (no copies): MVCCStore hands the
same key object to `kv` and `rev`, so a key costs its bytes once. Nothing
survives the process; `close` keeps the data so a store can be reopened on the
same backend object (that is what "restart" means for this engine).
"""
from __future__ import annotations

from typing import Iterator

from sortedcontainers import SortedDict

from metastore.backend import TABLES, WriteBatch


class MemoryBackend:
    def __init__(self) -> None:
        self._tables: dict[str, SortedDict] = {name: SortedDict() for name in TABLES}
        self._bytes = 0  # keys + values held, for size()

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
        ops = [(tables[name], key, value) for name, key, value in batch.ops]
        delta = 0
        for d, key, value in ops:
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

    def frozen_rows(self) -> "FrozenRows":
        """Every (table, key, value) as of now, in table then key order, for
        a snapshot written while writes go on. The copies are made here, at
        once -- each a few C-level calls (a dict copy and the concatenation
        of the sorted key lists), so the caller's lock is held briefly --
        and share the rows' bytes; the iteration over them can run anywhere."""
        return FrozenRows([(name, dict.copy(d), d.keys()[:]) for name, d in self._tables.items()])

    def size(self) -> tuple[int, int]:
        return self._bytes, self._bytes

    def close(self) -> None:
        """Nothing to release; the data stays for a reopen."""


class FrozenRows:
    """The rows of MemoryBackend.frozen_rows; can be iterated more than once."""

    def __init__(self, tables: list[tuple[str, dict[bytes, bytes], list[bytes]]]) -> None:
        self._tables = tables

    def __iter__(self) -> Iterator[tuple[str, bytes, bytes]]:
        for name, rows, keys in self._tables:
            for key in keys:
                yield name, key, rows[key]
