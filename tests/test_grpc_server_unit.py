"""The client port's own HTTP/2 + gRPC server (api/http2.py,
api/grpc_server.py), in-process, driven by grpcio's client (grpc-core, the
same HTTP/2 peer Python etcd clients are) and by raw sockets. The etcd
services over it are covered by every cluster test with etcdctl (grpc-go)."""
from __future__ import annotations

import asyncio
import gc
import socket
import struct
from typing import Any, AsyncIterator

import grpc
import pytest

from metastore.api import http2
from metastore.api.grpc_server import Call, GrpcServer

SERVICE = "test.Echo"


def _ident(b: bytes) -> bytes:
    return b


class _Echo:
    """Handlers on raw bytes (no protobuf needed to test the transport)."""

    def __init__(self) -> None:
        self.cancelled: asyncio.Event | None = None
        self.written = 0

    async def unary(self, request: bytes, context: Any) -> bytes:
        if request.startswith(b"abort:"):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, request[6:].decode())
        if request.startswith(b"big:"):
            return b"x" * int(request[4:])
        if request == b"sleep":
            try:
                await asyncio.sleep(30)
            finally:
                self.cancelled.set()
        if request == b"boom":
            raise RuntimeError("boom")
        return b"echo:" + request[:64] + b":%d" % len(request)

    async def bidi(self, requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        try:
            async for request in requests:
                if request == b"flood":
                    while True:  # stops only when flow control holds it back for good
                        yield b"y" * 65536
                        self.written += 1
                yield request
        finally:
            self.cancelled.set()


def _handlers(echo: _Echo) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(echo.unary, _ident, _ident),
        "Bidi": grpc.stream_stream_rpc_method_handler(echo.bidi, _ident, _ident),
    })


@pytest.fixture
def run():
    """Run `scenario(port, echo, server)` against a started server on a fresh loop."""
    def runner(scenario, max_receive: int = 4 * 1024 * 1024) -> None:
        async def main() -> None:
            echo = _Echo()
            echo.cancelled = asyncio.Event()
            server = GrpcServer(max_receive_message_length=max_receive)
            server.add_generic_rpc_handlers([_handlers(echo)])
            port = await server.bind("127.0.0.1:0")
            await server.start()
            try:
                await asyncio.wait_for(scenario(port, echo, server), 30)
            finally:
                await server.stop(0.5)
        asyncio.run(main())
    return runner


def _channel(port: int) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", -1)])


def test_unary_calls_statuses_and_unknown_methods(run):
    async def scenario(port: int, echo: _Echo, server: GrpcServer) -> None:
        async with _channel(port) as ch:
            unary = ch.unary_unary(f"/{SERVICE}/Unary")
            assert await unary(b"hi", timeout=5) == b"echo:hi:2"
            assert await unary(b"", timeout=5) == b"echo::0"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await unary("abort:kein Schlüssel 100%".encode(), timeout=5)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert info.value.details() == "kein Schlüssel 100%"  # percent-encoded on the wire
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await unary(b"abort:" + b"z" * 100_000, timeout=5)  # a long message is cut, not fatal
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await unary(b"boom", timeout=5)
            assert info.value.code() == grpc.StatusCode.UNKNOWN
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await ch.unary_unary(f"/{SERVICE}/Nope")(b"x", timeout=5)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
            # The connection survived all of that.
            results = await asyncio.gather(*(unary(b"%d" % i, timeout=5) for i in range(200)))
            assert results == [b"echo:%d:%d" % (i, len(b"%d" % i)) for i in range(200)]
    run(scenario)


