"""RocksDBBackend specifics the store conformance suite cannot see: scan
bounds against a sorted model, atomic batches across column families,
persistence (including a killed process), checkpoints, the engine marker and
size accounting."""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
from rocksdict import Options, Rdict

from metastore.backend import TABLES, WriteBatch
from metastore.engines import open_store
from metastore.engines.rocksdb import BackendClosedError, ForeignDirectoryError, RocksDBBackend
from metastore.engines.rocksdb.marker import MARKER_NAME


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "db")


@pytest.fixture
def backend(db_path: str) -> Iterator[RocksDBBackend]:
    b = RocksDBBackend(db_path)
    yield b
    b.close()


def fill(b: RocksDBBackend, table: str, keys: list[bytes]) -> None:
    batch = WriteBatch()
    for k in keys:
        batch.put(table, k, b"v" + k)
    b.write(batch)


def scan_keys(b: RocksDBBackend, table: str, start: bytes, end: bytes | None, reverse: bool = False) -> list[bytes]:
    return [k for k, _ in b.scan(table, start, end, reverse)]


def model(keys: list[bytes], start: bytes, end: bytes | None, reverse: bool = False) -> list[bytes]:
    got = sorted(k for k in set(keys) if k >= start and (end is None or k < end))
    return got[::-1] if reverse else got


# -- scan bounds ------------------------------------------------------------------
EDGE_KEYS = [b"\x00", b"\x00\x00", b"\x00\xff", b"a", b"a\x00", b"a\x00\x00", b"a\xff", b"a\xff\xff",
             b"ab", b"b", b"\xff", b"\xff\x00", b"\xff\xff", b"\xff\xff\xff"]
BOUNDS = [b"", b"\x00", b"\x00\x00", b"\x00\x01", b"a", b"a\x00", b"a\x00\x01", b"a\xff", b"a\xff\xff\xff",
          b"b", b"\xff", b"\xff\xff", b"\xff\xff\xff\xff", None]


@pytest.mark.parametrize("flushed", [False, True], ids=["memtable", "sst"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_scan_bounds_match_model(backend: RocksDBBackend, reverse: bool, flushed: bool) -> None:
    fill(backend, "kv", EDGE_KEYS)
    if flushed:
        backend.compact()
    for start in BOUNDS:
        if start is None:
            continue
        for end in BOUNDS:
            assert scan_keys(backend, "kv", start, end, reverse) == model(EDGE_KEYS, start, end, reverse), (start, end)


def test_scan_keys_equal_to_bounds(backend: RocksDBBackend) -> None:
    fill(backend, "kv", [b"a", b"b", b"c", b"d"])
    assert scan_keys(backend, "kv", b"b", b"d") == [b"b", b"c"]  # start included, end excluded
    assert scan_keys(backend, "kv", b"b", b"d", reverse=True) == [b"c", b"b"]
    assert scan_keys(backend, "kv", b"b", b"c") == [b"b"]
    assert scan_keys(backend, "kv", b"b", b"c", reverse=True) == [b"b"]
    assert scan_keys(backend, "kv", b"b", b"b") == [] and scan_keys(backend, "kv", b"b", b"b", True) == []
    assert scan_keys(backend, "kv", b"c", b"b") == [] and scan_keys(backend, "kv", b"c", b"b", True) == []
    assert scan_keys(backend, "kv", b"d", None) == [b"d"]
    assert scan_keys(backend, "kv", b"d", None, reverse=True) == [b"d"]
    assert scan_keys(backend, "kv", b"", None, reverse=True) == [b"d", b"c", b"b", b"a"]
    assert scan_keys(backend, "kv", b"e", None) == [] and scan_keys(backend, "kv", b"e", None, True) == []
    assert scan_keys(backend, "kv", b"", b"a") == [] and scan_keys(backend, "kv", b"", b"a", True) == []


def test_scan_empty_table(backend: RocksDBBackend) -> None:
    fill(backend, "kv", [b"a"])  # other tables' rows never leak into a scan
    for table in ("hist", "rev", "meta"):
        for reverse in (False, True):
            assert scan_keys(backend, table, b"", None, reverse) == []
            assert scan_keys(backend, table, b"a", b"b", reverse) == []


def test_scan_random_against_model(backend: RocksDBBackend) -> None:
    rnd = random.Random(5)
    alphabet = [b"\x00", b"\x01", b"a", b"\xfe", b"\xff"]
    keys = [b"".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 4))) for _ in range(300)]
    fill(backend, "hist", keys[:150])
    backend.compact()  # half in SST files, half in the memtable
    fill(backend, "hist", keys[150:])
    deleted = set(rnd.sample(keys, 60))  # tombstones over both
    gone = WriteBatch()
    for k in deleted:
        gone.delete("hist", k)
    backend.write(gone)
    keys = [k for k in keys if k not in deleted]
    for _ in range(400):
        start = b"".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 4)))
        end = None if rnd.random() < 0.2 else b"".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 5)))
        reverse = rnd.random() < 0.5
        assert scan_keys(backend, "hist", start, end, reverse) == model(keys, start, end, reverse)


