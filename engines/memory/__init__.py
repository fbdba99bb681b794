"""The in-memory engine: MVCCStore over sorted dicts. Fast, not durable."""
from __future__ import annotations

from metastore.engines.memory.backend import MemoryBackend
from metastore.mvcc import MVCCStore

__all__ = ["MemoryBackend", "open_store"]


def open_store(node_id: int = 0) -> MVCCStore:
    return MVCCStore(MemoryBackend(), node_id=node_id)
