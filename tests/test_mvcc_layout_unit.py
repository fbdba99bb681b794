"""The `hist` key escape: the same bytes whichever path computes them (a
key padded with NULs takes a shortcut), and user-key order preserved."""
from __future__ import annotations

import random

from metastore.mvcc_layout import escape, hist_key, split_hist_key


def _keys() -> list[bytes]:
    rng = random.Random(7)
    keys = [b"", b"\x00", b"\x00" * 300, b"a", b"a\x00", b"a\x00\x00", b"\x00a", b"\x00a\x00", b"a\xff", b"\xff\x00"]
    for _ in range(2000):
        body = bytes(rng.choice((0, 0, 1, 0xFF, 0x61)) for _ in range(rng.randrange(8)))
        keys.append(body + b"\x00" * rng.choice((0, 0, 1, 2, 250)))
    return keys


def test_escape_is_the_byte_replacement_of_every_nul() -> None:
    for key in _keys():
        assert escape(key) == key.replace(b"\x00", b"\x00\xff"), key


def test_escape_keeps_key_order_and_round_trips() -> None:
    keys = sorted(set(_keys()))
    assert sorted(keys, key=escape) == keys
    for key in keys:
        assert split_hist_key(hist_key(key, 7, 3)) == (key, 7, 3)
