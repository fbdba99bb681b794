"""Peer messages without deflate, except big ones.

pysyncobj deflates every peer message (zlib level 3) before it goes on the
wire and inflates it on arrival. Between members on one host or a LAN the
bytes saved are not worth the CPU: with 300 clients putting 256-byte
values, deflating append_entries and forwarded proposals cost a fifth of
the cluster's write throughput on a 2-core machine (memory engine, 3
members: 2,350-2,460 writes/s with it, 2,870-2,920 without). etcd does not
compress its Raft messages either.

Big messages (a follower catching up, up to max_message_bytes) are still
deflated, at the fastest level: pysyncobj grows its receive buffer by
concatenation, so the bytes it copies grow with the square of a message's
size, and shrinking those is worth the deflate.

Level 0 still writes a zlib stream (stored blocks), so a member that
deflates reads these messages and this one reads its messages: members of
both kinds can run side by side during a rolling upgrade.
"""
from __future__ import annotations

import zlib

from pysyncobj import tcp_connection

# Messages at least this big are deflated (level 1).
DEFLATE_FROM = 1 << 20


class _StoredBlocks:
    """Stands in for the zlib module where pysyncobj frames peer messages."""

    @staticmethod
    def compress(data: bytes, level: int = -1) -> bytes:
        return zlib.compress(data, 0 if len(data) < DEFLATE_FROM else 1)

    decompress = staticmethod(zlib.decompress)


def deflate_only_big_messages() -> None:
    """From now on this process's pysyncobj connections send small messages
    as stored blocks (idempotent; pysyncobj looks zlib up in its module at
    each send)."""
    tcp_connection.zlib = _StoredBlocks