def test_interleaved_scans_keep_their_bounds(backend: RocksDBBackend) -> None:
    """rocksdict keeps a pointer to the upper bound: a scan must not end
    early once other objects reuse the memory of its (temporary) bound."""
    keys = [b"k%03d" % i for i in range(100)]
    fill(backend, "kv", keys)
    for reverse in (False, True):
        # Bounds built at run time (a constant would live on in the code object).
        a = backend.scan("kv", b"k%03d" % 10, b"k%03d" % 50, reverse)
        b = backend.scan("kv", b"k%03d" % 20, b"k%03d" % 30, reverse)
        first = next(a)
        junk = [b"k%03d" % i for i in range(5000)] + [bytes(8) for _ in range(5000)]
        assert len(list(b)) == 10
        assert len([first, *a]) == 40
        del junk


# -- writes -----------------------------------------------------------------------------
def test_write_applies_every_op_across_tables(backend: RocksDBBackend) -> None:
    batch = WriteBatch()
    for table in TABLES:
        batch.put(table, b"k", table.encode())
    batch.put("kv", b"gone", b"x")
    batch.delete("kv", b"gone")  # ops apply in order
    batch.delete("hist", b"never-there")
    backend.write(batch)
    assert [backend.get(t, b"k") for t in TABLES] == [t.encode() for t in TABLES]
    assert backend.get("kv", b"gone") is None
    again = WriteBatch()
    again.delete("kv", b"k")
    again.put("kv", b"k", b"back")
    backend.write(again)
    assert backend.get("kv", b"k") == b"back"


def test_write_with_unknown_table_applies_nothing(backend: RocksDBBackend) -> None:
    batch = WriteBatch()
    batch.put("kv", b"a", b"1")
    batch.put("nope", b"b", b"2")
    with pytest.raises(KeyError):
        backend.write(batch)
    assert backend.get("kv", b"a") is None
    backend.write(WriteBatch())  # empty: nothing to do


def test_values_are_bytes_exactly(backend: RocksDBBackend) -> None:
    values = [b"", b"\x00", bytes(range(256)), b"x" * 100_000]
    batch = WriteBatch()
    for i, v in enumerate(values):
        batch.put("kv", b"%d" % i, v)
    backend.write(batch)
    assert [backend.get("kv", b"%d" % i) for i in range(len(values))] == values
    assert backend.get("kv", b"missing") is None


# -- persistence and lifecycle --------------------------------------------------------------
def test_data_survives_close_and_reopen(db_path: str) -> None:
    b = RocksDBBackend(db_path)
    fill(b, "kv", [b"a", b"b"])
    fill(b, "rev", [b"r"])
    b.close()
    b.close()  # idempotent
    again = RocksDBBackend(db_path)
    try:
        assert again.get("kv", b"a") == b"va" and again.get("rev", b"r") == b"vr"
        assert scan_keys(again, "kv", b"", None) == [b"a", b"b"]
    finally:
        again.close()


def test_use_after_close_raises(db_path: str) -> None:
    b = RocksDBBackend(db_path)
    b.close()
    for call in (lambda: b.get("kv", b"a"), lambda: list(b.scan("kv", b"", None)),
                 lambda: fill(b, "kv", [b"a"]), b.size, b.compact, lambda: b.checkpoint(db_path + ".cp")):
        with pytest.raises(BackendClosedError):
            call()


def test_open_scan_does_not_keep_the_database_locked(db_path: str) -> None:
    b = RocksDBBackend(db_path)
    fill(b, "kv", [b"a", b"b", b"c"])
    pending = b.scan("kv", b"", None)
    next(pending)
    b.close()
    again = RocksDBBackend(db_path)  # would fail on RocksDB's LOCK were the scan still holding it
    again.close()


def test_second_open_of_an_open_database_fails(backend: RocksDBBackend, db_path: str) -> None:
    with pytest.raises(Exception, match="(?i)lock"):
        RocksDBBackend(db_path)


