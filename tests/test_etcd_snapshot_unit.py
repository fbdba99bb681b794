"""The bbolt reader and writer, and a store's rows in etcd's schema and back.

What etcd itself makes of these files is tested with the real etcd and
etcdctl in tests/test_etcd_snapshots.py; here the format's corners (overflow
pages, several branch levels, damaged files) and the exactness of the
conversion, on both engines."""
from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import pytest

from metastore import bbolt, etcd_snapshot
from metastore.api.pb import kv_pb2, rpc_pb2 as pb
from metastore.backend import WriteBatch
from metastore.mvcc import MVCCStore
from metastore.mvcc_compact import next_compaction_batch
from metastore.mvcc_layout import META_APPLIED, META_COMPACT_REVISION, pack_u64
from store_engines import FACTORIES
from store_fixtures import engine, make_store  # noqa: F401  (fixtures)


def test_round_trip_with_overflow_pages_and_several_branch_levels(tmp_path: Path) -> None:
    rng = random.Random(7)
    big = {b"k%05d" % i: rng.randbytes(rng.choice([0, 5, 300, 700, 5000])) for i in range(2000)}
    names = [b"b", b"a", b"empty"]
    path = str(tmp_path / "t.db")
    # 512-byte pages: a bucket of 2,000 keys needs three levels of branches.
    size = bbolt.write(path, [(b"b", sorted(big.items())), (b"a", [(b"x", b"1")]), (b"empty", [])],
                       page_size=512)
    assert size == os.path.getsize(path) and size % 512 == 0
    assert bbolt.is_bbolt(path)
    with bbolt.Reader(path) as db:
        assert db.buckets() == sorted(names)
        assert list(db.items(b"b")) == sorted(big.items())
        assert list(db.items(b"a")) == [(b"x", b"1")]
        assert list(db.items(b"empty")) == []
        assert list(db.items(b"missing")) == []
        assert db.size == size


