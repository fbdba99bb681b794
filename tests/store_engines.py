"""The engines the store conformance suite runs against.

Adding an engine is one entry in FACTORIES plus its name in ENGINES. Named
store_engines (not engines) so it never shadows the repository's `engines/`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from metastore.engines import open_store as open_engine_store
from metastore.engines.memory import open_store as open_memory_store
from metastore.mvcc import MVCCStore

ENGINES: list[str] = ["memory", "rocksdb"]


@dataclass(frozen=True)
class Engine:
    # A fresh, empty store whose data (if any) lives under the given directory.
    open: Callable[[Path], MVCCStore]
    # Close `store` and open it again on the same data: a restart.
    reopen: Callable[[MVCCStore, Path], MVCCStore]


def _memory_reopen(store: MVCCStore, _path: Path) -> MVCCStore:
    store.close()
    return MVCCStore(store.backend, node_id=store.node_id)


def _rocksdb_open(path: Path) -> MVCCStore:
    # Through the engine factory, as a member opens it (path/rocksdb).
    return open_engine_store("rocksdb", str(path))  # type: ignore[return-value]


def _rocksdb_reopen(store: MVCCStore, path: Path) -> MVCCStore:
    """A real restart: the database is closed and opened again from disk."""
    store.close()
    return open_engine_store("rocksdb", str(path), node_id=store.node_id)  # type: ignore[return-value]


FACTORIES: dict[str, Engine] = {
    "memory": Engine(open=lambda _path: open_memory_store(), reopen=_memory_reopen),
    "rocksdb": Engine(open=_rocksdb_open, reopen=_rocksdb_reopen),
}