def test_finished_calls_leave_no_reference_cycles(run):
    """Each call's objects go when it ends (reference counting), not at the
    next cyclic collection (ten a call were left to the collector)."""
    async def scenario(port: int, echo: _Echo, server: GrpcServer) -> None:
        async with _channel(port) as ch:
            unary = ch.unary_unary(f"/{SERVICE}/Unary")
            await unary(b"warm", timeout=5)
            gc.collect()
            gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds is kept for us to see
            try:
                for i in range(20):
                    assert await unary(b"%d" % i, timeout=5) == b"echo:%d:%d" % (i, len(b"%d" % i))
                with pytest.raises(grpc.aio.AioRpcError):
                    await unary(b"abort:no", timeout=5)
                bidi = ch.stream_stream(f"/{SERVICE}/Bidi")
                call = bidi(iter([b"a", b"b"]), timeout=5)
                assert [m async for m in call] == [b"a", b"b"]
                gc.collect()
                left = [o for o in gc.garbage if isinstance(o, (Call, http2.Stream))]
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
            assert left == []
    run(scenario)


def test_big_messages_both_ways_and_the_receive_limit(run):
    async def scenario(port: int, echo: _Echo, server: GrpcServer) -> None:
        async with _channel(port) as ch:
            unary = ch.unary_unary(f"/{SERVICE}/Unary")
            # Far beyond every initial window: flow control has to work.
            assert await unary(b"big:%d" % (20 * 1024 * 1024), timeout=20) == b"x" * (20 * 1024 * 1024)
            request = b"r" * (3 * 1024 * 1024)
            assert await unary(request, timeout=10) == b"echo:" + request[:64] + b":%d" % len(request)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await unary(b"r" * (4 * 1024 * 1024 + 1), timeout=10)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            gz = await unary(b"z" * 100_000, timeout=5, compression=grpc.Compression.Gzip)
            assert gz == b"echo:" + b"z" * 64 + b":100000"
            assert await unary(b"still here", timeout=5) == b"echo:still here:10"
    run(scenario)


def test_a_compressed_request_may_not_inflate_past_the_limit(run):
    async def scenario(port: int, echo: _Echo, server: GrpcServer) -> None:
        async with _channel(port) as ch:
            unary = ch.unary_unary(f"/{SERVICE}/Unary")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await unary(b"\0" * (2 * 1024 * 1024), timeout=10, compression=grpc.Compression.Gzip)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    run(scenario, max_receive=1024 * 1024)


def test_deadlines_and_cancellation_end_the_handler(run):
    async def scenario(port: int, echo: _Echo, server: GrpcServer) -> None:
        async with _channel(port) as ch:
            unary = ch.unary_unary(f"/{SERVICE}/Unary")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await unary(b"sleep", timeout=0.3)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await asyncio.wait_for(echo.cancelled.wait(), 5)  # the handler was cancelled
            echo.cancelled.clear()
            call = ch.stream_stream(f"/{SERVICE}/Bidi")()
            await call.write(b"one")
            assert await call.read() == b"one"
            call.cancel()
            await asyncio.wait_for(echo.cancelled.wait(), 5)  # the generator's finally ran
            assert not server.running or await _eventually(lambda: not server.running)
    run(scenario)


async def _eventually(condition, timeout: float = 5.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)
    return True


def test_a_client_that_does_not_read_holds_a_streaming_handler_back(run):
    async def scenario(port: int, echo: _Echo, server: GrpcServer) -> None:
        async with _channel(port) as ch:
            call = ch.stream_stream(f"/{SERVICE}/Bidi")()
            for i in range(100):
                await call.write(b"m%d" % i)
            for i in range(100):
                assert await call.read() == b"m%d" % i
            await call.write(b"flood")
            await asyncio.sleep(1.0)  # the handler writes as fast as it may meanwhile
            held = echo.written
            await asyncio.sleep(0.5)
            # Bounded by the client's windows and the socket buffers, not growing.
            assert echo.written == held and held * 65536 < 256 * 1024 * 1024, held
            call.cancel()
            await asyncio.wait_for(echo.cancelled.wait(), 5)
    run(scenario)


