"""The Backend interface: the only thing the two engines implement.

A backend keeps bytes in a few named, ordered tables and applies a batch of
writes atomically. Everything etcd-specific (revisions, history, compaction,
range options, transactions) lives above it in `metastore.mvcc`, once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Protocol

# The tables every backend provides. Their layouts are defined by
# metastore.mvcc_layout and metastore.mvcc_lease. New tables go at the end:
# snapshots name tables by position.
TABLES: tuple[str, ...] = ("kv", "hist", "rev", "meta", "lease")
# The tables a WriteBatch may put rows ahead in, in the order they are written.
AHEAD_TABLES: tuple[str, ...] = ("rev", "hist")


class RangeEnd(bytes):
    """The value of an op that deletes every key in [op key, this end): how
    a DeleteRange of many keys clears `kv` in one op. Only batches for a
    backend whose `deletes_ranges` is true hold one (WriteBatch.delete_range)."""

    __slots__ = ()


@dataclass
class WriteBatch:
    """Writes to apply atomically: all of them or none survive a crash.

    `ops` keeps (table, key, value) in order; value None deletes the key,
    a RangeEnd every key from `key` up to it.

    `ahead` holds puts that may reach disk before the rest, in writes of
    their own (put_ahead): rows no read reaches until the rest has landed,
    and that applying the same request again writes again, identically
    (metastore.mvcc_write says why its rows qualify and how the store drops
    them when the rest never lands). An engine whose one write of a huge
    batch would stall the process (RocksDB holds the interpreter lock for
    the whole write) can so split what is big. They are kept per table, in
    AHEAD_TABLES order (an engine writes them in that order: every `rev` row
    before any `hist` row), as (key, value) pairs: a DeleteRange of 200k keys
    puts 600k rows ahead, and an engine can take a table's rows whole.
    """

    ops: list[tuple[str, bytes, bytes | None]] = field(default_factory=list)
    ahead: dict[str, list[tuple[bytes, bytes]]] = field(
        default_factory=lambda: {table: [] for table in AHEAD_TABLES})

    def put(self, table: str, key: bytes, value: bytes) -> None:
        self.ops.append((table, key, value))

    def delete(self, table: str, key: bytes) -> None:
        self.ops.append((table, key, None))

    def delete_range(self, table: str, start: bytes, end: bytes) -> None:
        """Delete every key in [start, end); only for a backend that
        `deletes_ranges`."""
        self.ops.append((table, start, RangeEnd(end)))

    def put_ahead(self, table: str, key: bytes, value: bytes) -> None:
        self.ahead[table].append((key, value))  # only AHEAD_TABLES qualify

    def ahead_count(self) -> int:
        return sum(len(rows) for rows in self.ahead.values())

    def all_ops(self) -> list[tuple[str, bytes, bytes | None]]:
        """Every op in the order an engine applying them at once should
        use: the ahead puts, then the rest."""
        every: list[tuple[str, bytes, bytes | None]] = [
            (table, key, value) for table, rows in self.ahead.items() for key, value in rows]
        if not every:
            return self.ops
        every += self.ops
        return every

    def __len__(self) -> int:
        return len(self.ops) + self.ahead_count()


def scan_ranges(backend: "Backend", table: str,
                ranges: Iterable[tuple[bytes, bytes]]) -> Iterator[list[tuple[bytes, bytes]]]:
    """The items of each [start, end) of `ranges`, one list per range, in
    order; the ranges ascend and do not overlap. Compaction looks up the
    history of a thousand keys at a time this way. A backend may do it its
    own way (optional capability `scan_ranges`, same contract) when a scan
    per range costs it more than it must (RocksDB: see its backend)."""
    own = getattr(backend, "scan_ranges", None)
    if own is not None:
        return own(table, ranges)
    return (list(backend.scan(table, start, end)) for start, end in ranges)


class Backend(Protocol):
    # Optional capability (getattr, default False): write() applies the
    # RangeEnd ops of WriteBatch.delete_range.
    deletes_ranges: bool

    def get(self, table: str, key: bytes) -> bytes | None: ...

    def scan(
        self, table: str, start: bytes, end: bytes | None, reverse: bool = False
    ) -> Iterator[tuple[bytes, bytes]]:
        """Items of `table` with start <= key < end (end None: no upper bound),
        in key order (descending when reverse). The caller must not write to
        the backend while it iterates."""
        ...

    def write(self, batch: WriteBatch) -> None:
        """Apply every op of the batch atomically, in order (the batch's
        `ahead` puts first, possibly in writes of their own)."""
        ...

    def size(self) -> tuple[int, int]:
        """(bytes occupied, bytes in use) -- an estimate is fine for memory."""
        ...

    def close(self) -> None: ...
