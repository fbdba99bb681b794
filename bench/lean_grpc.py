"""A lean gRPC client over HTTP/2, for the benchmark's load (not for applications).

Why the benchmark has its own: grpcio's Python client (grpc.aio) costs
~180-225 us of CPU per unary call on this project's 2-core machine, so with
the servers on the same two cores the client, not the servers, capped the
read rows at ~4-5k reads/s whichever server it measured (its `client_cpu`
stayed at ~0.9 of a core). etcd's own benchmark tool is a Go program whose
client costs a small fraction of that. This one costs ~30-40 us a call: its
request header blocks are built once per method (literal fields that never
touch the HPACK table, so they are the same bytes on every call), the
writes of one loop iteration go out in one `write`, and the server's
response header blocks, the same bytes call after call, are decoded once
(`CachingDecoder`). It speaks to etcd and metastore alike, so both are
measured through the same client.

It implements as much of grpc.aio's `Channel` as the generated stubs use
(`unary_unary`, `stream_stream`), raising `grpc.aio.AioRpcError` as grpc.aio
does, so the workloads run unchanged on either (`connect` picks). Not
implemented, as the workloads need none of it: metadata, compression, TLS,
and backpressure -- it opens the largest receive windows and takes every
message as it arrives, so a server's handling of a slow reader (etcd's
slow watchers) is not exercised through it.
"""
from __future__ import annotations

import asyncio
import collections
import struct
import time
import urllib.parse
from typing import Any, Callable

import grpc

from metastore.api import http2
from metastore.api.http2 import (ACK, CONTINUATION, DATA, END_HEADERS, END_STREAM, GOAWAY, HEADERS,
                                 MAX_WINDOW, PING, PUSH_PROMISE, RST_STREAM, SETTINGS, WINDOW_UPDATE,
                                 frame, frame_header)

# What this client lets a server send before it acknowledges: large, so that
# a watch stream or a big range never waits for a WINDOW_UPDATE round trip.
RECEIVE_WINDOW = MAX_WINDOW
_REPLENISH_AT = RECEIVE_WINDOW // 2
_MAX_HEADER_LIST = 1 << 20
_U32 = struct.Struct(">I")
_SETTING = struct.Struct(">HI")
_MESSAGE_PREFIX = struct.Struct(">BI")

_CLIENT_PREFACE = http2.PREFACE + frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(k, v) for k, v in (
    (http2.S_ENABLE_PUSH, 0),
    (http2.S_INITIAL_WINDOW_SIZE, RECEIVE_WINDOW),
    (http2.S_MAX_HEADER_LIST_SIZE, _MAX_HEADER_LIST)))) + frame(
    WINDOW_UPDATE, 0, 0, _U32.pack(RECEIVE_WINDOW - http2.DEFAULT_WINDOW))

_RST_CODES = {http2.CANCEL: grpc.StatusCode.CANCELLED, http2.REFUSED_STREAM: grpc.StatusCode.UNAVAILABLE,
              http2.ENHANCE_YOUR_CALM: grpc.StatusCode.RESOURCE_EXHAUSTED, 0xC: grpc.StatusCode.PERMISSION_DENIED}
_STATUS_BY_NUMBER = {s.value[0]: s for s in grpc.StatusCode}


_literal = http2.literal_field


def request_block(path: str, authority: str, timeout: float | None) -> bytes:
    """The header block of a call: :method POST and :scheme http by static
    index, the rest literal; nothing enters the dynamic table."""
    block = b"\x83\x86" + _literal(4, path.encode()) + _literal(1, authority.encode()) \
        + _literal(31, b"application/grpc") + _literal(b"te", b"trailers")
    if timeout is not None:
        block += _literal(b"grpc-timeout", _timeout_value(timeout))
    return block