def _write_and_die(db_path: str, wal: bool, flush_after: int | None = None) -> None:
    """In a process of its own: 50 batches, each a `kv` key and `meta/last`
    (flushed after batch `flush_after`), then SIGKILL -- no close."""
    code = (
        "import os, sys\n"
        "from metastore.backend import WriteBatch\n"
        "from metastore.engines.rocksdb import RocksDBBackend\n"
        f"b = RocksDBBackend(sys.argv[1], wal={wal})\n"
        "for i in range(50):\n"
        "    w = WriteBatch(); w.put('kv', b'k%03d' % i, b'v'); w.put('meta', b'last', b'%d' % i); b.write(w)\n"
        f"    if i == {flush_after}:\n"
        "        b.flush_memtables()\n"
        "os.kill(os.getpid(), 9)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, db_path], capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr.decode()


def test_killed_process_keeps_written_batches(db_path: str) -> None:
    """No close, no flush, no fsync (sync=False): the WAL still has the batch."""
    _write_and_die(db_path, wal=True)
    b = RocksDBBackend(db_path)
    try:
        assert len(scan_keys(b, "kv", b"", None)) == 50 and b.get("meta", b"last") == b"49"
    finally:
        b.close()


def test_without_the_wal_a_killed_process_reopens_at_a_flush(db_path: str) -> None:
    """wal=False (how a member runs: its Raft journal replays the rest): a
    kill loses what only the memtables held, and the database reopens at
    the last flush -- every table at the same batch, never part of one."""
    _write_and_die(db_path, wal=False, flush_after=19)
    b = RocksDBBackend(db_path, wal=False)
    try:
        last = int(b.get("meta", b"last"))
        assert 19 <= last < 49  # the flushed batches, not the 30 after them
        assert scan_keys(b, "kv", b"", None) == [b"k%03d" % i for i in range(last + 1)]
    finally:
        b.close()


def test_without_the_wal_close_keeps_everything(db_path: str) -> None:
    b = RocksDBBackend(db_path, wal=False)
    fill(b, "kv", [b"a", b"b"])
    b.close()
    again = RocksDBBackend(db_path, wal=False)
    try:
        assert scan_keys(again, "kv", b"", None) == [b"a", b"b"]
    finally:
        again.close()
    with pytest.raises(ValueError, match="sync needs the WAL"):
        RocksDBBackend(db_path, sync=True, wal=False)


def test_sync_writes(tmp_path: Path) -> None:
    b = RocksDBBackend(str(tmp_path / "s"), sync=True)
    try:
        assert b.sync
        fill(b, "kv", [b"a"])
        assert b.get("kv", b"a") == b"va"
    finally:
        b.close()


def test_opens_a_database_with_extra_column_families(db_path: str) -> None:
    """A newer build may add a table; RocksDB wants every family named on open."""
    RocksDBBackend(db_path).close()
    opts = Options(raw_mode=True)
    opts.create_missing_column_families(True)
    families = {name: Options(raw_mode=True) for name in (*TABLES, "future")}
    raw = Rdict(db_path, opts, column_families=families)
    raw.get_column_family("future")[b"x"] = b"y"
    raw.close()
    b = RocksDBBackend(db_path)
    try:
        assert b.get("kv", b"x") is None
    finally:
        b.close()


# -- checkpoints -----------------------------------------------------------------------------
def test_checkpoint_is_a_consistent_openable_copy(backend: RocksDBBackend, tmp_path: Path) -> None:
    fill(backend, "kv", [b"a", b"b"])
    fill(backend, "meta", [b"rev1"])
    target = str(tmp_path / "cp")
    backend.checkpoint(target)
    fill(backend, "kv", [b"after"])  # not in the checkpoint
    with pytest.raises(FileExistsError):
        backend.checkpoint(target)
    copy = RocksDBBackend(target)
    try:
        assert scan_keys(copy, "kv", b"", None) == [b"a", b"b"]
        assert copy.get("meta", b"rev1") == b"vrev1"
        fill(copy, "kv", [b"only-in-copy"])
    finally:
        copy.close()
    assert backend.get("kv", b"only-in-copy") is None


def test_flush_empties_every_memtable(backend: RocksDBBackend) -> None:
    """What prepares a checkpoint (MVCCStore.prepare_frozen_copy): the
    memtables of every table go to SST files, the data stays."""
    keys = [b"k%06d" % i for i in range(3000)]
    fill(backend, "kv", keys)
    fill(backend, "hist", keys[:10])

    def in_memtables() -> int:
        return sum(cf.property_int_value("rocksdb.num-entries-active-mem-table") or 0
                   for cf in backend._cfs.values())

    assert in_memtables() == 3010
    backend.flush_memtables()
    assert in_memtables() == 0
    assert scan_keys(backend, "kv", b"", None) == keys
    assert backend.get("hist", b"k000009") == b"vk000009"


def test_from_checkpoint_replaces_the_database(tmp_path: Path) -> None:
    live_path, cp = str(tmp_path / "live"), str(tmp_path / "cp")
    source = RocksDBBackend(str(tmp_path / "source"))
    fill(source, "kv", [b"snap"])
    source.checkpoint(cp)
    source.close()
    live = RocksDBBackend(live_path)
    fill(live, "kv", [b"old"])
    live.close()
    restored = RocksDBBackend.from_checkpoint(cp, live_path)
    try:
        assert scan_keys(restored, "kv", b"", None) == [b"snap"]
        assert not os.path.exists(cp)
        assert sorted(os.listdir(tmp_path)) == ["live", "source"]  # no leftovers
    finally:
        restored.close()


def test_interrupted_swap_completes_on_open(tmp_path: Path) -> None:
    """A crash after the old database moved away but before the checkpoint
    moved in: opening finishes the swap instead of creating an empty store."""
    live_path = str(tmp_path / "live")
    source = RocksDBBackend(str(tmp_path / "source"))
    fill(source, "kv", [b"snap"])
    source.checkpoint(live_path + ".incoming")
    source.close()
    b = RocksDBBackend(live_path)
    try:
        assert scan_keys(b, "kv", b"", None) == [b"snap"]
        assert not os.path.exists(live_path + ".incoming")
    finally:
        b.close()


def test_from_checkpoint_refuses_foreign_directories(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus"
    bogus.mkdir()
    (bogus / "file").write_text("x")
    with pytest.raises(ForeignDirectoryError):
        RocksDBBackend.from_checkpoint(str(bogus), str(tmp_path / "live"))
    source = RocksDBBackend(str(tmp_path / "source"))
    source.checkpoint(str(tmp_path / "cp"))
    source.close()
    with pytest.raises(ForeignDirectoryError):
        RocksDBBackend.from_checkpoint(str(tmp_path / "cp"), str(bogus))
    assert (bogus / "file").read_text() == "x"


# -- the engine marker -----------------------------------------------------------------------
def test_refuses_a_directory_it_did_not_create(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "journal").write_bytes(b"someone else's data")
    with pytest.raises(ForeignDirectoryError, match="not created by"):
        RocksDBBackend(str(foreign))
    assert os.listdir(foreign) == ["journal"]  # untouched


def test_refuses_a_rocksdb_without_the_marker(tmp_path: Path) -> None:
    path = str(tmp_path / "plain")
    Rdict(path).close()  # a RocksDB, but not one of ours
    with pytest.raises(ForeignDirectoryError):
        RocksDBBackend(path)


def test_refuses_a_wrong_marker_or_a_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / MARKER_NAME).write_text("metastore-memory 1\n")
    with pytest.raises(ForeignDirectoryError):
        RocksDBBackend(str(bad))
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ForeignDirectoryError):
        RocksDBBackend(str(afile))


