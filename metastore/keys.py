"""Key-space arithmetic shared by the server, the client and the CLI."""
from __future__ import annotations


def prefix_range_end(prefix: bytes) -> bytes:
    """etcd's range end for "every key starting with prefix": the prefix with
    its last byte below 0xff incremented (trailing 0xff bytes dropped); the
    empty prefix, or one of only 0xff bytes, gives "\\0", every key."""
    end = bytearray(prefix)
    while end and end[-1] == 0xFF:
        end.pop()
    if not end:
        return b"\0"
    end[-1] += 1
    return bytes(end)
