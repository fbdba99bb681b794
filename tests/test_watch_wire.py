"""WatchResponse bytes joined from parts (metastore.watch_wire) against the
message a watcher's response builds: the same bytes for every kind of event,
watch ID and header, and the hub's encoded streams send what its message
streams send."""
from __future__ import annotations

import asyncio

import pytest

from metastore import watch_wire
from metastore.api.pb import kv_pb2, rpc_pb2
from metastore.engines.memory import open_store
from metastore.mvcc_range import key_range
from metastore.watch_hub import Watcher, WatchHub

PUT, DELETE = kv_pb2.Event.PUT, kv_pb2.Event.DELETE


def _kv(key: bytes, value: bytes, mod: int, version: int, lease: int = 0) -> kv_pb2.KeyValue:
    return kv_pb2.KeyValue(key=key, value=value, create_revision=2, mod_revision=mod,
                           version=version, lease=lease)


EVENTS = {
    "created": [kv_pb2.Event(type=PUT, kv=_kv(b"k", b"v1", 2, 1))],
    "overwritten": [kv_pb2.Event(type=PUT, kv=_kv(b"k", b"v2" * 200, 9, 2, lease=7),
                                 prev_kv=_kv(b"k", b"v1", 2, 1))],
    "deleted": [kv_pb2.Event(type=DELETE, kv=kv_pb2.KeyValue(key=b"k", mod_revision=9),
                             prev_kv=_kv(b"k", b"", 2, 1))],
    "txn": [kv_pb2.Event(type=PUT, kv=_kv(b"a\x00b", b"", 9, 1)),
            kv_pb2.Event(type=DELETE, kv=kv_pb2.KeyValue(key=b"b", mod_revision=9),
                         prev_kv=_kv(b"b", b"\x00" * 300, 3, 4)),
            kv_pb2.Event(type=PUT, kv=_kv(b"c" * 1000, b"x", 9, 1), prev_kv=_kv(b"c" * 1000, b"y", 5, 1))],
}
HEADERS = [rpc_pb2.ResponseHeader(revision=9),
           rpc_pb2.ResponseHeader(cluster_id=2**64 - 1, member_id=2**63 + 5, revision=2**40, raft_term=3),
           rpc_pb2.ResponseHeader()]


def _as_message(header: rpc_pb2.ResponseHeader, watch_id: int, events: list[kv_pb2.Event],
                prev_kv: bool) -> bytes:
    """What the message path sends: Watcher.response plus the filled header."""
    stream = type("S", (), {})()
    w = Watcher(stream, watch_id, b"k", b"", key_range(b"k", b""), 0,  # type: ignore[arg-type]
                rpc_pb2.WatchCreateRequest(key=b"k", prev_kv=prev_kv))
    resp = w.response(events)
    resp.header.CopyFrom(header)
    return resp.SerializeToString()


@pytest.mark.parametrize("name", sorted(EVENTS))
@pytest.mark.parametrize("watch_id", [0, 1, 127, 128, 2**31, 2**63 - 1, -1, -(2**63)])
@pytest.mark.parametrize("prev_kv", [False, True])
@pytest.mark.parametrize("header", range(len(HEADERS)))
def test_joined_bytes_equal_the_serialized_message(name, watch_id, prev_kv, header):
    events = EVENTS[name]
    joined = watch_wire.event_response(watch_wire.header_field(HEADERS[header]), watch_id,
                                       watch_wire.events_field(events, prev_kv))
    assert joined == _as_message(HEADERS[header], watch_id, events, prev_kv)
    back = rpc_pb2.WatchResponse.FromString(joined)
    assert back.watch_id == watch_id and len(back.events) == len(events)
    assert all(ev.HasField("prev_kv") == (prev_kv and orig.HasField("prev_kv"))
               for ev, orig in zip(back.events, events))


