"""Raft snapshot files (metastore.snapshot) between every pair of engines.

Members of one cluster may run different engines, so a snapshot written by
either must load into either, with the same content, revision and history.
"""
from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

import pytest

from metastore import snapshot
from metastore.api.pb import rpc_pb2
from metastore.cluster import Membership
from metastore.engines.memory import open_store as open_memory_store
from metastore.rows import PAUSE_EVERY
from store_engines import ENGINES, FACTORIES

RAFT_DATA = (("entry", 42), ("prev", 41), ["127.0.0.1:1"])


def _fill(store, n: int = 300) -> None:
    for i in range(n):
        store.set_apply_position(i + 1, 0)
        store.put(rpc_pb2.PutRequest(key=b"k%04d" % (i % 200), value=b"v%d" % i))
    store.set_apply_position(n + 1, 0)
    store.delete_range(rpc_pb2.DeleteRangeRequest(key=b"k0000", range_end=b"k0010"))


def _content(store) -> list[tuple[str, bytes, bytes]]:
    return list(store.export_items())


def _membership() -> Membership:
    return Membership("tok", {"a": ["http://127.0.0.1:1"], "b": ["http://127.0.0.1:2"]})


@pytest.mark.parametrize("src_engine,dst_engine", list(itertools.product(ENGINES, ENGINES)))
def test_snapshot_loads_into_any_engine(tmp_path: Path, src_engine: str, dst_engine: str) -> None:
    src = FACTORIES[src_engine].open(tmp_path / "src")
    dst = FACTORIES[dst_engine].open(tmp_path / "dst")
    try:
        src.lease_grant(rpc_pb2.LeaseGrantRequest(ID=9, TTL=30))
        _fill(src)
        src.set_apply_position(10_000, 0)
        src.put(rpc_pb2.PutRequest(key=b"leased", value=b"x", lease=9))
        dst.set_apply_position(1, 0)
        dst.put(rpc_pb2.PutRequest(key=b"stale", value=b"gone after load"))
        path = str(tmp_path / "raft.snapshot")
        published = _membership()
        a = next(m for m in published.members() if m.name == "a")
        published.publish(a.id, "a", ["http://127.0.0.1:2379"])
        snapshot.save(path, src, published, RAFT_DATA)
        assert not (tmp_path / "raft.snapshot.checkpoint").exists(), "staging checkpoint left behind"
        members = _membership()
        assert snapshot.load(path, dst, members) == RAFT_DATA
        assert not (tmp_path / "raft.snapshot.unpacked").exists(), "unpacked checkpoint left behind"
        assert _content(dst) == _content(src)
        assert dst.revision == src.revision
        assert dst.applied_position == src.applied_position
        assert dst.leases() == {9: 30} and dst.lease_keys(9) == [b"leased"]
        assert members.get(a.id).client_urls == ["http://127.0.0.1:2379"]
        # The loaded store keeps working: history reads and new writes.
        old = dst.range(rpc_pb2.RangeRequest(key=b"k0005", revision=10))
        assert old.kvs[0].value == b"v5"
        dst.set_apply_position(20_000, 0)
        dst.put(rpc_pb2.PutRequest(key=b"after", value=b"x"))
        assert dst.revision == src.revision + 1
        # A restart keeps what was installed.
        dst = FACTORIES[dst_engine].reopen(dst, tmp_path / "dst")
        assert dst.range(rpc_pb2.RangeRequest(key=b"after")).kvs[0].value == b"x"
        assert dst.range(rpc_pb2.RangeRequest(key=b"stale")).count == 0
    finally:
        src.close()
        dst.close()


def test_rocksdb_snapshot_is_a_checkpoint(tmp_path: Path) -> None:
    """The RocksDB engine packs a checkpoint; the memory engine streams rows."""
    for engine, fmt in (("rocksdb", snapshot.CHECKPOINT), ("memory", snapshot.ROWS)):
        store = FACTORIES[engine].open(tmp_path / engine)
        try:
            _fill(store, 10)
            path = str(tmp_path / f"{engine}.snapshot")
            snapshot.save(path, store, _membership(), RAFT_DATA)
            with open(path, "rb") as f:
                assert f.read(len(snapshot.MAGIC)) == snapshot.MAGIC
                (n,) = snapshot._LEN.unpack(f.read(4))
                import pickle

                assert pickle.loads(f.read(n))["format"] == fmt
        finally:
            store.close()


