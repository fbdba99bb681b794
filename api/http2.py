"""HTTP/2 for the client port (RFC 9113), server side, as much as gRPC needs.

Why not grpcio's server: measured on this project's 2-core machine, grpc.aio
spends ~220-270 us of CPU per unary call before any handler runs (its C core,
the Cython layer, a completion-queue thread handing each operation to the
event loop). The framing gRPC needs is small: a request is a HEADERS frame
and a DATA frame, a response is HEADERS, DATA and trailing HEADERS, and those
can be parsed and built on the event loop directly, in one read and one write
per batch of calls. HPACK, the part that is easy to get subtly wrong, is the
`hpack` package's.

What this module owns: frames, SETTINGS, PING, GOAWAY, flow control in both
directions, stream states. What a stream carries is the `StreamHandler`'s
business (api/grpc_server.py): it is told of each new stream's headers, its
data and its end, and answers through `Stream.send_*`.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import struct
from typing import Callable, Protocol

import hpack
import hpack.table

log = logging.getLogger("metastore.api.http2")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types (RFC 9113 section 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
# Flags.
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
# Error codes (section 7).
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL = 0x5, 0x6, 0x7, 0x8
COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x9, 0xB
# Settings identifiers.
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6

DEFAULT_WINDOW = 65535
MAX_WINDOW = 2**31 - 1
# What this server lets a client send before it must wait for a
# WINDOW_UPDATE: a stream's window covers the largest request etcd accepts
# (1.5 MiB by default) in one go; the connection's, many such streams.
STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW = 32 * 1024 * 1024
MAX_CONCURRENT_STREAMS = 10_000
MAX_HEADER_LIST_BYTES = 64 * 1024
MAX_FRAME = 16384  # the frames this server accepts (the protocol's default)

_FRAME_HEADER = struct.Struct(">HBBBI")  # 24-bit length as H + B, type, flags, stream id
_pack_header = _FRAME_HEADER.pack
_unpack_header = _FRAME_HEADER.unpack_from
_U32 = struct.Struct(">I")
_SETTING = struct.Struct(">HI")


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _pack_header(n >> 8, n & 0xFF, ftype, flags, stream_id) + payload


def frame_header(length: int, ftype: int, flags: int, stream_id: int) -> bytes:
    return _pack_header(length >> 8, length & 0xFF, ftype, flags, stream_id)


def header_frames(block: bytes, stream_id: int, end_stream: bool, max_frame: int) -> bytes:
    """A header block as HEADERS, and CONTINUATION frames if it is longer
    than the client takes in one frame."""
    flags = END_STREAM if end_stream else 0
    if len(block) <= max_frame:
        return frame_header(len(block), HEADERS, flags | END_HEADERS, stream_id) + block
    parts = [block[i:i + max_frame] for i in range(0, len(block), max_frame)]
    out = [frame(HEADERS, flags, stream_id, parts[0])]
    out += [frame(CONTINUATION, 0, stream_id, part) for part in parts[1:-1]]
    out.append(frame(CONTINUATION, END_HEADERS, stream_id, parts[-1]))
    return b"".join(out)


# SETTINGS, then room for many streams' requests on the connection.
_SERVER_PREFACE = frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(k, v) for k, v in (
    (S_MAX_CONCURRENT_STREAMS, MAX_CONCURRENT_STREAMS),
    (S_INITIAL_WINDOW_SIZE, STREAM_WINDOW),
    (S_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST_BYTES),
    (S_ENABLE_PUSH, 0)))) + frame(WINDOW_UPDATE, 0, 0, _U32.pack(CONNECTION_WINDOW - DEFAULT_WINDOW))


# How long a PING ack may wait for a write to go out with (Connection.write_lazily).
LAZY_WRITE = 0.002

# Header blocks a CachingDecoder keeps decoded.
_DECODED_BLOCKS = 64


class _VersionedTable(hpack.table.HeaderTable):
    """hpack's dynamic table, counting its changes: an entry added (and so
    maybe others evicted) or its size changed. A decoded header block stays
    valid for as long as the count does not move."""

    version = 0

    def add(self, name: bytes, value: bytes):  # type: ignore[no-untyped-def]
        self.version += 1
        return super().add(name, value)

    @hpack.table.HeaderTable.maxsize.setter  # type: ignore[attr-defined]
    def maxsize(self, newmax: int) -> None:
        self.version += 1
        hpack.table.HeaderTable.maxsize.fset(self, newmax)  # type: ignore[attr-defined]


def hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """HPACK's integer with an N-bit prefix (RFC 7541 section 5.1); `first`
    holds the bits above the prefix."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal_field(name: int | bytes, value: bytes) -> bytes:
    """A literal header field without indexing (RFC 7541 section 6.2.2), its
    name by static table index or spelled out, its value not Huffman-coded.
    The decoder keeps no state for it: a block of these is the same bytes
    whenever it is sent, so it can be built once and reused."""
    head = hpack_int(name, 4) if isinstance(name, int) else b"\x00" + hpack_int(len(name), 7) + name
    return head + hpack_int(len(value), 7) + value


