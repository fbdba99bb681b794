"""The memory engine applies a big batch table by table in bulk; the result
must be exactly what applying the same ops one at a time gives, including
for a snapshot taken before the batch."""
from __future__ import annotations

import random

import pytest

from metastore.backend import WriteBatch
from metastore.engines.memory import backend as memory_backend
from metastore.engines.memory.backend import MemoryBackend


def _ops(rng: random.Random, n: int) -> list[tuple[str, bytes, bytes | None]]:
    keys = [b"k%03d" % i for i in range(300)]  # few keys: many repeats within a batch
    return [(rng.choice(("kv", "hist", "rev")), rng.choice(keys),
             None if rng.random() < 0.4 else b"v%d" % rng.randrange(10**6)) for _ in range(n)]


def _batch(ops: list[tuple[str, bytes, bytes | None]]) -> WriteBatch:
    batch = WriteBatch()
    for table, key, value in ops:
        if value is None:
            batch.delete(table, key)
        else:
            batch.put(table, key, value)
    return batch


def _rows(source, tables=("kv", "hist", "rev")) -> dict[str, list[tuple[bytes, bytes]]]:
    return {t: list(source.scan(t, b"", None)) for t in tables}


@pytest.mark.parametrize("seed", range(8))
def test_a_bulk_batch_equals_the_same_ops_one_by_one(seed: int) -> None:
    rng = random.Random(seed)
    setup = _ops(rng, 2000)
    ops = _ops(rng, memory_backend._BULK_OPS * 3)
    bulk, single = MemoryBackend(), MemoryBackend()
    for backend in (bulk, single):
        for start in range(0, len(setup), 100):
            backend.write(_batch(setup[start:start + 100]))
    before = _rows(bulk)
    frozen = bulk.frozen_rows()
    bulk.write(_batch(ops))
    for op in ops:
        single.write(_batch([op]))
    assert _rows(bulk) == _rows(single)
    assert bulk.size() == single.size()
    assert _rows(frozen) == before  # a snapshot taken before the batch does not see it
    frozen.close()


def test_a_bulk_batch_with_a_bad_table_changes_nothing() -> None:
    backend = MemoryBackend()
    backend.write(_batch([("kv", b"a", b"1")]))
    ops = [("kv", b"k%05d" % i, b"v") for i in range(memory_backend._BULK_OPS)] + [("nosuch", b"x", b"y")]
    with pytest.raises(KeyError):
        backend.write(_batch(ops))
    assert _rows(backend, ("kv",)) == {"kv": [(b"a", b"1")]}