def test_persistent_store_past_the_snapshot_is_left_alone(tmp_path: Path) -> None:
    """On restart pysyncobj loads the member's own snapshot; a RocksDB store
    already holds everything it covers (and more) and must not go back."""
    store = FACTORIES["rocksdb"].open(tmp_path / "db")
    try:
        _fill(store, 20)
        path = str(tmp_path / "raft.snapshot")
        snapshot.save(path, store, _membership(), (("e", 5), ("p", 4), []))
        store.set_apply_position(100, 0)
        store.put(rpc_pb2.PutRequest(key=b"newer", value=b"kept"))
        snapshot.load(path, store, _membership())
        assert store.range(rpc_pb2.RangeRequest(key=b"newer")).kvs[0].value == b"kept"
    finally:
        store.close()


def test_a_store_holding_part_of_the_snapshots_last_entry_loads_it(tmp_path: Path) -> None:
    """The requests of one Raft entry are written one by one; a store that
    holds only the first of the snapshot's last entry (a crash cut the rest
    off) does not hold the snapshot, though it is at the snapshot's index."""
    source = FACTORIES["memory"].open(tmp_path / "src")
    for position, key in enumerate((b"first", b"second")):
        source.set_apply_position(7, position)
        source.put(rpc_pb2.PutRequest(key=key, value=b"v"))
    path = str(tmp_path / "raft.snapshot")
    snapshot.save(path, source, _membership(), (("e", 7), ("p", 6), []))
    store = FACTORIES["rocksdb"].open(tmp_path / "db")
    try:
        store.set_apply_position(7, 0)
        store.put(rpc_pb2.PutRequest(key=b"first", value=b"v"))
        snapshot.load(path, store, _membership())
        assert store.applied_position == (7, 1)
        assert [kv.key for kv in store.range(rpc_pb2.RangeRequest(key=b"a", range_end=b"z")).kvs] == \
            [b"first", b"second"]
    finally:
        store.close()


def test_truncated_snapshot_is_refused(tmp_path: Path) -> None:
    for engine in ENGINES:
        src = FACTORIES[engine].open(tmp_path / f"src-{engine}")
        dst = FACTORIES["memory"].open(tmp_path / "dst")
        try:
            _fill(src, 50)
            path = tmp_path / f"{engine}.snapshot"
            snapshot.save(str(path), src, _membership(), RAFT_DATA)
            data = path.read_bytes()
            path.write_bytes(data[: len(data) - 40])
            dst.set_apply_position(1, 0)
            dst.put(rpc_pb2.PutRequest(key=b"mine", value=b"kept"))
            with pytest.raises(RuntimeError, match="truncated|ended early"):
                snapshot.load(str(path), dst, _membership())
            # Refused before anything was replaced.
            assert dst.range(rpc_pb2.RangeRequest(key=b"mine")).kvs[0].value == b"kept"
        finally:
            src.close()
            dst.close()


def test_import_killed_midway_is_not_taken_for_done(tmp_path: Path) -> None:
    """A persistent store killed while loading a row snapshot must come back
    *behind* the snapshot (so it is loaded again), not claiming to hold it."""
    src = FACTORIES["memory"].open(tmp_path / "src")
    src.lease_grant(rpc_pb2.LeaseGrantRequest(ID=7, TTL=60))
    _fill(src, 50)
    dst = FACTORIES["rocksdb"].open(tmp_path / "dst")

    class Killed(BaseException):
        pass

    real_write = dst.backend.write

    def dying_write(batch):
        # Killed just before the lease rows (the last table) land.
        if any(table == "lease" and value is not None for table, _key, value in batch.ops):
            raise Killed
        real_write(batch)

    dst.backend.write = dying_write  # type: ignore[method-assign]
    with pytest.raises(Killed):
        dst.import_items(src.export_items(), batch_rows=1)
    dst.backend.write = real_write  # type: ignore[method-assign]
    again = FACTORIES["rocksdb"].reopen(dst, tmp_path / "dst")
    try:
        assert again.applied_position < src.applied_position
        path = str(tmp_path / "raft.snapshot")
        snapshot.save(path, src, _membership(), ((0, src.applied_position[0]), None, []))
        snapshot.load(path, again, _membership())
        assert _content(again) == _content(src) and again.leases() == {7: 60}
    finally:
        again.close()
        src.close()