class CachingDecoder:
    """An HPACK decoder that keeps the header blocks it decoded. A peer sends
    the same few header blocks again and again (grpc-go: the same method and
    metadata, or the same response headers and trailers, all of it indexed in
    the dynamic table), and decoding one costs ~20 us here: a block that left
    the table as it was is kept, by table version, and returned again while
    the table is unchanged -- decoding it again would give the same list. The
    list is shared: callers only read it. hpack's own errors propagate (the
    dynamic table is then unusable: the caller ends the connection)."""

    def __init__(self, max_header_list_size: int) -> None:
        self._decoder = hpack.Decoder()
        self._decoder.max_header_list_size = max_header_list_size
        self._table = self._decoder.header_table = _VersionedTable()
        self._decoded: dict[bytes, tuple[int, list[tuple[bytes, bytes]]]] = {}

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        version = self._table.version
        hit = self._decoded.get(block)
        if hit is not None and hit[0] == version:
            return hit[1]
        headers = self._decoder.decode(block, raw=True)
        if self._table.version == version:
            if len(self._decoded) >= _DECODED_BLOCKS:
                self._decoded.clear()
            self._decoded[block] = (version, headers)
        return headers


class ConnectionError_(Exception):
    """The peer broke the protocol: the connection ends with GOAWAY(code)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class StreamHandler(Protocol):
    """What the application layer provides (api/grpc_server.py)."""

    def open_stream(self, stream: "Stream", headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        """A client opened `stream` with these request headers."""


class Stream:
    """One request/response exchange. The receiving side is reported to
    `on_data`/`on_end`/`on_reset` (set by the handler); the sending side is
    `send_headers`, `send_data` and `send_trailers`, which respect the
    client's flow-control windows and queue what does not fit yet."""

    __slots__ = ("id", "conn", "send_window", "recv_unacked", "remote_closed", "local_closed",
                 "pending", "pending_trailers", "on_data", "on_end", "on_reset", "drained", "credit_on_receipt")

    def __init__(self, conn: "Connection", stream_id: int) -> None:
        self.id = stream_id
        self.conn = conn
        self.send_window = conn.peer_initial_window
        self.recv_unacked = 0
        self.remote_closed = False
        self.local_closed = False
        self.pending: collections.deque[memoryview] = collections.deque()  # DATA not yet sent
        self.pending_trailers: bytes | None = None  # a header block to send after them
        self.on_data: Callable[[bytes], None] | None = None
        self.on_end: Callable[[], None] | None = None
        self.on_reset: Callable[[], None] | None = None
        self.drained: asyncio.Future[None] | None = None  # set while a writer waits for room
        # True: the client's window is given back as data arrives. False
        # (a streamed request): as the handler reads it (`consumed`), so
        # that a client sending faster than the handler reads is held back.
        self.credit_on_receipt = True

    # -- sending --------------------------------------------------------

    def send_headers(self, block: bytes, end_stream: bool = False) -> None:
        if self.local_closed:
            return
        self.conn.write(header_frames(block, self.id, end_stream, self.conn.peer_max_frame))
        if end_stream:
            self._closed_locally()

    def send_data(self, data: bytes) -> None:
        """Queue `data` behind what is queued; send what the windows allow."""
        if self.local_closed:
            return
        conn = self.conn
        n = len(data)
        if not self.pending and n <= self.send_window and n <= conn.send_window and n <= conn.peer_max_frame:
            self.send_window -= n
            conn.send_window -= n
            conn.write(frame_header(n, DATA, 0, self.id) + data)
            return
        self.pending.append(memoryview(data))
        self._flush()

    def send_response(self, headers: bytes, data: bytes, trailers: bytes) -> None:
        """Headers, one DATA payload and trailers: a whole unary response, in
        one write when the windows allow (the common case)."""
        if self.local_closed:
            return
        conn = self.conn
        n = len(data)
        if n <= self.send_window and n <= conn.send_window and n <= conn.peer_max_frame \
                and len(headers) <= conn.peer_max_frame and len(trailers) <= conn.peer_max_frame:
            self.send_window -= n
            conn.send_window -= n
            sid = self.id
            conn.write(frame_header(len(headers), HEADERS, END_HEADERS, sid) + headers
                       + frame_header(n, DATA, 0, sid) + data
                       + frame_header(len(trailers), HEADERS, END_HEADERS | END_STREAM, sid) + trailers)
            self._closed_locally()
            return
        self.send_headers(headers)
        self.send_data(data)
        self.send_trailers(trailers)

    def send_trailers(self, block: bytes) -> None:
        """End the stream with this header block, after any queued data."""
        if self.local_closed or self.pending_trailers is not None:
            return
        if self.pending:
            self.pending_trailers = block
            return
        self.send_headers(block, end_stream=True)

    def has_room(self) -> bool:
        """False while data waits for a window or the socket is backed up: a
        streaming writer should wait (`wait_for_room`) before sending more."""
        return not self.pending and not self.conn.write_paused

    async def wait_for_room(self) -> None:
        while not self.local_closed and not self.has_room():
            if self.drained is None or self.drained.done():
                self.drained = self.conn.loop.create_future()
            await self.drained

    def reset(self, code: int = CANCEL) -> None:
        """Abandon the stream (RST_STREAM), both directions."""
        if self.local_closed and self.remote_closed:
            return
        self.conn.write(frame(RST_STREAM, 0, self.id, _U32.pack(code)))
        self._abandoned()

    def _abandoned(self) -> None:
        """Reset, by either side, or the connection is gone: nothing more
        is sent or received, and the handler hears of it."""
        self.pending.clear()
        self.pending_trailers = None
        self.local_closed = self.remote_closed = True
        self.conn.forget(self)
        self._wake_writer()
        on_reset, self.on_reset = self.on_reset, None
        if on_reset is not None:
            on_reset()

    def _flush(self) -> None:
        conn = self.conn
        pending = self.pending
        while pending:
            room = min(self.send_window, conn.send_window, conn.peer_max_frame)
            if room <= 0:
                conn.blocked[self.id] = self
                return
            chunk = pending[0]
            if len(chunk) <= room:
                pending.popleft()
            else:
                pending[0] = chunk[room:]  # memoryviews: no copy of what is left
                chunk = chunk[:room]
            n = len(chunk)
            self.send_window -= n
            conn.send_window -= n
            conn.write(frame_header(n, DATA, 0, self.id) + chunk)
        conn.blocked.pop(self.id, None)
        if self.pending_trailers is not None:
            block, self.pending_trailers = self.pending_trailers, None
            self.send_headers(block, end_stream=True)
        self._wake_writer()

    def _wake_writer(self) -> None:
        if self.drained is not None and not self.drained.done() and (self.local_closed or self.has_room()):
            self.drained.set_result(None)

    def _closed_locally(self) -> None:
        self.local_closed = True
        if not self.remote_closed:
            # The answer is complete; the client need not send the rest
            # (RFC 9113 section 8.1).
            self.conn.write(frame(RST_STREAM, 0, self.id, _U32.pack(NO_ERROR)))
            self.remote_closed = True
        self.conn.forget(self)
        self._wake_writer()

    # -- receiving ------------------------------------------------------

    def consumed(self, n: int) -> None:
        """The handler has read `n` bytes of DATA: the client may send as
        many more (see credit_on_receipt)."""
        self.recv_unacked += n
        if not self.remote_closed and self.recv_unacked >= STREAM_WINDOW // 4:
            self.conn.write(frame(WINDOW_UPDATE, 0, self.id, _U32.pack(self.recv_unacked)))
            self.recv_unacked = 0

    def _received(self, data: bytes, end_stream: bool, flow_length: int) -> None:
        """`flow_length`: what the frame counts against the window (its
        padding included)."""
        if flow_length and not end_stream:
            self.consumed(flow_length if self.credit_on_receipt else flow_length - len(data))
        if data and self.on_data is not None:
            self.on_data(data)
        if end_stream:
            self.remote_closed = True
            if self.local_closed:
                self.conn.forget(self)
            if self.on_end is not None:
                self.on_end()


