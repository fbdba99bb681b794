"""Storage engines. Each one is a `metastore.backend.Backend`; the etcd
semantics on top of it are shared (`metastore.mvcc.MVCCStore`)."""
from __future__ import annotations

from metastore.store import Store


def open_store(engine: str, data_dir: str, node_id: int = 0) -> Store:
    """Open the Store of `engine` keeping its files under data_dir."""
    if engine == "memory":
        from metastore.engines.memory import open_store as open_memory

        return open_memory(node_id=node_id)
    raise ValueError(f"unknown engine {engine!r}")
