"""The row stream both snapshot formats use: every backend row, in order.

A row is u8 table | u32 key length | u32 value length | key | value, and the
stream ends with the byte 0xFF. Raft snapshots (metastore.snapshot) and the
client snapshots of `etcdctl snapshot save` (metastore.dbsnapshot) carry it.
"""
from __future__ import annotations

import os
import struct
from itertools import islice
from typing import BinaryIO, Callable, Iterable, Iterator

from metastore.backend import TABLES

ROW = struct.Struct("<BII")
END = 0xFF

Row = tuple[str, bytes, bytes]


class RowFormatError(RuntimeError):
    """The row stream is truncated or malformed."""


# Rows between two pauses of a background writer (write_rows' `pause`).
PAUSE_EVERY = 256


def write_rows(write: Callable[[bytes], object], rows: Iterable[Row],
               pause: Callable[[], object] | None = None) -> None:
    """Write the row stream, PAUSE_EVERY rows per write() call (one join per
    chunk costs far less than three writes per row, and `write` may be a
    Python-level hashing writer). A writer running beside Raft's tick and
    applier threads passes `pause` (e.g. a tiny sleep), called after each
    chunk: this loop would otherwise keep the GIL for whole switch
    intervals (5 ms) each time one of them waits to get it back from a
    socket call -- every such wait lengthens a Raft round trip."""
    table_ids = {name: i for i, name in enumerate(TABLES)}
    pack = ROW.pack
    it = iter(rows)
    while chunk := list(islice(it, PAUSE_EVERY)):
        write(b"".join([part for table, key, value in chunk
                        for part in (pack(table_ids[table], len(key), len(value)), key, value)]))
        if pause is not None:
            pause()
    write(bytes([END]))


def check_rows(f: BinaryIO, end: int) -> None:
    """Walk the rows from f's position by their lengths (no data read) to the
    end mark, which must come before offset `end`: a damaged file is refused
    before anything is replaced."""
    while True:
        tag = f.read(1)
        if not tag:
            raise RowFormatError("the rows end without the end mark (truncated)")
        if tag[0] == END:
            return
        head = tag + f.read(ROW.size - 1)
        if len(head) != ROW.size:
            raise RowFormatError("truncated row")
        table, klen, vlen = ROW.unpack(head)
        if table >= len(TABLES) or f.seek(klen + vlen, os.SEEK_CUR) >= end:
            raise RowFormatError(f"malformed or truncated row (table {table}, {klen}+{vlen} bytes)")


def read_rows(f: BinaryIO) -> Iterator[Row]:
    """The rows from f's position (check_rows first for untrusted input)."""
    read = f.read
    while True:
        tag = read(1)
        if not tag:
            raise RowFormatError("the rows end without the end mark (truncated)")
        if tag[0] == END:
            return
        table, klen, vlen = ROW.unpack(tag + read(ROW.size - 1))
        yield TABLES[table], read(klen), read(vlen)
