"""Storage engines. Each one is a `metastore.backend.Backend`; the etcd
semantics on top of it are shared (`metastore.mvcc.MVCCStore`)."""
from __future__ import annotations

import os

from metastore.store import Store

# The RocksDB engine keeps its database in this subdirectory of the data dir,
# so it never shares a directory with the Raft journal or snapshots.
ROCKSDB_SUBDIR = "rocksdb"


def open_store(engine: str, data_dir: str, node_id: int = 0, *, journaled: bool = False) -> Store:
    """Open the Store of `engine` keeping its files under data_dir.

    `journaled`: a Raft journal holds every request the store applies and
    replays those past its applied position after a restart, so a persistent
    engine need not log them again (RocksDB runs without its WAL)."""
    if engine == "memory":
        from metastore.engines.memory import open_store as open_memory

        return open_memory(node_id=node_id)
    if engine == "rocksdb":
        from metastore.engines.rocksdb import open_store as open_rocksdb

        return open_rocksdb(os.path.join(data_dir, ROCKSDB_SUBDIR), node_id=node_id, wal=not journaled)
    raise ValueError(f"unknown engine {engine!r}")
