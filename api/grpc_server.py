"""A gRPC server on api/http2.py, for the services grpcio generates.

It takes what grpc.aio's server takes — generic RPC handlers (the generated
`add_*Servicer_to_server` functions register them) and `grpc.aio`
server interceptors — and calls the handlers the way grpc.aio does: a
coroutine per unary call, an async generator or `context.write` for
streamed responses, an async iterator of requests for streamed requests,
`context.abort` to end a call with a status. Only the transport is its own:
see api/http2.py for why.

Each call is one asyncio task, started once its request is complete (unary
requests) or when its headers arrive (streamed requests). Interceptors are
asked once per method, when its first call arrives, and the handler they
return serves every later call of that method: metastore's metrics
interceptor wraps each method once and counts per call inside the wrapper.
"""
from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import inspect
import logging
import zlib
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Sequence

import grpc

from metastore.api.http import MAX_LINE_BYTES
from metastore.api.http2 import Connection, Stream, literal_field
from metastore.read_peers import MAGIC as READ_PEERS_MAGIC

log = logging.getLogger("metastore.api.grpc")

# --- HPACK encoding of what this server sends ------------------------------
# Literal header fields "without indexing" (http2.literal_field): the
# client's decoder keeps no state for them, so each block is a constant or
# built by concatenation.
_literal = literal_field

_STATUS_200 = b"\x88"  # ":status: 200", static table entry 8
_CONTENT_TYPE = literal_field(31, b"application/grpc")  # name: static entry 31
RESPONSE_HEADERS = _STATUS_200 + _CONTENT_TYPE
OK_TRAILERS = _literal(b"grpc-status", b"0")

_ZERO_PREFIX = b"\x00"


def _message_prefix(n: int) -> bytes:
    return _ZERO_PREFIX + n.to_bytes(4, "big")


class SerializedMessages(tuple):
    """Several response messages of a streamed call, already serialized, that
    a handler yields at once: they go out back to back in one DATA write (a
    Watch stream's queued responses: one write per wake-up, not per watcher)."""

    __slots__ = ()


def _percent_encode(message: str) -> bytes:
    """grpc-message's encoding: printable ASCII but '%' as is, the rest %XX."""
    raw = message.encode("utf-8", "replace")
    if all(0x20 <= b <= 0x7E and b != 0x25 for b in raw):
        return raw
    return b"".join(bytes([b]) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in raw)


_MAX_DETAILS = 4096  # a status message is cut here: trailers must fit a client's header limits


def status_block(code: grpc.StatusCode, details: str | None,
                 trailing_metadata: Iterable[tuple[str, Any]] = ()) -> bytes:
    block = _literal(b"grpc-status", str(code.value[0]).encode())
    if details:
        block += _literal(b"grpc-message", _percent_encode(details[:_MAX_DETAILS]))
    for key, value in trailing_metadata:
        block += _literal(key.lower().encode(), _metadata_value(key, value))
    return block


def _metadata_value(key: str, value: Any) -> bytes:
    if key.endswith("-bin"):
        return base64.b64encode(value if isinstance(value, bytes) else str(value).encode()).rstrip(b"=")
    return value.encode() if isinstance(value, str) else bytes(value)


_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def _parse_timeout(value: bytes) -> float | None:
    unit = _TIMEOUT_UNITS.get(value[-1:])
    digits = value[:-1]
    if unit is None or not digits.isdigit() or len(digits) > 8:
        return None
    return int(digits) * unit


# --- calls -------------------------------------------------------------------

class _HandlerCallDetails(grpc.HandlerCallDetails):
    def __init__(self, method: str, invocation_metadata: tuple) -> None:
        self.method = method
        self.invocation_metadata = invocation_metadata


