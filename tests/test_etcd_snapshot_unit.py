"""The bbolt reader and writer, and a store's rows in etcd's schema and back.

What etcd itself makes of these files is tested with the real etcd and
etcdctl in tests/test_etcd_snapshots.py; here the format's corners (overflow
pages, several branch levels, damaged files) and the exactness of the
conversion, on both engines."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from metastore import bbolt, etcd_snapshot
from metastore.api.pb import rpc_pb2 as pb
from metastore.mvcc import MVCCStore
from metastore.mvcc_layout import META_APPLIED
from store_engines import FACTORIES
from store_fixtures import engine, make_store, store  # noqa: F401  (fixtures)


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


def test_a_store_survives_the_round_trip_through_etcds_schema(make_store, tmp_path: Path) -> None:  # noqa: F811
    source, _ = make_store()
    _fill(source)
    path = str(tmp_path / "snap.db")
    view = etcd_snapshot.RowsView(source.export_items())
    bbolt.write(path, etcd_snapshot.buckets(view, {"member_id": "1"}))
    with bbolt.Reader(path) as db:
        assert etcd_snapshot.header_of(db.items) == {"member_id": "1"}
        assert etcd_snapshot.revision_of(db.items) == source.revision
        target, _ = make_store()
        target.import_items(etcd_snapshot.rows(db.items))
    assert _rows(target) == _rows(source)


def test_etcds_schema_alone_gives_the_same_keys_history_and_leases(make_store, tmp_path: Path) -> None:  # noqa: F811
    """Without metastore's own bucket (a snapshot etcd took), the keys,
    their history, leases and compaction marks still come back whole."""
    source, _ = make_store()
    _fill(source)
    path = str(tmp_path / "snap.db")
    view = etcd_snapshot.RowsView(source.export_items())
    bbolt.write(path, [(name, items) for name, items in etcd_snapshot.buckets(view, {})
                       if name != etcd_snapshot.METASTORE])
    with bbolt.Reader(path) as db:
        assert etcd_snapshot.header_of(db.items) is None
        assert etcd_snapshot.revision_of(db.items) == source.revision
        target, _ = make_store()
        target.import_items(etcd_snapshot.rows(db.items))
    assert target.revision == source.revision
    assert target.compact_revision == source.compact_revision
    for rev in (0, 30, 35, source.revision - 1):  # 0: the current revision
        at = pb.RangeRequest(key=b"\0", range_end=b"\0", revision=rev)
        assert target.range(at) == source.range(at)
    assert target.leases() == source.leases()
    assert target.lease_keys(77) == source.lease_keys(77) == [b"leased"]
    # This store has no liveness, drain or alarm rows (which only metastore's
    # bucket carries), so every row comes back, made from etcd's buckets.
    assert _rows(target) == _rows(source)


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
