"""The RocksDB engine: MVCCStore over RocksDB column families. Persistent."""
from __future__ import annotations

from metastore.engines.rocksdb.backend import BackendClosedError, RocksDBBackend
from metastore.engines.rocksdb.marker import ForeignDirectoryError
from metastore.mvcc import MVCCStore

__all__ = ["BackendClosedError", "ForeignDirectoryError", "RocksDBBackend", "open_store"]


def open_store(path: str, node_id: int = 0, sync: bool = False, wal: bool = True) -> MVCCStore:
    """Open (creating if new) the RocksDB store kept in directory `path`
    (`sync`, `wal`: see RocksDBBackend)."""
    backend = RocksDBBackend(path, sync=sync, wal=wal)
    try:
        return MVCCStore(backend, node_id=node_id)
    except BaseException:
        backend.close()  # release the LOCK so the caller can retry or repair
        raise
