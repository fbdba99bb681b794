"""Raft snapshots of a member's state machine (the Store plus the member table).

pysyncobj compacts its log by asking for a snapshot file and, on a follower
too far behind, ships that file and loads it there. The file holds every
backend table row (engine-independent, so both engines share one format) and
the raft data pysyncobj needs back. Writing it runs on the tick thread, so it
streams rows straight to disk without building the state in memory.

Format: MAGIC | u32 header length | pickled header | rows | END, where a row
is u8 table | u32 key length | u32 value length | key | value.
"""
from __future__ import annotations

import os
import pickle
import struct
from typing import Any, BinaryIO, Iterator

from metastore.backend import TABLES
from metastore.cluster import Membership
from metastore.mvcc import MVCCStore

MAGIC = b"METASTORE-SNAPSHOT-1\n"
_ROW = struct.Struct("<BII")
_END = 0xFF
_LEN = struct.Struct("<I")


def save(path: str, store: MVCCStore, membership: Membership, raft_data: Any) -> None:
    """Write the snapshot to `path` and fsync it before returning: pysyncobj
    drops the log entries it covers as soon as this returns."""
    header = pickle.dumps({"raft_data": raft_data, "members": membership.export(),
                           "revision": store.revision, "applied": store.applied_position})
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(_LEN.pack(len(header)))
        f.write(header)
        table_ids = {name: i for i, name in enumerate(TABLES)}
        write = f.write
        for table, key, value in store.export_items():
            write(_ROW.pack(table_ids[table], len(key), len(value)))
            write(key)
            write(value)
        f.write(bytes([_END]))
        f.flush()
        os.fsync(f.fileno())


def load(path: str, store: MVCCStore, membership: Membership) -> Any:
    """Load a snapshot into the store (unless the store, being persistent,
    already holds everything it covers); returns pysyncobj's raft data."""
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise RuntimeError(f"{path} is not a metastore snapshot")
        (length,) = _LEN.unpack(f.read(_LEN.size))
        header = pickle.loads(f.read(length))
        raft_data = header["raft_data"]
        snapshot_index = raft_data[0][1]
        membership.restore(header["members"])
        if store.applied_position[0] >= snapshot_index:
            return raft_data  # a persistent engine that is already past it
        store.import_items(_rows(f, path))
    return raft_data


def _rows(f: BinaryIO, path: str) -> Iterator[tuple[str, bytes, bytes]]:
    read = f.read
    while True:
        tag = read(1)
        if not tag:
            raise RuntimeError(f"snapshot {path} is truncated")
        if tag[0] == _END:
            return
        table, klen, vlen = _ROW.unpack(tag + read(_ROW.size - 1))
        yield TABLES[table], read(klen), read(vlen)