def test_the_writer_refuses_unsorted_keys(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ascending"):
        bbolt.write(str(tmp_path / "t.db"), [(b"a", [(b"2", b""), (b"1", b"")])])


def test_damaged_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    bbolt.write(str(path), [(b"a", [(b"k%03d" % i, b"v" * 100) for i in range(500)])])
    good = path.read_bytes()

    # One damaged meta page: the other one is used.
    path.write_bytes(good[:20] + b"\xff" + good[21:])
    with bbolt.Reader(str(path)) as db:
        assert len(list(db.items(b"a"))) == 500
    # Both: not a bbolt file at all.
    page = bbolt.PAGE_SIZE
    path.write_bytes(good[:20] + b"\xff" + good[21:page + 20] + b"\xff" + good[page + 21:])
    assert not bbolt.is_bbolt(str(path))
    with pytest.raises(bbolt.BoltError, match="no valid meta page"):
        bbolt.Reader(str(path))
    # Cut short: the meta page counts pages the file lacks.
    path.write_bytes(good[:-page])
    with pytest.raises(bbolt.BoltError, match="truncated"):
        bbolt.Reader(str(path))
    # A leaf page overwritten with garbage flags.
    path.write_bytes(good[:2 * page] + b"\0" * 8 + b"\x40\x00" + good[2 * page + 10:])
    with bbolt.Reader(str(path)) as db, pytest.raises(bbolt.BoltError, match="neither a branch nor a leaf"):
        list(db.items(b"a"))


def _page_header(data: bytearray, page: int, page_size: int = bbolt.PAGE_SIZE) -> tuple[int, int, int, int]:
    return struct.unpack_from("<QHHI", data, page * page_size)


def test_malformed_pages_are_refused_not_followed(tmp_path: Path) -> None:
    """What a damaged or hostile file can do to the reader: claim more
    elements than a page holds, point two branches at one page (a cycle, or
    a fan-out that would copy one page thousands of times), list keys out
    of order. Each is refused with a BoltError."""
    path = tmp_path / "t.db"
    items = [(b"k%04d" % i, b"v" * 50) for i in range(300)]
    bbolt.write(str(path), [(b"a", items)], page_size=512)
    good = bytearray(path.read_bytes())
    pages = len(good) // 512
    branch = next(p for p in range(2, pages) if _page_header(good, p, 512)[1] == 0x01)
    leaf = next(p for p in range(2, pages) if _page_header(good, p, 512)[1] == 0x02 and _page_header(good, p, 512)[2] > 1)

    def damaged(change) -> str:
        data = bytearray(good)
        change(data)
        path.write_bytes(bytes(data))
        with bbolt.Reader(str(path)) as db, pytest.raises(bbolt.BoltError) as info:
            list(db.items(b"a"))
        return str(info.value)

    # Element count beyond the page.
    assert "more than it can hold" in damaged(lambda d: struct.pack_into("<H", d, leaf * 512 + 10, 0xFFFF))
    # The branch's second child made the same page as its first.

    def same_child(d: bytearray) -> None:
        first = struct.unpack_from("<Q", d, branch * 512 + 16 + 8)[0]
        struct.pack_into("<Q", d, branch * 512 + 32 + 8, first)
    assert "referenced twice" in damaged(same_child)

    # A leaf's first two keys swapped (both three-letter keys of equal size).
    def swap(d: bytearray) -> None:
        base = leaf * 512 + 16
        _f, pos0, ksize, _v = struct.unpack_from("<IIII", d, base)
        _f, pos1, _k, _v = struct.unpack_from("<IIII", d, base + 16)
        k0 = bytes(d[base + pos0:base + pos0 + ksize])
        k1 = bytes(d[base + 16 + pos1:base + 16 + pos1 + ksize])
        d[base + pos0:base + pos0 + ksize] = k1
        d[base + 16 + pos1:base + 16 + pos1 + ksize] = k0
    assert "out of order" in damaged(swap)


def _fill(store: MVCCStore) -> None:
    """Overwrites, deletes, a multi-write txn, a lease, binary keys, a compaction."""
    lease = store.lease_grant(pb.LeaseGrantRequest(ID=77, TTL=600))
    for i in range(40):
        store.put(pb.PutRequest(key=b"key/%d" % (i % 7), value=b"v%d" % i))
    store.put(pb.PutRequest(key=b"bin\x00ary", value=bytes(range(256))))
    store.put(pb.PutRequest(key=b"leased", value=b"x", lease=lease.ID))
    store.delete_range(pb.DeleteRangeRequest(key=b"key/3"))
    store.txn(pb.TxnRequest(success=[
        pb.RequestOp(request_put=pb.PutRequest(key=b"t/1", value=b"a")),
        pb.RequestOp(request_put=pb.PutRequest(key=b"t/2", value=b"b")),
        pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=b"key/4"))]))
    store.compact(pb.CompactionRequest(revision=30))
    assert store.wait_compacted(30, timeout=10)
    for i in range(5):
        store.put(pb.PutRequest(key=b"key/%d" % i, value=b"after-%d" % i))
    store.delete_range(pb.DeleteRangeRequest(key=b"key/0"))


def _rows(store: MVCCStore) -> list[tuple[str, bytes, bytes]]:
    return sorted(row for row in store.export_items() if row[:2] != ("meta", META_APPLIED))


def _save(store: MVCCStore, path: str, header: dict, own_bucket: bool = True) -> None:
    """What Maintenance.Snapshot writes (without metastore's bucket: what
    etcd itself would have written for the same history)."""
    view = etcd_snapshot.RowsView(store.export_items())
    bbolt.write(path, [(name, items) for name, items in etcd_snapshot.buckets(view, header)
                       if own_bucket or name != etcd_snapshot.METASTORE])


def _load(path: str, target: MVCCStore) -> etcd_snapshot.Database:
    with bbolt.Reader(path) as db:
        contents = etcd_snapshot.Database(db.items)
        target.import_items(contents.rows())
    return contents