def test_refuses_a_marker_without_its_database(db_path: str) -> None:
    RocksDBBackend(db_path).close()
    os.remove(os.path.join(db_path, "CURRENT"))
    with pytest.raises(ForeignDirectoryError, match="CURRENT"):
        RocksDBBackend(db_path)


def test_empty_or_marker_only_directory_is_fresh(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    RocksDBBackend(str(empty)).close()
    assert (empty / MARKER_NAME).exists() and (empty / "CURRENT").exists()
    marker_only = tmp_path / "marker_only"
    marker_only.mkdir()
    (marker_only / MARKER_NAME).write_bytes((empty / MARKER_NAME).read_bytes())
    RocksDBBackend(str(marker_only)).close()


def test_engine_factory_uses_a_subdirectory(tmp_path: Path) -> None:
    store = open_store("rocksdb", str(tmp_path))
    try:
        assert (tmp_path / "rocksdb" / MARKER_NAME).exists()
    finally:
        store.close()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "rocksdb").mkdir()
    (tmp_path / "other" / "rocksdb" / "x").write_text("x")
    with pytest.raises(ForeignDirectoryError):
        open_store("rocksdb", str(tmp_path / "other"))


def test_scan_ranges_gives_each_range_as_scan_does(backend: RocksDBBackend) -> None:
    from metastore.backend import scan_ranges

    batch = WriteBatch()
    for i in range(100):
        batch.put("hist", b"k%03d" % i, b"v%d" % i)
    backend.write(batch)
    gone = WriteBatch()
    for i in range(20, 60):
        gone.delete("hist", b"k%03d" % i)  # tombstones between live rows
    backend.write(gone)
    ranges = [(b"k005", b"k008"), (b"k019", b"k021"), (b"k030", b"k040"), (b"k059", b"k061"), (b"k099", b"l")]
    got = list(scan_ranges(backend, "hist", ranges))
    assert got == [list(backend.scan("hist", start, end)) for start, end in ranges]
    assert got[1] == [(b"k019", b"v19")] and got[2] == [] and got[3] == [(b"k060", b"v60")]


