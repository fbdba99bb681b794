"""The engine marker: proof that a directory holds this engine's RocksDB.

A data directory is only ever opened by the engine that created it. Opening a
directory blindly would let RocksDB's `create_if_missing` scribble a fresh
database into, say, a directory the memory engine or an operator left behind,
and a member would then come up empty instead of failing loudly. So the
backend writes a small marker file before it creates the database and refuses
any non-empty directory without it.
"""
from __future__ import annotations

import os

from metastore.fsutil import fsync_path

MARKER_NAME = "METASTORE_ENGINE"
MARKER_CONTENT = b"metastore-rocksdb 1\n"
# RocksDB's own pointer to the live MANIFEST: present in every created database.
ROCKSDB_CURRENT = "CURRENT"


class ForeignDirectoryError(RuntimeError):
    """The directory exists but was not created by the RocksDB engine."""


def write_marker(path: str) -> None:
    """Write the marker durably (temp file, fsync, rename, fsync the directory)
    so a crash never leaves a half-written marker that would lock us out."""
    final = os.path.join(path, MARKER_NAME)
    tmp = final + ".tmp"
    with open(tmp, "wb") as f:
        f.write(MARKER_CONTENT)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_path(path)


def has_marker(path: str) -> bool:
    try:
        with open(os.path.join(path, MARKER_NAME), "rb") as f:
            return f.read(len(MARKER_CONTENT) + 1) == MARKER_CONTENT
    except FileNotFoundError:
        return False


def prepare_dir(path: str) -> bool:
    """Check (or set up) `path` for the engine; True when the database must be
    created, False when an existing one is to be opened.

    Fresh means: the directory is missing or empty, or it holds only our
    marker (a crash between writing the marker and creating the database).
    Anything else without the marker raises ForeignDirectoryError.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise ForeignDirectoryError(f"{path} is not a directory; refusing to use it as a RocksDB store")
    os.makedirs(path, exist_ok=True)
    entries = set(os.listdir(path)) - {MARKER_NAME + ".tmp"}
    if not entries:
        write_marker(path)
        return True
    if not has_marker(path):
        raise ForeignDirectoryError(
            f"{path} is not empty and was not created by metastore's RocksDB engine "
            f"(no valid {MARKER_NAME} file); refusing to open it. If it belongs to "
            "another engine, start with that engine or point --data-dir elsewhere."
        )
    if ROCKSDB_CURRENT in entries:
        return False
    if entries == {MARKER_NAME}:
        return True
    raise ForeignDirectoryError(
        f"{path} carries the RocksDB engine marker but no RocksDB database "
        f"({ROCKSDB_CURRENT} is missing): refusing to create a new, empty one over it"
    )