def _timeout_value(seconds: float) -> bytes:
    """grpc-timeout: at most 8 digits, in the finest unit that fits."""
    for unit, per_second in ((b"m", 1000), (b"S", 1), (b"M", 1 / 60), (b"H", 1 / 3600)):
        value = max(1, round(seconds * per_second))
        if value < 10**8:
            return b"%d" % value + unit
    return b"99999999H"


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class _Stream:
    """One call's stream: the response messages as they complete, then its status."""

    __slots__ = ("sid", "buf", "messages", "waiter", "status", "send_window",
                 "pending", "unacked", "timer")

    def __init__(self, sid: int, send_window: int) -> None:
        self.sid = sid
        self.buf = bytearray()
        self.messages: list[bytes] = []
        self.waiter: asyncio.Future | None = None  # set when a message or the end arrives
        self.status: grpc.aio.AioRpcError | None | bool = False  # False: still open; None: OK
        self.send_window = send_window
        self.pending: collections.deque[tuple[memoryview, bool]] = collections.deque()  # DATA waiting for a window
        self.unacked = 0
        self.timer: asyncio.TimerHandle | None = None

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class _Connection(asyncio.Protocol):
    """One HTTP/2 connection: frames in, frames out, streams by id."""

    def __init__(self, authority: str) -> None:
        self.authority = authority
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future = self.loop.create_future()
        self.closed: str | None = None  # why the transport is gone (nothing more is written)
        self.draining: str | None = None  # why no new stream may start here (GOAWAY, or closed)
        self.streams: dict[int, _Stream] = {}
        self.next_sid = 1
        self.decoder = http2.CachingDecoder(_MAX_HEADER_LIST)
        self._ok_trailers: dict[int, list[tuple[bytes, bytes]]] = {}
        self.send_window = http2.DEFAULT_WINDOW
        self.peer_initial_window = http2.DEFAULT_WINDOW
        self.peer_max_frame = 16384
        self.unacked = 0
        self.blocked: dict[int, _Stream] = {}
        self._rbuf = b""
        self._continuing: tuple[int, int, bytearray] | None = None
        self._out: list[bytes] = []
        self._flush_scheduled = False

    # -- output ------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Queue `data`; everything queued in one loop iteration goes out in one write."""
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self.transport is not None and not self.closed:
            self.transport.write(b"".join(self._out))
        self._out.clear()

    def open(self, block: bytes, end_stream: bool) -> _Stream:
        if self.draining:
            raise _rpc_error(grpc.StatusCode.UNAVAILABLE, f"connection unusable: {self.draining}")
        sid = self.next_sid
        self.next_sid += 2
        stream = self.streams[sid] = _Stream(sid, self.peer_initial_window)
        self.write(http2.header_frames(block, sid, end_stream, self.peer_max_frame))
        return stream

    def send_data(self, stream: _Stream, data: bytes, end_stream: bool) -> None:
        if stream.pending:
            stream.pending.append((memoryview(data), end_stream))
            return
        self._send_data(stream, memoryview(data), end_stream)

    def _send_data(self, stream: _Stream, data: memoryview, end_stream: bool) -> bool:
        """Send what the windows allow; True once all of `data` went out."""
        while True:
            n = min(len(data), self.send_window, stream.send_window, self.peer_max_frame)
            if n < len(data) and n <= 0:
                stream.pending.appendleft((data, end_stream))
                self.blocked[stream.sid] = stream
                return False
            last = n == len(data)
            self.write(frame_header(n, DATA, END_STREAM if (last and end_stream) else 0, stream.sid)
                       + bytes(data[:n]))
            self.send_window -= n
            stream.send_window -= n
            if last:
                return True
            data = data[n:]

    def _unblock(self) -> None:
        for sid, stream in list(self.blocked.items()):
            del self.blocked[sid]
            while stream.pending:
                data, end = stream.pending.popleft()
                if not self._send_data(stream, data, end):
                    break

    def reset(self, stream: _Stream, code: int = http2.CANCEL) -> None:
        if self.streams.pop(stream.sid, None) is not None and not self.closed:
            self.write(frame(RST_STREAM, 0, stream.sid, _U32.pack(code)))
        self.blocked.pop(stream.sid, None)

    # -- input -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(_CLIENT_PREFACE)

    def connection_lost(self, exc: Exception | None) -> None:
        self._close(f"connection lost: {exc or 'closed by the server'}")

    def _close(self, why: str) -> None:
        """The transport is gone (or going): every stream still open fails."""
        self.closed = self.closed or why
        self._drain(why, streams_after=0)

    def _drain(self, why: str, streams_after: int) -> None:
        """No new stream starts here; those above `streams_after` fail (the
        server will not serve them), the others run to their end."""
        self.draining = self.draining or why
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(why))
            self.ready.exception()  # retrieved: nobody may be waiting for it
        for sid in [sid for sid in self.streams if sid > streams_after]:
            self._finish(self.streams.pop(sid), _rpc_error(grpc.StatusCode.UNAVAILABLE, why))

    def _finish(self, stream: _Stream, status: grpc.aio.AioRpcError | None) -> None:
        if stream.status is False:
            stream.status = status
        if stream.timer is not None:
            stream.timer.cancel()
        self.blocked.pop(stream.sid, None)
        stream.wake()

    def data_received(self, data: bytes) -> None:
        buf = self._rbuf + data if self._rbuf else data
        pos, end = 0, len(buf)
        try:
            while end - pos >= 9:
                hi, lo, ftype, flags, sid = struct.unpack_from(">HBBBI", buf, pos)
                length = (hi << 8) | lo
                if end - pos - 9 < length:
                    break
                payload = buf[pos + 9:pos + 9 + length]
                pos += 9 + length
                self._frame(ftype, flags, sid & 0x7FFFFFFF, payload)
        except Exception as exc:  # a server that broke the protocol: this connection is done
            self._close(f"protocol error: {exc!r}")
            if self.transport is not None:
                self.transport.close()
            return
        self._rbuf = buf[pos:]

    def _frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if self._continuing is not None and ftype != CONTINUATION:
            raise ValueError("expected CONTINUATION")
        if ftype in (DATA, HEADERS, CONTINUATION, RST_STREAM) and sid == 0:
            raise ValueError(f"frame type {ftype} on stream 0")
        if ftype == DATA:
            self._data(flags, sid, payload)
        elif ftype == HEADERS:
            if flags & http2.PADDED:
                payload = payload[1:len(payload) - payload[0]]
            if flags & http2.PRIORITY_FLAG:
                payload = payload[5:]
            if flags & END_HEADERS:
                self._headers(sid, flags & END_STREAM, payload)
            else:
                self._continuing = (sid, flags & END_STREAM, bytearray(payload))
        elif ftype == CONTINUATION:
            if self._continuing is None or self._continuing[0] != sid:
                raise ValueError("unexpected CONTINUATION")
            self._continuing[2].extend(payload)
            if flags & END_HEADERS:
                csid, end_stream, block = self._continuing
                self._continuing = None
                self._headers(csid, end_stream, bytes(block))
        elif ftype == PUSH_PROMISE:
            raise ValueError("PUSH_PROMISE, with push disabled")
        elif ftype == SETTINGS:
            if not flags & ACK:
                self._settings(payload)
                self.write(frame(SETTINGS, ACK, 0))
                if not self.ready.done():
                    self.ready.set_result(None)
        elif ftype == PING:
            if not flags & ACK:
                self.write(frame(PING, ACK, 0, payload))
        elif ftype == WINDOW_UPDATE:
            increment = _U32.unpack(payload)[0] & 0x7FFFFFFF
            if sid == 0:
                if increment == 0 or self.send_window + increment > MAX_WINDOW:
                    raise ValueError("bad connection WINDOW_UPDATE")
                self.send_window += increment
            elif (stream := self.streams.get(sid)) is not None:
                if increment == 0 or stream.send_window + increment > MAX_WINDOW:
                    self._fail(stream, "bad stream WINDOW_UPDATE", http2.PROTOCOL_ERROR)
                    return
                stream.send_window += increment
            if self.blocked:
                self._unblock()
        elif ftype == RST_STREAM:
            stream = self.streams.pop(sid, None)
            if stream is not None:
                code = _U32.unpack(payload)[0]
                self._finish(stream, _rpc_error(_RST_CODES.get(code, grpc.StatusCode.INTERNAL),
                                                f"stream reset by the server (HTTP/2 error {code})"))
        elif ftype == GOAWAY:
            last, code = struct.unpack_from(">II", payload)
            self._drain(f"GOAWAY (HTTP/2 error {code})", streams_after=last & 0x7FFFFFFF)
        # PRIORITY and unknown frames: nothing to do

    def _settings(self, payload: bytes) -> None:
        for i in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, i)
            if key == http2.S_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ValueError("SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
                if self.blocked:
                    self._unblock()
            elif key == http2.S_MAX_FRAME_SIZE:
                if not 16384 <= value <= (1 << 24) - 1:
                    raise ValueError("SETTINGS_MAX_FRAME_SIZE out of range")
                self.peer_max_frame = value

    def _data(self, flags: int, sid: int, payload: bytes) -> None:
        self.unacked += len(payload)  # flow control counts padding too
        if self.unacked >= _REPLENISH_AT:
            self.write(frame(WINDOW_UPDATE, 0, 0, _U32.pack(self.unacked)))
            self.unacked = 0
        stream = self.streams.get(sid)
        if stream is None:
            return
        stream.unacked += len(payload)
        if stream.unacked >= _REPLENISH_AT and not flags & END_STREAM:
            self.write(frame(WINDOW_UPDATE, 0, sid, _U32.pack(stream.unacked)))
            stream.unacked = 0
        if flags & http2.PADDED:
            payload = payload[1:len(payload) - payload[0]]
        buf = stream.buf
        buf += payload
        got = False
        while len(buf) >= 5:
            compressed, n = _MESSAGE_PREFIX.unpack_from(buf)
            if len(buf) < 5 + n:
                break
            if compressed:
                self._fail(stream, "a compressed message, which this client did not ask for", http2.CANCEL)
                return
            stream.messages.append(bytes(memoryview(buf)[5:5 + n]))
            del buf[:5 + n]
            got = True
        if flags & END_STREAM:
            self.streams.pop(sid, None)
            self._finish(stream, _rpc_error(grpc.StatusCode.INTERNAL, "stream ended without trailers"))
        elif got:
            stream.wake()

    def _fail(self, stream: _Stream, why: str, code: int) -> None:
        """A fault in one stream: it is reset and its call fails; the others go on."""
        self.reset(stream, code)
        self._finish(stream, _rpc_error(grpc.StatusCode.INTERNAL, why))

    def _headers(self, sid: int, end_stream: int, block: bytes) -> None:
        headers = self.decoder.decode(block)  # always, to keep the HPACK table in step
        stream = self.streams.get(sid)
        if stream is None:
            return
        if not end_stream:
            return  # the response headers: the trailers say how the call ended
        self.streams.pop(sid, None)
        if stream.buf:
            status: grpc.aio.AioRpcError | None = _rpc_error(
                grpc.StatusCode.INTERNAL, f"the stream ended inside a message ({len(stream.buf)} bytes)")
        else:
            # The decoder hands back the very same list for the same trailers:
            # an OK one is remembered (an error is made anew: each raise needs its own).
            ok = self._ok_trailers.get(id(headers))
            if ok is headers:
                status = None
            else:
                status = _status(headers)
                if status is None:
                    if len(self._ok_trailers) >= 64:
                        self._ok_trailers.clear()
                    self._ok_trailers[id(headers)] = headers  # kept alive: its id stays its own
        self._finish(stream, status)


def _status(headers: list[tuple[bytes, bytes]]) -> grpc.aio.AioRpcError | None:
    """None for grpc-status 0, else the error the trailers (or a non-200 :status) name."""
    fields = dict(headers)
    status = fields.get(b"grpc-status")
    if status is None:
        http_status = fields.get(b":status", b"?").decode(errors="replace")
        return _rpc_error(grpc.StatusCode.UNKNOWN, f"no grpc-status (HTTP status {http_status})")
    if status == b"0":
        return None
    code = _STATUS_BY_NUMBER.get(int(status), grpc.StatusCode.UNKNOWN) if status.isdigit() \
        else grpc.StatusCode.UNKNOWN
    return _rpc_error(code, urllib.parse.unquote(fields.get(b"grpc-message", b"").decode(errors="replace")))


class Channel:
    """What grpc.aio's insecure channel offers the generated stubs, on one
    HTTP/2 connection opened on first use (and again after it was lost)."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.authority = target
        self._conn: _Connection | None = None
        self._connecting: asyncio.Future | None = None
        self._closed = False
        self._blocks: dict[tuple[str, float | None], bytes] = {}

    async def connection(self, timeout: float | None = None) -> _Connection:
        """The connection to start a call on, dialed if there is none usable;
        past `timeout`, DEADLINE_EXCEEDED (as the call's own deadline)."""
        conn = self._conn
        if conn is not None and not conn.draining and conn.ready.done():
            return conn
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._connect())
        try:
            return await asyncio.wait_for(asyncio.shield(self._connecting), timeout)
        except asyncio.TimeoutError:
            raise _rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded while connecting") from None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(lambda: _Connection(self.authority), self.host, self.port)
            await conn.ready
        except OSError as exc:  # ConnectionError included: the server hung up before its SETTINGS
            raise _rpc_error(grpc.StatusCode.UNAVAILABLE, f"cannot connect to {self.authority}: {exc}") from None
        if self._closed:
            conn._close("channel closed")
            conn.transport.close()  # type: ignore[union-attr]
            raise _rpc_error(grpc.StatusCode.CANCELLED, "the channel was closed")
        self._conn = conn
        return conn

    def _block(self, path: str, timeout: float | None) -> bytes:
        key = (path, timeout)
        block = self._blocks.get(key)
        if block is None:
            block = self._blocks[key] = request_block(path, self.authority, timeout)
        return block

    def unary_unary(self, path: str, request_serializer: Callable[[Any], bytes] | None = None,
                    response_deserializer: Callable[[bytes], Any] | None = None,
                    **_: Any) -> Callable[..., Any]:
        async def call(request: Any, timeout: float | None = None, **__: Any) -> Any:
            payload = request_serializer(request) if request_serializer else request
            started = time.monotonic()
            conn = await self.connection(timeout)
            left = None if timeout is None else timeout - (time.monotonic() - started)
            stream = conn.open(self._block(path, timeout), end_stream=False)
            conn.send_data(stream, _MESSAGE_PREFIX.pack(0, len(payload)) + payload, end_stream=True)
            status = await _until_done(conn, stream, left)
            if status is not None:
                raise status
            if len(stream.messages) != 1:
                raise _rpc_error(grpc.StatusCode.INTERNAL, f"{len(stream.messages)} messages for a unary call")
            data = stream.messages[0]
            return response_deserializer(data) if response_deserializer else data
        return call

    def stream_stream(self, path: str, request_serializer: Callable[[Any], bytes] | None = None,
                      response_deserializer: Callable[[bytes], Any] | None = None,
                      **_: Any) -> Callable[..., "StreamCall"]:
        def call(timeout: float | None = None, **__: Any) -> StreamCall:
            return StreamCall(self, path, timeout, request_serializer, response_deserializer)
        return call

    async def close(self) -> None:
        self._closed = True
        if self._conn is not None and self._conn.transport is not None:
            self._conn._close("channel closed")
            self._conn.transport.close()
        self._conn = None

    async def __aenter__(self) -> "Channel":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _until_done(conn: _Connection, stream: _Stream, timeout: float | None) -> grpc.aio.AioRpcError | None:
    """Wait for the stream's end; past `timeout`, reset it: DEADLINE_EXCEEDED."""
    loop = conn.loop
    if timeout is not None:
        stream.timer = loop.call_later(timeout, _expire, conn, stream)
    while stream.status is False:
        stream.waiter = loop.create_future()
        try:
            await stream.waiter
        except asyncio.CancelledError:
            conn.reset(stream)
            if stream.timer is not None:
                stream.timer.cancel()
            raise
    return stream.status  # type: ignore[return-value]


def _expire(conn: _Connection, stream: _Stream) -> None:
    conn.reset(stream)
    conn._finish(stream, _rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))