# -- size -------------------------------------------------------------------------------------
def test_size_grows_with_data_and_shrinks_after_compaction(backend: RocksDBBackend) -> None:
    occupied0, used0 = backend.size()
    assert occupied0 >= used0 >= 0
    value = b"x" * 1000
    batch = WriteBatch()
    batch.put("kv", b"one", value)
    backend.write(batch)
    occupied1, used1 = backend.size()
    assert used1 >= used0 + 1000 and occupied1 >= used1
    big = WriteBatch()
    for i in range(2000):
        big.put("hist", b"h%05d" % i, os.urandom(200))  # incompressible
    backend.write(big)
    occupied2, used2 = backend.size()
    assert used2 >= used1 + 400_000 and occupied2 >= used2
    backend.compact()  # all of it in SST files now
    occupied3, used3 = backend.size()
    assert used3 >= 400_000 and occupied3 >= used3
    gone = WriteBatch()
    for i in range(2000):
        gone.delete("hist", b"h%05d" % i)
    backend.write(gone)
    backend.compact()
    occupied4, used4 = backend.size()
    assert used4 < 100_000 and occupied4 < 100_000


def test_size_reads_rocksdb_figures_at_most_every_refresh_period(
        backend: RocksDBBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """The quota check asks for the size on every Put: RocksDB's own figures
    (~20 us to read) are read once a period, while what write() adds shows at
    once, and a flush asked here is seen at the next call."""
    import metastore.engines.rocksdb.backend as rocksdb_backend

    reads = []
    real = backend._read_props
    monkeypatch.setattr(backend, "_read_props", lambda: reads.append(1) or real())
    monkeypatch.setattr(rocksdb_backend, "SIZE_REFRESH", 3600.0)
    _occupied, used = backend.size()
    for i in range(50):
        batch = WriteBatch()
        batch.put("kv", b"k%03d" % i, os.urandom(100))
        backend.write(batch)
        _occupied, now_used = backend.size()
        assert now_used >= used + 100
        used = now_used
    assert len(reads) == 1
    backend.flush_memtables()
    occupied, used = backend.size()
    assert len(reads) == 2
    assert occupied >= used >= 5000  # now in an SST file, counted once


def test_from_checkpoint_copies_across_filesystems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    source = RocksDBBackend(str(tmp_path / "source"))
    fill(source, "kv", [b"snap"])
    cp = str(tmp_path / "cp")
    source.checkpoint(cp)
    source.close()
    real_rename = os.rename

    def rename(src, dst):  # the checkpoint "lives on another filesystem"
        if os.path.abspath(src) == cp:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    restored = RocksDBBackend.from_checkpoint(cp, str(tmp_path / "live"))
    try:
        assert scan_keys(restored, "kv", b"", None) == [b"snap"]
        assert not os.path.exists(cp) and not os.path.exists(str(tmp_path / "live.partial"))
    finally:
        restored.close()


def test_checkpoints_and_compactions_overlap_but_close_waits_for_them(tmp_path):
    """A Raft snapshot's checkpoint (tick thread) must not wait behind the
    full compaction after an MVCC compaction; close() must wait for both."""
    import threading

    from metastore.engines.rocksdb.backend import RocksDBBackend

    backend = RocksDBBackend(str(tmp_path / "db"))
    inside, release = threading.Event(), threading.Event()
    closed = threading.Event()

    def long_use() -> None:  # stands for a compact_range of many seconds
        with backend._admin.shared():
            inside.set()
            assert release.wait(10)

    user = threading.Thread(target=long_use)
    user.start()
    assert inside.wait(10)
    backend.checkpoint(str(tmp_path / "cp"))  # does not wait for the other user
    closer = threading.Thread(target=lambda: (backend.close(), closed.set()))
    closer.start()
    assert not closed.wait(0.3)  # close waits...
    release.set()
    assert closed.wait(10)  # ...until the long operation is over
    user.join()
    closer.join()
