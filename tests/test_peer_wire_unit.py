"""raft.peer_wire: peer messages go out as stored zlib blocks (big ones
deflated), and members of either kind read each other's messages."""
from __future__ import annotations

import pickle
import zlib

from pysyncobj import tcp_connection

import pytest

from metastore.raft.peer_wire import DEFLATE_FROM, deflate_only_big_messages, stored_zlib_stream

MESSAGE = {"type": "append_entries", "entries": [(b"value %d " % i * 30, i, 3) for i in range(200)]}


def test_messages_are_framed_without_deflating() -> None:
    deflate_only_big_messages()
    body = pickle.dumps(MESSAGE)
    framed = tcp_connection.zlib.compress(body, 3)  # what TcpConnection.send calls
    # Stored blocks: never smaller than the pickle, though deflate would shrink this one 5-fold.
    assert len(zlib.compress(body, 3)) < len(body) // 5
    assert len(framed) > len(body)
    assert pickle.loads(zlib.decompress(framed)) == MESSAGE  # a member that still deflates reads it


def test_a_deflated_message_from_an_older_member_is_read() -> None:
    deflate_only_big_messages()
    deflated = zlib.compress(pickle.dumps(MESSAGE), 3)
    assert pickle.loads(tcp_connection.zlib.decompress(deflated)) == MESSAGE


def test_big_messages_are_still_deflated() -> None:
    deflate_only_big_messages()
    body = pickle.dumps({"type": "append_entries", "entries": [(b"value %d " % i * 30, i, 3)
                                                               for i in range(DEFLATE_FROM // 200)]})
    assert len(body) >= DEFLATE_FROM
    framed = tcp_connection.zlib.compress(body, 3)
    assert len(framed) < len(body) // 3
    assert zlib.decompress(framed) == body


@pytest.mark.parametrize("size", [0, 1, 1200, 65534, 65535, 65536, 3 * 65535, 3 * 65535 + 7, DEFLATE_FROM - 1])
def test_stored_stream_is_a_zlib_stream_of_the_bytes(size: int) -> None:
    data = bytes(i * 7 % 251 for i in range(size))
    stream = stored_zlib_stream(data)
    assert zlib.decompress(stream) == data
    reader = zlib.decompressobj()
    assert reader.decompress(stream) == data and reader.eof and not reader.unused_data
    # Stored blocks: five bytes of framing per 64 KiB block, plus zlib's six.
    assert len(stream) == len(data) + 6 + 5 * max(1, -(-size // 65535))


def test_stored_stream_matches_zlib_level_0_for_a_small_message() -> None:
    body = pickle.dumps(MESSAGE)
    assert stored_zlib_stream(body) == zlib.compress(body, 0)


def test_commands_pickle_bytes_as_bytes(monkeypatch) -> None:
    from pysyncobj import pickle as pysyncobj_pickle

    from metastore.raft.peer_wire import pickle_bytes_as_bytes

    monkeypatch.setattr(pysyncobj_pickle, "__protocol", 2)  # pysyncobj's own, restored afterwards
    entry = bytes(range(256)) * 64  # half of it above 0x7f: two UTF-8 bytes each through a latin-1 str
    command = (7, (entry,))  # what pysyncobj's @replicated pickles
    pickle_bytes_as_bytes()
    assert len(pickle.dumps(command, 2)) > len(entry) * 3 // 2
    packed = pysyncobj_pickle.dumps(command)
    assert len(packed) < len(entry) + 64
    assert pysyncobj_pickle.loads(packed) == command
    # A member that still pickles with protocol 2 is read, and reads this one.
    assert pysyncobj_pickle.loads(pickle.dumps(command, 2)) == command
    assert pickle.loads(packed) == command
