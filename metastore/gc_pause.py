"""Keep Python's cyclic garbage collector from running during bulk work.

A DeleteRange of a whole prefix builds five or six tuples per key (the rows,
the events) that all live until the request is written. Every 700 new
container objects the collector runs, and as the live set grows its older
generations are walked again and again: measured here, that was ~40 % of
building the batch for 110k keys. None of those objects form cycles, so
nothing is lost by collecting after the request instead of during it.
"""
from __future__ import annotations

import contextlib
import gc
import threading
from typing import Iterator

_lock = threading.Lock()
_holders = 0  # threads inside gc_paused() right now
_resume = False  # whether the collector was on when the first of them entered


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Automatic collection is off inside (process-wide: the collector has no
    per-thread switch) and back as it was once the last holder leaves; a
    collector someone else turned off stays off."""
    global _holders, _resume
    with _lock:
        if _holders == 0:
            _resume = gc.isenabled()
            gc.disable()
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0 and _resume:
                gc.enable()