class StreamCall:
    """A bidirectional call, as grpc.aio's StreamStreamCall is used by the
    workloads: write, read (grpc.aio.EOF at the end), done_writing, cancel."""

    def __init__(self, channel: Channel, path: str, timeout: float | None,
                 serializer: Callable[[Any], bytes] | None, deserializer: Callable[[bytes], Any] | None) -> None:
        self._channel = channel
        self._path = path
        self._timeout = timeout
        self._ser = serializer
        self._deser = deserializer
        self._conn: _Connection | None = None
        self._stream: _Stream | None = None
        self._read = 0

    async def _opened(self) -> tuple[_Connection, _Stream]:
        if self._stream is None:
            conn = await self._channel.connection(self._timeout)
            self._conn, self._stream = conn, conn.open(self._channel._block(self._path, self._timeout), False)
            if self._timeout is not None:
                self._stream.timer = conn.loop.call_later(self._timeout, _expire, conn, self._stream)
        return self._conn, self._stream  # type: ignore[return-value]

    async def write(self, request: Any) -> None:
        conn, stream = await self._opened()
        if stream.status is not False:
            raise stream.status or _rpc_error(grpc.StatusCode.INTERNAL, "write after the call ended")
        payload = self._ser(request) if self._ser else request
        conn.send_data(stream, _MESSAGE_PREFIX.pack(0, len(payload)) + payload, end_stream=False)

    async def done_writing(self) -> None:
        conn, stream = await self._opened()
        if stream.status is False:
            conn.send_data(stream, b"", end_stream=True)

    async def read(self) -> Any:
        conn, stream = await self._opened()
        while self._read >= len(stream.messages):
            if stream.status is not False:
                if stream.status is None:
                    return grpc.aio.EOF
                raise stream.status
            stream.waiter = conn.loop.create_future()
            await stream.waiter
        data = stream.messages[self._read]
        self._read += 1
        if self._read >= 1024:  # drop what was read, now and then
            del stream.messages[:self._read]
            self._read = 0
        return self._deser(data) if self._deser else data

    def cancel(self) -> bool:
        if self._conn is None or self._stream is None or self._stream.status is not False:
            return False
        self._conn.reset(self._stream)
        self._conn._finish(self._stream, _rpc_error(grpc.StatusCode.CANCELLED, "Locally cancelled by application!"))
        return True


CLIENTS = ("lean", "grpcio")


def connect(target: str, client: str = "lean") -> Any:
    """A channel to `target` through the chosen client: this module's or grpc.aio's."""
    if client == "lean":
        return Channel(target)
    if client == "grpcio":
        return grpc.aio.insecure_channel(target)
    raise ValueError(f"unknown client {client!r}: one of {', '.join(CLIENTS)}")