def test_varint_matches_protobuf_for_int64_and_uint64():
    for n in [1, 127, 128, 300, 2**32, 2**63 - 1, -1, -2, -(2**63)]:
        assert watch_wire.varint(n) == rpc_pb2.WatchResponse(watch_id=n).SerializeToString()[1:]


def test_the_stores_events_are_not_changed_by_encoding():
    events = EVENTS["txn"]
    before = [ev.SerializeToString() for ev in events]
    watch_wire.events_field(events, with_prev_kv=False)
    assert [ev.SerializeToString() for ev in events] == before


def test_encoded_stream_sends_what_a_message_stream_sends():
    """Many watchers of one key and of a prefix, with and without prev_kv and
    filters, on an encoded and on a message stream: every response the two
    streams queue parses to the same message."""
    async def main() -> None:
        store = open_store()
        hub = WatchHub(store)
        hub.start(asyncio.get_running_loop())
        fill = _fill_header_with_ids
        streams = [hub.open_stream(fill_header=fill), hub.open_stream(fill_header=fill, encoded=True)]
        creates = [rpc_pb2.WatchCreateRequest(key=b"k"),
                   rpc_pb2.WatchCreateRequest(key=b"k", prev_kv=True),
                   rpc_pb2.WatchCreateRequest(key=b"k", filters=[rpc_pb2.WatchCreateRequest.NODELETE]),
                   rpc_pb2.WatchCreateRequest(key=b"a", range_end=b"z"),
                   rpc_pb2.WatchCreateRequest(key=b"a", range_end=b"z", prev_kv=True),
                   rpc_pb2.WatchCreateRequest(key=b"a", range_end=b"z",
                                              filters=[rpc_pb2.WatchCreateRequest.NOPUT])]
        for s in streams:
            for i, c in enumerate(creates * 3):
                c2 = rpc_pb2.WatchCreateRequest()
                c2.CopyFrom(c)
                c2.watch_id = i * 1000 + 1
                s.create(c2)
        loop = asyncio.get_running_loop()

        def write() -> None:
            for i in range(5):
                store.set_apply_position(i * 2 + 1, 0)
                store.put(rpc_pb2.PutRequest(key=b"k", value=b"v%d" % i))
                store.set_apply_position(i * 2 + 2, 0)
                store.put(rpc_pb2.PutRequest(key=b"m", value=b"w%d" % i))
            store.set_apply_position(100, 0)
            store.delete_range(rpc_pb2.DeleteRangeRequest(key=b"a", range_end=b"z"))

        await loop.run_in_executor(None, write)
        deadline = loop.time() + 10
        while hub.last_revision < store.revision:  # dispatch runs on this loop
            assert loop.time() < deadline, "the hub never dispatched the writes"
            await asyncio.sleep(0.01)
        got: list[list[rpc_pb2.WatchResponse]] = [[], []]
        raw_types: list[set[type]] = [set(), set()]
        for out, types, s in zip(got, raw_types, streams):
            while s.queued:
                resp = await s.next_response()
                types.add(type(resp))
                out.append(rpc_pb2.WatchResponse.FromString(resp) if type(resp) is bytes else resp)
        assert raw_types == [{rpc_pb2.WatchResponse}, {rpc_pb2.WatchResponse, bytes}]
        assert sum(len(r.events) for r in got[0]) == 3 * (6 + 6 + 5 + 12 + 12 + 2)
        per_watch = [{}, {}]  # the order across watchers is a set's: compare each watcher's
        for out, by_id in zip(got, per_watch):
            for r in out:
                by_id.setdefault(r.watch_id, []).append(r)
        assert per_watch[0] == per_watch[1] and len(per_watch[0]) == 18
        assert any(ev.HasField("prev_kv") for r in got[1] for ev in r.events)
        assert all(r.header.member_id == 77 for r in got[1])
        hub.stop()
        store.close()

    asyncio.run(main())


def _fill_header_with_ids(header: rpc_pb2.ResponseHeader, revision: int) -> None:
    header.cluster_id = 2**64 - 3
    header.member_id = 77
    header.revision = revision
    header.raft_term = 4
