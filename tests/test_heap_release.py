"""Memory a dropped Raft log held goes back to the system (metastore.heap),
and its old file is let go of off the tick thread.

The real glibc heap, in a child process of its own so that its layout is
the test's: big blocks freed among small ones still in use stay resident
until the release, which must bring the resident size down."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from metastore import heap
from metastore.raft import journal as journal_module
from metastore.raft.journal import DurableJournal

CHILD = textwrap.dedent("""
    import os, sys, time
    from metastore import heap

    def rss_mib():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) // 1024

    # Log entries (35 KiB, from malloc) with the store's buffers (8 KiB,
    # kept) allocated among them, as during a bulk load.
    entries, kept = [], []
    for _ in range(4000):
        entries.append(os.urandom(35000))
        kept.append(bytearray(8000))
    del entries
    freed = rss_mib()
    assert heap.release_free_memory_soon()
    deadline = time.monotonic() + 20
    while rss_mib() > freed - 70 and time.monotonic() < deadline:
        time.sleep(0.05)
    print(freed, rss_mib())
""")


@pytest.mark.skipif(heap._malloc_trim is None, reason="needs glibc's malloc_trim")
@pytest.mark.skipif("LD_PRELOAD" in os.environ, reason="another allocator may stand in for glibc's")
def test_freed_blocks_among_live_ones_leave_the_resident_size():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    before, after = map(int, out.stdout.split())
    # ~134 MiB was freed among live blocks: without the release it stays.
    assert before - after >= 70, (before, after)


def test_only_a_big_drop_of_log_entries_releases_memory(tmp_path, monkeypatch):
    releases: list[bool] = []
    monkeypatch.setattr(heap, "release_free_memory_soon", lambda: releases.append(True) or True)
    monkeypatch.setattr(journal_module, "RELEASE_MEMORY_FROM", 10_000)
    journal = DurableJournal(str(tmp_path / "raft.log"))
    for index in range(1, 41):
        journal.add(b"x" * 1000, index, 1)
    journal.sync()
    journal.deleteEntriesTo(5)  # ~5 KB of records
    assert releases == []
    journal.deleteEntriesTo(20)  # ~20 KB more
    assert releases == [True]
    assert [entry[1] for entry in journal] == list(range(26, 41))
    journal.deleteEntriesTo(100)  # past the end: all of it, ~15 KB
    assert releases == [True, True]
    assert list(journal) == []
    journal.deleteEntriesTo(0)  # nothing left: nothing to release, the file still rewritten
    assert releases == [True, True]
    journal._destroy()
    assert list(DurableJournal(str(tmp_path / "raft.log"))) == []


def test_the_replaced_log_is_closed_off_the_tick_thread(tmp_path, monkeypatch):
    """Closing the replaced log frees it on disk (its last reference): that
    runs on a thread of its own, not in the tick that compacts the log."""
    journal = DurableJournal(str(tmp_path / "raft.log"))
    for index in range(1, 11):
        journal.add(b"x" * 1000, index, 1)
    journal.sync()
    old_fd = journal._fd
    closed: dict[int, str] = {}
    real_close = os.close

    def close(fd: int) -> None:
        closed[fd] = threading.current_thread().name
        real_close(fd)

    monkeypatch.setattr(os, "close", close)
    journal.deleteEntriesTo(5)
    deadline = time.monotonic() + 5
    while old_fd not in closed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert closed.get(old_fd) == "raft-log-release"
    assert [entry[1] for entry in journal] == list(range(6, 11))
    journal._destroy()
