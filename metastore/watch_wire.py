"""WatchResponse bytes put together from parts encoded once per revision.

A put to a key that 1,000 clients watch is one event, sent 1,000 times. Built
as a protobuf message per watcher, each copy costs ~10 us (the event copied
in, its prev_kv cleared, the header filled, the size taken, the whole
serialized); the parts that differ between those copies are only the watch
ID and, between members, the header. So a gRPC Watch stream is sent bytes
joined from parts: the header field once per revision, the events field once
per distinct event list (and prev_kv choice), and a few bytes of watch ID per
watcher (~1 us).

The result parses to the same WatchResponse that `Watcher.response` plus a
filled header would serialize to: fields in field-number order, zero values
left out (tests/test_watch_wire.py compares the two).
"""
from __future__ import annotations

from typing import Sequence

from metastore.api.pb import kv_pb2, rpc_pb2

# Field tags of WatchResponse (wire type 2: length-delimited; 0: varint).
_HEADER_TAG = b"\x0a"    # 1: header
_WATCH_ID_TAG = b"\x10"  # 2: watch_id (int64)
_EVENT_TAG = b"\x5a"     # 11: events (repeated Event)
_U64_MASK = (1 << 64) - 1


def varint(n: int) -> bytes:
    """Protobuf base-128 varint; a negative int64 as its 64-bit two's complement."""
    n &= _U64_MASK
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def header_field(header: rpc_pb2.ResponseHeader) -> bytes:
    body = header.SerializeToString()
    return _HEADER_TAG + varint(len(body)) + body


def events_field(events: Sequence[kv_pb2.Event], with_prev_kv: bool) -> bytes:
    """The repeated events field; prev_kv left out unless asked for (the
    store's events carry it whenever there was a previous version)."""
    parts = []
    for ev in events:
        if not with_prev_kv and ev.HasField("prev_kv"):
            bare = kv_pb2.Event()
            bare.CopyFrom(ev)
            bare.ClearField("prev_kv")
            body = bare.SerializeToString()
        else:
            body = ev.SerializeToString()
        parts.append(_EVENT_TAG + varint(len(body)) + body)
    return b"".join(parts)


def event_response(header: bytes, watch_id: int, events: bytes) -> bytes:
    """A serialized WatchResponse from a header_field, a watch ID and an events_field."""
    if watch_id == 0:
        return header + events
    return b"".join((header, _WATCH_ID_TAG, varint(watch_id), events))
