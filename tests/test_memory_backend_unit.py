"""The memory engine applies a big batch table by table in bulk; the result
must be exactly what applying the same ops one at a time gives, including
for a snapshot taken before the batch."""
from __future__ import annotations

import random

import pytest

from metastore.backend import RangeEnd, WriteBatch
from metastore.engines.memory import backend as memory_backend
from metastore.engines.memory.backend import MemoryBackend


def _ops(rng: random.Random, n: int, ranges: bool = False) -> list[tuple[str, bytes, bytes | None]]:
    """Random puts and deletes of few keys (many repeats within a batch);
    with `ranges`, one op in 50 deletes a range (a RangeEnd value)."""
    keys = [b"k%03d" % i for i in range(300)]
    ops: list[tuple[str, bytes, bytes | None]] = []
    for _ in range(n):
        table, key = rng.choice(("kv", "hist", "rev")), rng.choice(keys)
        if ranges and rng.random() < 0.02:
            ops.append((table, key, RangeEnd(key[:-1] + b"%d" % rng.randrange(10))))
        else:
            ops.append((table, key, None if rng.random() < 0.4 else b"v%d" % rng.randrange(10**6)))
    return ops


def _batch(ops: list[tuple[str, bytes, bytes | None]]) -> WriteBatch:
    batch = WriteBatch()
    for table, key, value in ops:
        if value is None:
            batch.delete(table, key)
        elif isinstance(value, RangeEnd):
            batch.delete_range(table, key, value)
        else:
            batch.put(table, key, value)
    return batch


def _one_by_one(backend: MemoryBackend, ops: list[tuple[str, bytes, bytes | None]]) -> None:
    """The model: every op alone, a range as a delete of each key it holds."""
    for table, key, value in ops:
        if isinstance(value, RangeEnd):
            for k, _ in list(backend.scan(table, key, value)):
                backend.write(_batch([(table, k, None)]))
        else:
            backend.write(_batch([(table, key, value)]))


def _rows(source, tables=("kv", "hist", "rev")) -> dict[str, list[tuple[bytes, bytes]]]:
    return {t: list(source.scan(t, b"", None)) for t in tables}


@pytest.mark.parametrize("ranges", [False, True], ids=["keys", "with-ranges"])
@pytest.mark.parametrize("batch_size", [memory_backend._BULK_OPS * 3, 40], ids=["bulk", "small"])
@pytest.mark.parametrize("seed", range(8))
def test_a_batch_equals_the_same_ops_one_by_one(seed: int, batch_size: int, ranges: bool) -> None:
    rng = random.Random(seed)
    setup = _ops(rng, 2000)
    ops = _ops(rng, memory_backend._BULK_OPS * 3, ranges)
    bulk, single = MemoryBackend(), MemoryBackend()
    for backend in (bulk, single):
        for start in range(0, len(setup), 100):
            backend.write(_batch(setup[start:start + 100]))
    before = _rows(bulk)
    frozen = bulk.frozen_rows()
    for start in range(0, len(ops), batch_size):
        batch = _batch(ops[start:start + batch_size])
        # Rows put ahead (applied before the batch's ops), some over existing keys.
        ahead = [(rng.choice(("rev", "hist")), b"k%03d" % rng.randrange(400), b"a%d" % start)
                 for _ in range(batch_size // 4)]
        for table, key, value in ahead:
            batch.put_ahead(table, key, value)
        bulk.write(batch)
        _one_by_one(single, ahead + ops[start:start + batch_size])
    assert _rows(bulk) == _rows(single)
    assert bulk.size() == single.size()
    assert _rows(frozen) == before  # a snapshot taken before the batch does not see it
    for table, rows in before.items():
        was = dict(rows)
        for key in {k for _t, k, _v in setup + ops} | {b"k%03d" % i for i in range(400)}:
            assert frozen.get(table, key) == was.get(key), (table, key)
    frozen.close()


def test_a_bulk_batch_with_a_bad_table_changes_nothing() -> None:
    backend = MemoryBackend()
    backend.write(_batch([("kv", b"a", b"1")]))
    ops = [("kv", b"k%05d" % i, b"v") for i in range(memory_backend._BULK_OPS)] + [("nosuch", b"x", b"y")]
    with pytest.raises(KeyError):
        backend.write(_batch(ops))
    assert _rows(backend, ("kv",)) == {"kv": [(b"a", b"1")]}