def _same_answers(target: MVCCStore, source: MVCCStore) -> None:
    """Every read a client can make: the keyspace at each revision still
    readable, the leases and their keys, the revision and compaction."""
    assert (target.revision, target.compact_revision) == (source.revision, source.compact_revision)
    for rev in range(max(source.compact_revision, 1), source.revision + 1):
        at = pb.RangeRequest(key=b"\0", range_end=b"\0", revision=rev)
        assert target.range(at) == source.range(at), f"at revision {rev}"
    assert target.leases() == source.leases()
    for lease in source.leases():
        assert target.lease_keys(lease) == source.lease_keys(lease)


def test_a_store_survives_the_round_trip_through_etcds_schema(make_store, tmp_path: Path) -> None:  # noqa: F811
    source, _ = make_store()
    _fill(source)
    path = str(tmp_path / "snap.db")
    _save(source, path, {"member_id": "1"})
    target, _ = make_store()
    contents = _load(path, target)
    assert contents.header == {"member_id": "1"}
    assert contents.revision == source.revision
    assert _rows(target) == _rows(source)


def test_etcds_schema_alone_gives_the_same_keys_history_and_leases(make_store, tmp_path: Path) -> None:  # noqa: F811
    """Without metastore's own bucket (a snapshot etcd took), the keys,
    their history, leases and compaction marks still come back whole."""
    source, _ = make_store()
    _fill(source)
    path = str(tmp_path / "snap.db")
    _save(source, path, {}, own_bucket=False)
    target, _ = make_store()
    contents = _load(path, target)
    assert contents.header is None and contents.revision == source.revision
    _same_answers(target, source)
    assert target.lease_keys(77) == [b"leased"]
    # This store has no liveness, drain or alarm rows (which only metastore's
    # bucket carries), so every row comes back, made from etcd's buckets.
    assert _rows(target) == _rows(source)


def _random_history(rng: random.Random, store: MVCCStore, steps: int) -> None:
    keys = [b"a", b"b", b"c", b"a\x00", b"d"]
    for _ in range(steps):
        roll, key = rng.random(), rng.choice(keys)
        if roll < 0.5:
            store.put(pb.PutRequest(key=key, value=b"%d" % rng.randrange(1000), lease=77 if roll < 0.1 else 0))
        elif roll < 0.7:
            store.delete_range(pb.DeleteRangeRequest(key=key))
        elif roll < 0.8:
            store.delete_range(pb.DeleteRangeRequest(key=b"a", range_end=b"c"))
        else:
            put, delete, put2 = rng.sample(keys, 3)
            store.txn(pb.TxnRequest(success=[
                pb.RequestOp(request_put=pb.PutRequest(key=put, value=b"t")),
                pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=delete)),
                pb.RequestOp(request_put=pb.PutRequest(key=put2, value=b"u"))]))


@pytest.mark.parametrize("seed", range(40))
def test_any_history_and_compaction_survives_the_round_trip(seed: int, tmp_path: Path) -> None:
    """Random puts, deletes and txns, compactions at any revision (a delete's
    included) and one left half done: the snapshot holds what a client
    could read, both with metastore's bucket and from etcd's alone."""
    rng = random.Random(seed)
    source = FACTORIES["memory"].open(tmp_path)
    source.lease_grant(pb.LeaseGrantRequest(ID=77, TTL=600))
    _random_history(rng, source, rng.randrange(5, 60))
    first = rng.randrange(1, source.revision + 1)
    if first > 1:
        source.compact(pb.CompactionRequest(revision=first))
        assert source.wait_compacted(first, timeout=10)
    _random_history(rng, source, rng.randrange(0, 30))
    second = rng.randrange(first, source.revision + 1)
    if second > first:
        # Recorded, and only some of its batches done (as a snapshot taken
        # while a long compaction runs finds it).
        batch = WriteBatch()
        batch.put("meta", META_COMPACT_REVISION, pack_u64(second))
        source.backend.write(batch)
        start = b""
        for _ in range(rng.randrange(0, 4)):
            step = next_compaction_batch(source.backend, second, chunk=rng.randrange(1, 4), start=start)
            if step is None:
                break
            source.backend.write(step[0])
            start = step[1]
        source = MVCCStore(source.backend, node_id=source.node_id)  # reads the marks again
    for own in (True, False):
        path = str(tmp_path / f"snap-{own}.db")
        _save(source, path, {}, own_bucket=own)
        target = FACTORIES["memory"].open(tmp_path)
        _load(path, target)
        _same_answers(target, source)


