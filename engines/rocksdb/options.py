"""RocksDB tuning for the metastore backend, in one place.

The defaults are chosen for a small, write-heavy metadata store on a modest
machine: bounded memory (a shared block cache and a cap on all memtables
together, since there are several column families), bounded WAL, and atomic
flushes so the SST files of all tables always describe the same instant.
"""
from __future__ import annotations

import os

from rocksdict import BlockBasedOptions, Cache, DBCompressionType, Options

# All memtables of all column families together: past this RocksDB flushes
# (every family at once, with atomic flush). This, not the key count, is what
# bounds the engine's memory as the data grows.
MEMTABLE_BUDGET = 64 << 20
# WAL files are kept until every column family flushed what they hold.
MAX_TOTAL_WAL = 256 << 20
BLOCK_CACHE = 64 << 20


def open_options(tables: list[str]) -> tuple[Options, dict[str, Options]]:
    """(database options, {column family: options}) for opening `tables`;
    every table shares one block cache so memory stays bounded."""
    cache = Cache(BLOCK_CACHE)
    return db_options(cache), {name: column_family_options(cache) for name in tables}


def db_options(cache: Cache) -> Options:
    """Options of the database (and of its `default` column family, unused)."""
    opts = column_family_options(cache)
    opts.create_if_missing(True)
    opts.create_missing_column_families(True)
    # Flush every column family together: a flush never persists `kv` at one
    # revision and `meta` at another, even were the WAL ever turned off.
    opts.set_atomic_flush(True)
    opts.set_db_write_buffer_size(MEMTABLE_BUDGET)
    opts.set_max_total_wal_size(MAX_TOTAL_WAL)
    opts.increase_parallelism(max(2, os.cpu_count() or 2))
    opts.set_keep_log_file_num(5)  # RocksDB's info LOG files, not the WAL
    return opts


def column_family_options(cache: Cache) -> Options:
    """Options of one table. Raw mode: keys and values are bytes, no pickling."""
    opts = Options(raw_mode=True)
    table = BlockBasedOptions()
    table.set_block_cache(cache)
    # Point lookups (`kv` reads of the current record, existence checks of new
    # keys) dominate; a bloom filter spares an SST read for most misses.
    table.set_bloom_filter(10, False)
    opts.set_block_based_table_factory(table)
    opts.set_compression_type(DBCompressionType.lz4())
    opts.set_level_compaction_dynamic_level_bytes(True)
    return opts
