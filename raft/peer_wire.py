"""Peer messages without deflate, except big ones; pickles with bytes in them.

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

The small ones still travel as a zlib stream, of stored (uncompressed)
blocks, so a member that deflates reads these messages and this one reads
its messages: members of both kinds can run side by side during a rolling
upgrade. That stream is framed here rather than by `zlib.compress(data, 0)`,
which sets up a whole deflate state (~300 KB) per call: ~57 us per message
whatever its size, against ~1 us for the framing, and a member sends and
receives thousands of messages a second under load.
"""
from __future__ import annotations

import struct
import zlib

from pysyncobj import pickle as pysyncobj_pickle
from pysyncobj import tcp_connection

# What pysyncobj pickles its commands and peer messages with once
# pickle_bytes_as_bytes() ran (it defaults to 2).
PICKLE_PROTOCOL = 5

# Messages at least this big are deflated (level 1).
DEFLATE_FROM = 1 << 20

# RFC 1950 header: deflate with a 32 KiB window, "fastest" level, no preset
# dictionary (0x7801 is a multiple of 31, as the header check requires).
_ZLIB_HEADER = b"\x78\x01"
# RFC 1951 stored block: BFINAL/BTYPE=00 in one byte, then LEN and its
# ones' complement NLEN, then LEN bytes as they are.
_STORED_BLOCK = struct.Struct("<BHH")
_MAX_STORED = 0xFFFF
_ADLER32 = struct.Struct(">I")


def stored_zlib_stream(data: bytes) -> bytes:
    """`data` as a zlib stream of stored blocks, built without a deflate
    state: any zlib reader inflates it to `data` (for a message under
    64 KiB these are the very bytes zlib.compress(data, 0) returns; above,
    zlib cuts its blocks elsewhere)."""
    parts = [_ZLIB_HEADER]
    view = memoryview(data)
    size = len(data)
    offset = 0
    while True:
        chunk = view[offset:offset + _MAX_STORED]
        offset += len(chunk)
        final = offset >= size
        parts.append(_STORED_BLOCK.pack(1 if final else 0, len(chunk), len(chunk) ^ 0xFFFF))
        parts.append(chunk)
        if final:
            break
    parts.append(_ADLER32.pack(zlib.adler32(data)))
    return b"".join(parts)


class _StoredBlocks:
    """Stands in for the zlib module where pysyncobj frames peer messages."""

    @staticmethod
    def compress(data: bytes, level: int = -1) -> bytes:
        return stored_zlib_stream(data) if len(data) < DEFLATE_FROM else zlib.compress(data, 1)

    decompress = staticmethod(zlib.decompress)


def deflate_only_big_messages() -> None:
    """From now on this process's pysyncobj connections send small messages
    as stored blocks (idempotent; pysyncobj looks zlib up in its module at
    each send)."""
    tcp_connection.zlib = _StoredBlocks


def pickle_bytes_as_bytes() -> None:
    """From now on pysyncobj pickles with PICKLE_PROTOCOL (idempotent).

    pysyncobj pickles each command (our entry, as bytes) and then each peer
    message that carries it with protocol 2, which has no opcode for bytes:
    every bytes object goes through a latin-1 str and back, ~13 us for a
    16 KB entry where protocol 5 copies it in under 1 us, and random bytes
    come out up to twice their size, in the log and on the wire. pickle
    reads any protocol it knows, so a member that still writes protocol 2
    and this one read each other's messages and logs (protocol 5 needs
    Python 3.8, below what metastore runs on)."""
    setattr(pysyncobj_pickle, "__protocol", PICKLE_PROTOCOL)