def test_a_file_etcd_wrote_to_is_read_as_etcds(tmp_path: Path) -> None:
    """etcd keeps metastore's bucket through its restore; once it has
    written to the database, the bucket no longer describes it and the
    revision and compaction come from etcd's buckets."""
    source = FACTORIES["memory"].open(tmp_path)
    _fill(source)
    path = str(tmp_path / "snap.db")
    _save(source, path, {"member_id": "1"})
    with bbolt.Reader(path) as db:
        contents = {name: list(db.items(name)) for name in db.buckets()}
    later = source.revision + 5
    contents[etcd_snapshot.KEY].append(
        (etcd_snapshot.revision_key(later, 0),
         kv_pb2.KeyValue(key=b"from-etcd", value=b"1", create_revision=later, mod_revision=later,
                         version=1).SerializeToString()))
    bbolt.write(path, sorted(contents.items()))
    target = FACTORIES["memory"].open(tmp_path)
    loaded = _load(path, target)
    assert loaded.header is None and target.revision == later
    assert target.range(pb.RangeRequest(key=b"from-etcd")).kvs[0].mod_revision == later


@pytest.mark.parametrize("damage, message", [
    ("lease", "not a leasepb.Lease"),
    ("record", "not an mvccpb.KeyValue"),
    ("revision", "not a revision"),
    ("mod", "says it was written at"),
])
def test_records_that_do_not_convert_are_refused(damage: str, message: str, tmp_path: Path) -> None:
    source = FACTORIES["memory"].open(tmp_path)
    _fill(source)
    path = str(tmp_path / "snap.db")
    _save(source, path, {}, own_bucket=False)
    with bbolt.Reader(path) as db:
        contents = {name: list(db.items(name)) for name in db.buckets()}
    keys = contents[etcd_snapshot.KEY]
    if damage == "lease":
        contents[etcd_snapshot.LEASE][0] = (contents[etcd_snapshot.LEASE][0][0], b"\xff\xff")
    elif damage == "record":
        keys[3] = (keys[3][0], b"\x0a\xff")
    elif damage == "revision":
        keys.append((b"\xff" * 3, b""))
    else:
        keys[3] = (keys[3][0], kv_pb2.KeyValue(key=b"x", mod_revision=999).SerializeToString())
    bbolt.write(path, sorted(contents.items()))
    with bbolt.Reader(path) as db, pytest.raises(etcd_snapshot.SchemaError, match=message):
        etcd_snapshot.Database(db.items)


def test_a_frozen_memory_copy_reads_as_it_was(tmp_path: Path) -> None:
    """What a snapshot reads of the memory engine's copy-on-write copy
    (the RocksDB engine reads a checkpoint, a database of its own)."""
    source = FACTORIES["memory"].open(tmp_path)
    source.put(pb.PutRequest(key=b"a", value=b"1"))
    source.put(pb.PutRequest(key=b"b", value=b"1"))
    frozen = source.frozen_copy(str(tmp_path / "checkpoint"))
    try:
        before = {table: list(frozen.scan(table, b"", None)) for table in ("kv", "hist", "rev", "meta")}
        source.put(pb.PutRequest(key=b"a", value=b"2"))
        source.put(pb.PutRequest(key=b"c", value=b"1"))
        source.delete_range(pb.DeleteRangeRequest(key=b"b"))
        after = {table: list(frozen.scan(table, b"", None)) for table in ("kv", "hist", "rev", "meta")}
        assert after == before
        assert frozen.get("kv", b"c") is None and frozen.get("kv", b"b") is not None
    finally:
        frozen.close()
