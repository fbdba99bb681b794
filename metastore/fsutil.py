"""Making files and directories durable (POSIX needs each one fsynced)."""
from __future__ import annotations

import os
from typing import Callable

# fdatasync where the platform has it (not macOS): the data and what is
# needed to read it back (the size), without the timestamps fsync also writes.
datasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)


def fsync_path(path: str) -> None:
    """fsync a file or a directory by name (a directory: its entries, such
    as a rename into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """Every file and directory under `root`, before a rename publishes it
    (a power cut must not leave it with empty files or missing entries)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)