class Call:
    """One RPC: the handler's `context` (the parts of grpc.aio's
    ServicerContext that handlers use) and the request side of its stream."""

    __slots__ = ("_server", "_stream", "_conn", "method", "_headers", "_deadline", "_timer", "_task",
                 "_code", "_details", "_trailing", "_headers_sent", "_buf", "_messages", "_ended",
                 "_waiter", "_expired", "_reset", "_compressed", "_handler", "_done_callbacks", "_wire_sizes")

    def __init__(self, server: "GrpcServer", stream: Stream, method: str, headers: list[tuple[bytes, bytes]],
                 deadline: float | None, compressed: bool) -> None:
        self._server = server
        self._stream = stream
        self._conn = stream.conn
        self.method = method
        self._headers = headers
        self._deadline = deadline
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task | None = None
        self._code: grpc.StatusCode | None = None
        self._details: str | None = None
        self._trailing: tuple = ()
        self._headers_sent = False
        self._buf = b""
        self._messages: collections.deque[bytes] = collections.deque()
        self._ended = False
        self._waiter: asyncio.Future[None] | None = None
        self._expired = False
        self._reset = False
        self._compressed = compressed
        self._handler: grpc.RpcMethodHandler | None = None
        self._done_callbacks: list[Callable[[Any], None]] | None = None
        # Each buffered message's size on the wire, while the client's
        # window is given back as the handler reads (a streamed request).
        self._wire_sizes: collections.deque[int] | None = None

    # -- the ServicerContext API ----------------------------------------------

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Sequence = ()) -> None:
        if code == grpc.StatusCode.OK:
            raise ValueError("abort() needs a status other than OK")
        self._code = code
        self._details = details
        if trailing_metadata:
            self._trailing = tuple(trailing_metadata)
        raise grpc.aio.AbortError()

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str | None:
        return self._details

    def set_trailing_metadata(self, trailing_metadata: Sequence) -> None:
        self._trailing = tuple(trailing_metadata)

    def trailing_metadata(self) -> tuple:
        return self._trailing

    def invocation_metadata(self) -> tuple:
        return _metadata(self._headers)

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - self._conn.loop.time())

    def peer(self) -> str:
        peer = self._conn.peer
        return f"ipv6:{peer}" if peer.count(":") > 1 else f"ipv4:{peer}"

    def peer_identities(self) -> None:
        return None

    def peer_identity_key(self) -> None:
        return None

    def auth_context(self) -> dict:
        return {}

    def cancelled(self) -> bool:
        return self._reset or self._expired

    def done(self) -> bool:
        return self._stream.local_closed

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        if self._done_callbacks is None:
            self._done_callbacks = []
        self._done_callbacks.append(callback)

    async def send_initial_metadata(self, initial_metadata: Sequence = ()) -> None:
        if not self._headers_sent:
            self._headers_sent = True
            block = RESPONSE_HEADERS + b"".join(_literal(k.lower().encode(), _metadata_value(k, v))
                                                for k, v in initial_metadata)
            self._stream.send_headers(block)

    async def write(self, message: Any) -> None:
        """Send one response message of a streamed response; waits while the
        client's flow-control window or the socket has no room.
        SerializedMessages (WatchService(encoded=True)) are already
        serialized and go out together."""
        if self._reset or self._stream.local_closed:
            raise asyncio.CancelledError()
        assert self._handler is not None
        stream = self._stream
        if not self._headers_sent:
            self._headers_sent = True
            stream.send_headers(RESPONSE_HEADERS)
        if type(message) is SerializedMessages:
            parts = []
            for data in message:
                parts.append(_message_prefix(len(data)))
                parts.append(data)
            stream.send_data(b"".join(parts))
        else:
            serializer = self._handler.response_serializer
            data = serializer(message) if serializer is not None else message
            stream.send_data(_message_prefix(len(data)) + data)
        if not stream.has_room():
            await stream.wait_for_room()

    async def read(self) -> Any:
        raw = await self._next_message()
        if raw is None:
            return grpc.aio.EOF
        deserializer = self._handler.request_deserializer if self._handler is not None else None
        return deserializer(raw) if deserializer is not None else raw

    # -- the request side ------------------------------------------------------

    def _on_data(self, data: bytes) -> None:
        buf: bytes | bytearray
        if self._buf:
            buf = self._buf
            buf += data  # a bytearray: a big message arriving in frames is copied once
        else:
            buf = data
        pos = 0
        end = len(buf)
        limit = self._server.max_receive_message_length
        while end - pos >= 5:
            n = int.from_bytes(buf[pos + 1:pos + 5], "big")
            if n > limit:
                self._fail_request(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"grpc: received message larger than max ({n} vs. {limit})")
                return
            if end - pos - 5 < n:
                break
            flag = buf[pos]
            message = bytes(buf[pos + 5:pos + 5 + n])
            pos += 5 + n
            if flag:
                message = self._decompress(flag, message, limit)
                if message is None:
                    return
            self._messages.append(message)
            if self._wire_sizes is not None:
                self._wire_sizes.append(5 + n)
        if pos == end:
            self._buf = b""
        elif buf is data:
            self._buf = bytearray(data[pos:])
        else:
            del buf[:pos]
        if self._messages:
            self._wake()

    def _decompress(self, flag: int, message: bytes, limit: int) -> bytes | None:
        if flag != 1 or not self._compressed:
            self._fail_request(grpc.StatusCode.INTERNAL, "grpc: compressed message without grpc-encoding")
            return None
        inflater = zlib.decompressobj(wbits=31)
        try:
            out = inflater.decompress(message, limit + 1)  # no more than the limit is ever inflated
        except zlib.error as exc:
            self._fail_request(grpc.StatusCode.INTERNAL, f"grpc: failed to decompress the message: {exc}")
            return None
        if len(out) > limit:
            self._fail_request(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"grpc: received message after decompression larger than max (over {limit})")
            return None
        return out

    def _on_end(self) -> None:
        if self._reset:
            return  # the call already failed (_fail_request)
        if self._buf:
            self._fail_request(grpc.StatusCode.INTERNAL, "grpc: the request ended inside a message")
            return
        self._ended = True
        if self._task is None:
            self._start()
        else:
            self._wake()

    def _on_reset(self) -> None:
        self._reset = True
        self._ended = True
        self._wake()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _fail_request(self, code: grpc.StatusCode, details: str) -> None:
        self._finish_status(code, details)
        self._on_reset()

    async def _next_message(self) -> bytes | None:
        while not self._messages:
            if self._reset:
                raise asyncio.CancelledError()
            if self._ended:
                return None
            self._waiter = self._conn.loop.create_future()
            await self._waiter
        if self._wire_sizes:
            self._stream.consumed(self._wire_sizes.popleft())
        return self._messages.popleft()

    async def _requests(self, deserializer: Callable[[bytes], Any] | None) -> AsyncIterator[Any]:
        while True:
            raw = await self._next_message()
            if raw is None:
                return
            yield deserializer(raw) if deserializer is not None else raw

    # -- running ----------------------------------------------------------------

    def _start(self) -> None:
        self._task = self._conn.loop.create_task(self._run())
        self._server.running.add(self._task)
        self._task.add_done_callback(self._server.running.discard)
        if self._deadline is not None:
            self._timer = self._conn.loop.call_at(self._deadline, self._expire)

    def _expire(self) -> None:
        if self._task is not None and not self._task.done():
            self._expired = True
            self._task.cancel()

    async def _run(self) -> None:
        server = self._server
        try:
            handler = server.handlers.get(self.method)
            if handler is None:
                handler = await server.resolve(self.method)
                if handler is None:
                    self._finish_status(grpc.StatusCode.UNIMPLEMENTED, f"Method not found: {self.method}")
                    return
            self._handler = handler
            if handler.request_streaming:
                request: Any = self._requests(handler.request_deserializer)
            else:
                raw = self._messages.popleft() if self._ended and len(self._messages) == 1 else await self._single()
                if raw is None:
                    return
                deserializer = handler.request_deserializer
                try:
                    request = deserializer(raw) if deserializer is not None else raw
                except Exception:
                    self._finish_status(grpc.StatusCode.INTERNAL, "Exception deserializing request!")
                    return
            if handler.response_streaming:
                behavior = handler.stream_stream if handler.request_streaming else handler.unary_stream
                result = behavior(request, self)
                if hasattr(result, "__aiter__"):
                    # aclosing: a cancelled call runs the generator's
                    # finally blocks now, not whenever it is collected.
                    async with contextlib.aclosing(result):
                        async for response in result:
                            await self.write(response)
                elif inspect.isawaitable(result):
                    await result
                self._finish_status(self._code or grpc.StatusCode.OK, self._details)
                return
            behavior = handler.stream_unary if handler.request_streaming else handler.unary_unary
            response = behavior(request, self)
            if inspect.isawaitable(response):
                response = await response
            if self._code is not None and self._code is not grpc.StatusCode.OK:
                self._finish_status(self._code, self._details)
                return
            serializer = handler.response_serializer
            try:
                data = serializer(response) if serializer is not None else response
            except Exception:
                log.exception("cannot serialize the response of %s", self.method)
                self._finish_status(grpc.StatusCode.INTERNAL, "Exception serializing response!")
                return
            self._finish_unary(data)
        except grpc.aio.AbortError:
            self._finish_status(self._code or grpc.StatusCode.UNKNOWN, self._details)
        except asyncio.CancelledError:
            if self._expired:
                self._finish_status(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
            elif not self._reset:
                self._finish_status(grpc.StatusCode.CANCELLED, "Cancelled")
        except Exception as exc:
            log.exception("unexpected error in %s", self.method)
            self._finish_status(grpc.StatusCode.UNKNOWN, f"Unexpected {type(exc)}: {exc}")
        finally:
            if self._timer is not None:
                self._timer.cancel()
            if self._done_callbacks:
                for callback in self._done_callbacks:
                    try:
                        callback(self)
                    except Exception:
                        log.exception("done callback of %s failed", self.method)
            # Whatever the stream still hears concerns nobody now. Its
            # callbacks are this call's methods: left in place, the two
            # would keep each other (and the task, its coroutine and
            # context) alive until a cyclic collection -- ten objects a
            # call, all of a busy member's cyclic garbage, for the
            # collector to find instead of going at once.
            stream = self._stream
            stream.on_data = stream.on_end = stream.on_reset = None

    async def _single(self) -> bytes | None:
        """The one request message of a unary request."""
        first = await self._next_message()
        if first is None:
            self._finish_status(grpc.StatusCode.INTERNAL, "grpc: the client sent no request message")
            return None
        while not self._ended:
            self._waiter = self._conn.loop.create_future()
            await self._waiter
        if self._messages:
            self._finish_status(grpc.StatusCode.INTERNAL, "grpc: the client sent more than one request message")
            return None
        return first

    def _finish_unary(self, data: bytes) -> None:
        stream = self._stream
        trailers = status_block(grpc.StatusCode.OK, None, self._trailing) if self._trailing else OK_TRAILERS
        if self._headers_sent:
            stream.send_data(_message_prefix(len(data)) + data)
            stream.send_trailers(trailers)
        else:
            self._headers_sent = True
            stream.send_response(RESPONSE_HEADERS, _message_prefix(len(data)) + data, trailers)

    def _finish_status(self, code: grpc.StatusCode, details: str | None) -> None:
        stream = self._stream
        if stream.local_closed:
            return
        if code is grpc.StatusCode.OK and not self._trailing:
            block = OK_TRAILERS
        else:
            block = status_block(code, details, self._trailing)
        if self._headers_sent:
            stream.send_trailers(block)
        else:
            self._headers_sent = True
            stream.send_headers(RESPONSE_HEADERS + block, end_stream=True)  # trailers-only


def _metadata(headers: list[tuple[bytes, bytes]]) -> tuple:
    out = []
    for name, value in headers:
        if name[:1] == b":" or name in _TRANSPORT_HEADERS:
            continue
        key = name.decode("ascii", "replace")
        if key.endswith("-bin"):
            out.append((key, base64.b64decode(value + b"=" * (-len(value) % 4))))
        else:
            out.append((key, value.decode("utf-8", "replace")))
    return tuple(out)


_TRANSPORT_HEADERS = frozenset({b"content-type", b"te", b"grpc-timeout", b"grpc-encoding",
                                b"grpc-accept-encoding", b"content-length"})


# --- the server ---------------------------------------------------------------

class GrpcServer:
    """What api/server.py needs of a gRPC server: handlers and interceptors
    in, listeners on host:port addresses, a graceful stop."""

    def __init__(self, interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
                 max_receive_message_length: int = 4 * 1024 * 1024) -> None:
        self._interceptors = list(interceptors)
        self._generic: list[grpc.GenericRpcHandler] = []
        self._registered: dict[str, grpc.RpcMethodHandler] = {}
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}
        self.max_receive_message_length = max_receive_message_length
        self._listeners: list[asyncio.Server] = []
        self._connections: set[Connection] = set()
        # Takes over a connection that does not begin with HTTP/2's preface
        # (an HTTP/1.1 client): called with asyncio streams over it.
        self.running: set[asyncio.Task] = set()  # every call's task
        self.http1: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]] | None = None
        # Takes connections that start with metastore.read_peers.MAGIC.
        self.read_peers: Callable[[asyncio.Transport, bytes], None] | None = None

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        """What the generated `add_*Servicer_to_server` functions call besides
        `add_generic_rpc_handlers`: the same handlers by method name."""
        for name, handler in handlers.items():
            self._registered[f"/{service}/{name}"] = handler

    async def resolve(self, method: str) -> grpc.RpcMethodHandler | None:
        """The handler for `method`, through the interceptors (once per method)."""
        details = _HandlerCallDetails(method, ())

        async def lookup(d: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
            registered = self._registered.get(d.method)
            if registered is not None:
                return registered
            for generic in self._generic:
                found = generic.service(d)
                if found is not None:
                    return found
            return None

        def chain(index: int) -> Callable[[grpc.HandlerCallDetails], Any]:
            if index == len(self._interceptors):
                return lookup
            interceptor = self._interceptors[index]

            async def next_(d: grpc.HandlerCallDetails) -> Any:
                return await interceptor.intercept_service(chain(index + 1), d)
            return next_

        handler = await chain(0)(details)
        if handler is not None:
            self.handlers[method] = handler
        return handler

    # http2.StreamHandler
    def open_stream(self, stream: Stream, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        path = b""
        http_method = b""
        content_type = b""
        deadline = None
        encoding = None
        for name, value in headers:
            if name == b":path":
                path = value
            elif name == b":method":
                http_method = value
            elif name == b"content-type":
                content_type = value
            elif name == b"grpc-timeout":
                timeout = _parse_timeout(value)
                if timeout is not None:
                    deadline = stream.conn.loop.time() + timeout
            elif name == b"grpc-encoding":
                encoding = value
        if http_method != b"POST":
            stream.send_headers(b"\x08\x03405", end_stream=True)  # ":status: 405", name from the static table
            return
        if content_type != b"application/grpc" and not content_type.startswith((b"application/grpc+",
                                                                                  b"application/grpc;")):
            stream.send_headers(b"\x08\x03415", end_stream=True)
            return
        call = Call(self, stream, path.decode("ascii", "replace"), headers, deadline,
                    compressed=encoding not in (None, b"identity"))
        if encoding not in (None, b"identity", b"gzip"):
            call._finish_status(grpc.StatusCode.UNIMPLEMENTED,
                                f"grpc: Decompressor is not installed for grpc-encoding "
                                f"{encoding.decode('latin-1')!r}")
            return
        stream.on_data = call._on_data
        stream.on_end = call._on_end
        stream.on_reset = call._on_reset
        if end_stream:
            call._on_end()
            return
        handler = self.handlers.get(call.method)
        if handler is not None and handler.request_streaming:
            stream.credit_on_receipt = False
            call._wire_sizes = collections.deque()
        if handler is None or handler.request_streaming:
            call._start()  # streamed requests (and the first call of a method) start at once

    def hand_over(self, transport: asyncio.Transport, data: bytes) -> bool:
        """http2.Connection's call for a client that is not speaking HTTP/2:
        another member, for read index rounds (metastore.read_peers), or
        an HTTP/1.1 client."""
        if data[:1] == READ_PEERS_MAGIC[:1] and self.read_peers is not None:
            self.read_peers(transport, data)
            return True
        if self.http1 is None:
            return False
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_LINE_BYTES, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, self.http1, loop=loop)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        protocol.data_received(data)
        return True

    # -- listening ----------------------------------------------------------------

    async def bind(self, address: str) -> int:
        """Listen on host:port ('[::1]:0' style); returns the port."""
        host, _, port_text = address.rpartition(":")
        host = host.strip("[]") or None
        port = int(port_text)
        loop = asyncio.get_running_loop()
        listener = await loop.create_server(self._protocol, host=host, port=port, reuse_address=True,
                                            start_serving=False, backlog=1024)
        self._listeners.append(listener)
        ports = {s.getsockname()[1] for s in listener.sockets}
        return ports.pop() if len(ports) == 1 else port

    def _protocol(self) -> Connection:
        conn = Connection(self, self._connections.discard)
        self._connections.add(conn)
        return conn

    async def start(self) -> None:
        for listener in self._listeners:
            await listener.start_serving()

    async def stop(self, grace: float | None) -> None:
        """Stop listening; tell every client to go away; give open calls
        `grace` seconds, then end them."""
        for listener in self._listeners:
            listener.close()
        for conn in list(self._connections):
            conn.go_away()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (grace or 0.0)
        while self._connections and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self._connections):
            conn.abort()  # connection_lost resets every stream: their calls are cancelled
        if self.running:
            await asyncio.wait(list(self.running), timeout=1.0)
        for listener in self._listeners:
            try:
                await asyncio.wait_for(listener.wait_closed(), 1.0)
            except asyncio.TimeoutError:
                pass
        self._listeners.clear()
