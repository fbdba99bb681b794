"""Handing freed memory back to the operating system after a big free.

When a member drops the Raft log a snapshot covers, it frees every entry
since the last snapshot at once: after a bulk load, hundreds of MiB. Entries
bigger than Python's small-object limit come from glibc's malloc, whose heap
only shrinks from its top: the pages of entries freed below blocks still in
use (whatever else was allocated among them) stay resident. Measured with
bench/scale.py (memory engine, 1M keys): a member kept ~900 MiB after its
snapshot, or ~610 MiB once `malloc_trim(0)` had given the free pages back.

The memory is reused by later allocations either way, so this only lowers
the resident size between bulk writes, which is what operators watch. The
trim walks the heap (~10 ms; ~90 ms when it returned ~600 MiB here) and
holds each arena's lock meanwhile: a thread that needs memory from that
arena waits, and if it holds the interpreter lock, every Python thread
waits with it. So it runs only after big frees, one at a time, on a thread
of its own (which spares at least the caller: the Raft tick thread). Where
there is no glibc (musl, macOS, Windows) it does nothing.
"""
from __future__ import annotations

import ctypes
import logging
import threading
from typing import Callable

log = logging.getLogger("metastore.heap")

_lock = threading.Lock()
_running = False


def _load_trim() -> Callable[[int], int] | None:
    try:
        # The process's own symbols, the C library's among them (no
        # ctypes.util.find_library: it runs ldconfig in a subprocess).
        trim = ctypes.CDLL(None).malloc_trim  # glibc only
    except (OSError, AttributeError, TypeError):  # TypeError: Windows has no CDLL(None)
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_malloc_trim = _load_trim()


def release_free_memory_soon() -> bool:
    """Give the pages malloc holds free back to the system, on a thread of
    its own (the caller does not wait). False if there is no way to (no
    glibc) or a release is already running."""
    global _running
    if _malloc_trim is None:
        return False
    with _lock:
        if _running:
            return False
        _running = True
    try:
        threading.Thread(target=_release, name="heap-release", daemon=True).start()
    except RuntimeError:  # no thread to be had: the memory is reused anyway
        with _lock:
            _running = False
        return False
    return True


def _release() -> None:
    global _running
    try:
        _malloc_trim(0)  # ctypes lets go of the interpreter lock meanwhile
    except Exception:  # pragma: no cover - an odd libc; the memory is reused anyway
        log.debug("malloc_trim failed", exc_info=True)
    finally:
        with _lock:
            _running = False