def _h2_frames(sock: socket.socket, want: int, timeout: float = 5.0) -> list[tuple[int, int, int, bytes]]:
    """Read frames until one of type `want` arrives."""
    sock.settimeout(timeout)
    buf = b""
    frames = []
    while True:
        while len(buf) < 9 or len(buf) < 9 + int.from_bytes(buf[:3], "big"):
            chunk = sock.recv(65536)
            if not chunk:
                return frames
            buf += chunk
        n = int.from_bytes(buf[:3], "big")
        ftype, flags, sid = buf[3], buf[4], struct.unpack(">I", buf[5:9])[0]
        frames.append((ftype, flags, sid, buf[9:9 + n]))
        buf = buf[9 + n:]
        if ftype == want:
            return frames


def test_raw_http2_ping_and_protocol_errors(run):
    async def scenario(port: int, echo: _Echo, server: GrpcServer) -> None:
        def talk() -> None:
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(http2.PREFACE + http2.frame(http2.SETTINGS, 0, 0)
                             + http2.frame(http2.PING, 0, 0, b"12345678"))
                frames = _h2_frames(sock, http2.PING)
                assert frames[0][0] == http2.SETTINGS  # the server's preface comes first
                assert frames[-1] == (http2.PING, http2.ACK, 0, b"12345678")
                sock.sendall(http2.frame(http2.HEADERS, http2.END_HEADERS, 2, b"\x83"))  # even id: illegal
                frames = _h2_frames(sock, http2.GOAWAY)
                assert frames[-1][0] == http2.GOAWAY
                assert int.from_bytes(frames[-1][3][4:8], "big") == http2.PROTOCOL_ERROR
                assert sock.recv(100) == b""  # and it closed
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(b"hello there, not HTTP\r\n\r\n")
                sock.settimeout(5)
                assert sock.recv(100) == b""  # no HTTP/1.1 handler: closed
        await asyncio.get_running_loop().run_in_executor(None, talk)
        async with _channel(port) as ch:  # others are unaffected
            assert await ch.unary_unary(f"/{SERVICE}/Unary")(b"ok", timeout=5) == b"echo:ok:2"
    run(scenario)


def test_an_http1_client_is_handed_over(run):
    async def scenario(port: int, echo: _Echo, server: GrpcServer) -> None:
        async def http1(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            line = await reader.readline()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(line), line))
            await writer.drain()
            writer.close()

        server.http1 = http1

        def talk() -> bytes:
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")
                sock.settimeout(5)
                out = b""
                while chunk := sock.recv(1000):
                    out += chunk
                return out
        out = await asyncio.get_running_loop().run_in_executor(None, talk)
        assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(b"GET /version HTTP/1.1\r\n")
    run(scenario)


def test_a_decoded_header_block_is_reused_only_while_the_table_is_unchanged():
    """Connection keeps decoded header blocks; the same bytes must decode
    anew once the dynamic table changed (index 62 is then another entry)."""
    async def main() -> None:
        conn = http2.Connection(handler=None, on_close=lambda c: None)  # type: ignore[arg-type]
        add_a = b"\x40\x03x-a\x011"  # literal, incremental indexing: x-a: 1 becomes index 62
        add_b = b"\x40\x03x-b\x012"  # x-b: 2 becomes 62, x-a: 1 moves to 63
        newest = b"\xbe"  # indexed field 62
        assert conn._decode(add_a) == [(b"x-a", b"1")]
        assert conn._decode(newest) == [(b"x-a", b"1")]
        assert conn._decode(newest) == [(b"x-a", b"1")]  # kept, table unchanged
        assert conn._decode(add_b) == [(b"x-b", b"2")]
        assert conn._decode(newest) == [(b"x-b", b"2")]
        conn._decoder._table.maxsize = 0  # a size update empties the table: index 62 is gone
        with pytest.raises(http2.ConnectionError_):
            conn._decode(newest)
    asyncio.run(main())