def test_writing_rows_steps_aside_while_an_apply_is_long(tmp_path: Path) -> None:
    """While `busy` (an entry applying for long), the writer waits between
    chunks of rows; once it is not, the file is finished and loads."""
    store = open_memory_store()
    _fill(store, 3 * PAUSE_EVERY)
    busy = threading.Event()
    busy.set()
    read = 0

    class Counted:
        def __init__(self, rows) -> None:
            self.rows = rows

        def __iter__(self):
            nonlocal read
            for row in self.rows:
                read += 1
                yield row

        def close(self) -> None:
            self.rows.close()

    pending = snapshot.freeze(str(tmp_path / "staging"), store, _membership(), RAFT_DATA, busy=busy.is_set)
    pending._rows = Counted(pending._rows)
    writer = threading.Thread(target=pending.write, args=(str(tmp_path / "snap"),))
    writer.start()
    time.sleep(0.3)  # a stretch of "busy": the writer must not get past its first chunk
    assert read <= PAUSE_EVERY, read
    busy.clear()
    writer.join(10)
    assert not writer.is_alive() and read > 2 * PAUSE_EVERY
    again = open_memory_store()
    snapshot.load(str(tmp_path / "snap"), again, _membership())
    assert _content(again) == _content(store)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_snapshot_is_synced_as_it_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: str) -> None:
    """Not all at the end: one fsync of a whole big file held every member's
    Raft log fsyncs, and so every commit, behind it (snapshot.SYNC_EVERY)."""
    synced: list[int] = []
    path = tmp_path / f"{engine}.snapshot"

    def fdatasync(fd: int) -> None:
        synced.append(path.stat().st_size)

    monkeypatch.setattr(snapshot, "SYNC_EVERY", 4096)
    monkeypatch.setattr(snapshot, "datasync", fdatasync)
    store = FACTORIES[engine].open(tmp_path / "src")
    again = open_memory_store()
    try:
        _fill(store, 600)
        snapshot.save(str(path), store, _membership(), RAFT_DATA)
        size = path.stat().st_size
        assert len(synced) >= 3, (synced, size)
        gaps = [b - a for a, b in zip([0] + synced, synced)]
        assert min(gaps) >= 4096 and synced[-1] < size, ("every SYNC_EVERY bytes, along the way", synced, size)
        snapshot.load(str(path), again, _membership())
        assert _content(again) == _content(store)
    finally:
        store.close()


def test_writing_rows_rests_as_long_as_each_chunk_took(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Beside Raft (`busy` given), the writer keeps to about half a core:
    after each chunk of rows it sleeps for the CPU time the chunk cost (all
    members write at once)."""
    store = open_memory_store()
    _fill(store, 3 * PAUSE_EVERY)
    slept: list[float] = []

    class Clock:
        cpu = 0.0

        def thread_time(self) -> float:
            self.cpu += 0.004  # each look at the clock: 4 ms of CPU more
            return self.cpu

        def sleep(self, seconds: float) -> None:
            slept.append(seconds)

    monkeypatch.setattr(snapshot, "time", Clock())
    pending = snapshot.freeze(str(tmp_path / "staging"), store, _membership(), RAFT_DATA, busy=lambda: False)
    pending.write(str(tmp_path / "snap"))
    assert len(slept) >= 2 and all(abs(s - 0.004) < 1e-9 for s in slept), slept
    again = open_memory_store()
    snapshot.load(str(tmp_path / "snap"), again, _membership())
    assert _content(again) == _content(store)