class Connection(asyncio.Protocol):
    """One client connection: parses frames as they arrive and writes what
    the streams send, coalesced into one socket write per loop iteration."""

    def __init__(self, handler: StreamHandler, on_close: Callable[["Connection"], None]) -> None:
        self.handler = handler
        self._on_close = on_close
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer: str = ""
        self._buf = b""
        self._preface_seen = False
        self.streams: dict[int, Stream] = {}
        self.blocked: dict[int, Stream] = {}  # streams with DATA waiting for a window
        self.last_stream_id = 0
        self._decoder = CachingDecoder(MAX_HEADER_LIST_BYTES)
        self._continuing: tuple[int, int, bytearray] | None = None  # a header block awaiting CONTINUATION
        self.send_window = DEFAULT_WINDOW
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = 16384
        self._recv_unacked = 0
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._lazy_flush: asyncio.TimerHandle | None = None
        self.write_paused = False
        self.going_away = False
        self.closed = False

    # -- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport subclass
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        if not self._preface_seen:
            if not buf.startswith(PREFACE[:len(buf)]):
                self._not_http2(buf)
                return
            if len(buf) < len(PREFACE):
                self._buf = buf
                return
            self._preface_seen = True
            buf = buf[len(PREFACE):]
            # Our side of the preface waits for theirs: a client that turns
            # out to speak HTTP/1.1 must not get HTTP/2 frames first.
            self.write(_SERVER_PREFACE)
        pos = 0
        end = len(buf)
        try:
            while end - pos >= 9:
                hi, lo, ftype, flags, sid = _unpack_header(buf, pos)
                length = (hi << 8) | lo
                if length > MAX_FRAME:
                    raise ConnectionError_(FRAME_SIZE_ERROR, f"frame of {length} bytes (max {MAX_FRAME})")
                if end - pos - 9 < length:
                    break
                payload = buf[pos + 9:pos + 9 + length]
                pos += 9 + length
                self._frame(ftype, flags, sid & 0x7FFFFFFF, payload)
                if self.closed:
                    return
        except ConnectionError_ as exc:
            self._abort(exc.code, str(exc))
            return
        self._buf = buf[pos:] if pos < end else b""

    def _not_http2(self, data: bytes) -> None:
        """The client spoke something else first (HTTP/1.1, say): the
        handler may take the connection over (`hand_over`), else it closes."""
        self.closed = True  # nothing more from this protocol on the transport
        self._on_close(self)
        hand_over = getattr(self.handler, "hand_over", None)
        if hand_over is None or not hand_over(self.transport, data):
            log.debug("closing a connection from %s: not HTTP/2 and nobody else to take it", self.peer)
            if self.transport is not None:
                self.transport.close()

    def eof_received(self) -> bool:
        return False  # close our side too

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        for stream in list(self.streams.values()):
            stream._wake_writer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed and not self._preface_seen:
            return  # handed over (or refused) before it spoke HTTP/2
        self.closed = True
        streams, self.streams = self.streams, {}
        self.blocked.clear()
        for stream in streams.values():
            stream._abandoned()
        self._on_close(self)

    # -- writing ----------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush_out)

    def write_lazily(self, data: bytes) -> None:
        """Queue `data` to go out with the next write, or after LAZY_WRITE
        seconds if none comes: a PING ack. grpc-go pings after nearly every
        response it receives (its bandwidth probe), and answering each at
        once cost a socket write of its own -- half of a busy member's
        writes, each tens of us of CPU here; under load a response follows
        within a millisecond and carries the ack along."""
        if self.closed:
            return
        self._out.append(data)
        if not self._flush_scheduled and self._lazy_flush is None:
            self._lazy_flush = self.loop.call_later(LAZY_WRITE, self._flush_out)

    def _flush_out(self) -> None:
        self._flush_scheduled = False
        if self._lazy_flush is not None:
            self._lazy_flush.cancel()
            self._lazy_flush = None
        out, self._out = self._out, []
        if self.closed or self.transport is None or not out:
            return
        self.transport.write(b"".join(out) if len(out) > 1 else out[0])

    def forget(self, stream: Stream) -> None:
        self.streams.pop(stream.id, None)
        self.blocked.pop(stream.id, None)
        if self.going_away and not self.streams:
            self.close()

    def go_away(self) -> None:
        """Refuse new streams, let the open ones finish, then close."""
        if self.going_away or self.closed:
            return
        self.going_away = True
        self.write(frame(GOAWAY, 0, 0, _U32.pack(self.last_stream_id) + _U32.pack(NO_ERROR)))
        if not self.streams:
            self.close()

    def close(self) -> None:
        if self.closed or self.transport is None:
            return
        self._flush_out()
        self.transport.close()

    def abort(self) -> None:
        """Close now, whatever is still unsent (a client that does not read)."""
        if self.transport is not None:
            self.transport.abort()

    def _abort(self, code: int, message: str) -> None:
        log.debug("closing HTTP/2 connection from %s: %s", self.peer, message)
        if self._preface_seen:
            self.write(frame(GOAWAY, 0, 0, _U32.pack(self.last_stream_id) + _U32.pack(code) + message.encode()[:256]))
        self.going_away = True
        self.close()
        self.closed = True

    # -- frames -----------------------------------------------------------

    def _frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if self._continuing is not None and ftype != CONTINUATION:
            raise ConnectionError_(PROTOCOL_ERROR, "expected CONTINUATION")
        if ftype == DATA:
            self._data(flags, sid, payload)
        elif ftype == HEADERS:
            self._headers(flags, sid, payload)
        elif ftype == WINDOW_UPDATE:
            self._window_update(sid, payload)
        elif ftype == PING:
            if len(payload) != 8 or sid != 0:
                raise ConnectionError_(FRAME_SIZE_ERROR if len(payload) != 8 else PROTOCOL_ERROR, "bad PING")
            if not flags & ACK:
                self.write_lazily(frame(PING, ACK, 0, payload))
        elif ftype == SETTINGS:
            self._settings(flags, sid, payload)
        elif ftype == RST_STREAM:
            if sid == 0 or len(payload) != 4:
                raise ConnectionError_(PROTOCOL_ERROR, "bad RST_STREAM")
            stream = self.streams.get(sid)
            if stream is not None:
                stream._abandoned()
        elif ftype == CONTINUATION:
            if self._continuing is None or self._continuing[0] != sid:
                raise ConnectionError_(PROTOCOL_ERROR, "unexpected CONTINUATION")
            block = self._continuing[2]
            block += payload
            if len(block) > MAX_HEADER_LIST_BYTES * 2:
                raise ConnectionError_(ENHANCE_YOUR_CALM, "header block too large")
            if flags & END_HEADERS:
                _, first_flags, _ = self._continuing
                self._continuing = None
                self._header_block(sid, first_flags, bytes(block))
        elif ftype == GOAWAY:
            # The client sends no more streams; ours finish as usual.
            pass
        elif ftype == PUSH_PROMISE:
            raise ConnectionError_(PROTOCOL_ERROR, "a client cannot push")
        elif ftype == PRIORITY:
            if sid == 0:
                raise ConnectionError_(PROTOCOL_ERROR, "PRIORITY on stream 0")
        # Unknown frame types are ignored (section 4.1).

    def _data(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise ConnectionError_(PROTOCOL_ERROR, "DATA on stream 0")
        n = len(payload)
        self._recv_unacked += n
        if self._recv_unacked >= CONNECTION_WINDOW // 4:
            self.write(frame(WINDOW_UPDATE, 0, 0, _U32.pack(self._recv_unacked)))
            self._recv_unacked = 0
        if flags & PADDED:
            payload = _unpad(payload)
        stream = self.streams.get(sid)
        if stream is None:
            if sid > self.last_stream_id:
                raise ConnectionError_(PROTOCOL_ERROR, "DATA on an idle stream")
            return  # a stream this side already closed or reset
        if stream.remote_closed:
            stream.reset(STREAM_CLOSED)
            return
        stream._received(payload, bool(flags & END_STREAM), n)

    def _headers(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise ConnectionError_(PROTOCOL_ERROR, "HEADERS on stream 0")
        if flags & PADDED:
            payload = _unpad(payload)
        if flags & PRIORITY_FLAG:
            if len(payload) < 5:
                raise ConnectionError_(FRAME_SIZE_ERROR, "short HEADERS")
            payload = payload[5:]
        if not flags & END_HEADERS:
            self._continuing = (sid, flags, bytearray(payload))
            return
        self._header_block(sid, flags, payload)

    def _header_block(self, sid: int, flags: int, block: bytes) -> None:
        headers = self._decode(bytes(block))
        end_stream = bool(flags & END_STREAM)
        stream = self.streams.get(sid)
        if stream is not None:  # trailers from the client: only the end matters
            if not end_stream:
                raise ConnectionError_(PROTOCOL_ERROR, "trailers without END_STREAM")
            if stream.remote_closed:
                stream.reset(STREAM_CLOSED)
                return
            stream._received(b"", True, 0)
            return
        if sid % 2 == 0 or sid <= self.last_stream_id:
            if sid <= self.last_stream_id:
                return  # headers for a stream already closed: nothing to do
            raise ConnectionError_(PROTOCOL_ERROR, f"client stream id {sid} is even")
        self.last_stream_id = sid
        if self.going_away:
            self.write(frame(RST_STREAM, 0, sid, _U32.pack(REFUSED_STREAM)))
            return
        if len(self.streams) >= MAX_CONCURRENT_STREAMS:
            self.write(frame(RST_STREAM, 0, sid, _U32.pack(REFUSED_STREAM)))
            return
        stream = Stream(self, sid)
        self.streams[sid] = stream
        if end_stream:
            stream.remote_closed = True
        self.handler.open_stream(stream, headers, end_stream)

    def _decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """The block's header list (see CachingDecoder)."""
        try:
            return self._decoder.decode(block)
        except Exception as exc:  # hpack's errors: the dynamic table is now unusable
            raise ConnectionError_(COMPRESSION_ERROR, f"bad header block: {exc}") from None

    def _window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ConnectionError_(FRAME_SIZE_ERROR, "bad WINDOW_UPDATE")
        increment = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if sid == 0:
            if increment == 0:
                raise ConnectionError_(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise ConnectionError_(FLOW_CONTROL_ERROR, "connection window overflow")
            for stream in list(self.blocked.values()):
                if self.send_window <= 0:
                    break
                stream._flush()
            return
        stream = self.streams.get(sid)
        if stream is None:
            return
        if increment == 0:
            stream.reset(PROTOCOL_ERROR)
            return
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            stream.reset(FLOW_CONTROL_ERROR)
            return
        if stream.pending:
            stream._flush()

    def _settings(self, flags: int, sid: int, payload: bytes) -> None:
        if sid != 0:
            raise ConnectionError_(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise ConnectionError_(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise ConnectionError_(FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
        for off in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, off)
            if key == S_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ConnectionError_(FLOW_CONTROL_ERROR, "initial window too large")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
                    if stream.send_window > MAX_WINDOW:
                        raise ConnectionError_(FLOW_CONTROL_ERROR, "a stream's window overflowed")
            elif key == S_MAX_FRAME_SIZE:
                if not 16384 <= value <= 2**24 - 1:
                    raise ConnectionError_(PROTOCOL_ERROR, "bad SETTINGS_MAX_FRAME_SIZE")
                self.peer_max_frame = value
            elif key == S_ENABLE_PUSH and value > 1:
                raise ConnectionError_(PROTOCOL_ERROR, "bad SETTINGS_ENABLE_PUSH")
            # The header table size only limits the encoder, and ours never
            # indexes; the rest do not apply to a server.
        self.write(frame(SETTINGS, ACK, 0))
        for stream in list(self.blocked.values()):
            stream._flush()


def _unpad(payload: bytes) -> bytes:
    if not payload:
        raise ConnectionError_(PROTOCOL_ERROR, "padded frame without a pad length")
    pad = payload[0]
    if pad >= len(payload):
        raise ConnectionError_(PROTOCOL_ERROR, "padding longer than the frame")
    return payload[1:len(payload) - pad]
