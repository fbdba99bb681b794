"""How leases are laid out in the `lease` table, next to the MVCC tables.

A lease is replicated state like a key: granting, revoking and attaching a
key to it are applied from the Raft log, in the same backend write as the
key changes they go with, on every member and both engines. When it expires
is not stored: that is decided by the leader's clock (metastore.lessor).

``lease`` ``L`` + id  -> granted TTL (seconds)
          ``K`` + id + user key -> b"" (the key is attached to the lease), so a
          revoke finds the keys it deletes without scanning the keyspace.
"""
from __future__ import annotations

import struct
from typing import Iterator

from metastore.backend import Backend

_ID = struct.Struct(">q")
_TTL = struct.Struct(">q")
_LEASE = b"L"
_ATTACH = b"K"


def lease_key(lease: int) -> bytes:
    return _LEASE + _ID.pack(lease)


def pack_ttl(ttl: int) -> bytes:
    return _TTL.pack(ttl)


def attach_key(lease: int, key: bytes) -> bytes:
    return _ATTACH + _ID.pack(lease) + key


def attach_prefix(lease: int) -> bytes:
    return _ATTACH + _ID.pack(lease)


def load_leases(backend: Backend) -> dict[int, int]:
    """Every granted lease: id -> TTL."""
    out: dict[int, int] = {}
    for k, v in backend.scan("lease", _LEASE, b"M"):  # every L row
        out[_ID.unpack_from(k, 1)[0]] = _TTL.unpack(v)[0]
    return out


def attached_keys(backend: Backend, lease: int) -> Iterator[bytes]:
    prefix = attach_prefix(lease)
    for k, _ in backend.scan("lease", prefix, None):
        if not k.startswith(prefix):
            return
        yield k[len(prefix):]
