"""The benchmark's lean gRPC client (bench/lean_grpc.py) against real servers.

The benchmark's numbers for metastore and etcd alike come through this
client, so it must do what grpc.aio does for the calls the workloads make:
the same answers, the same status codes and messages, flow control for
messages larger than the windows, streams, deadlines."""
from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import grpc
import hpack
import pytest

from metastore.api import http2
from metastore.api.pb import rpc_pb2, rpc_pb2_grpc
from metastore.testing_etcd import EtcdCluster

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import lean_grpc  # noqa: E402


def test_request_block_decodes_to_the_call_headers():
    long_path = "/" + "p" * 300  # lengths past the 7-bit prefix
    block = lean_grpc.request_block(long_path, "127.0.0.1:2379", 2.5)
    headers = hpack.Decoder().decode(block, raw=True)
    assert headers == [(b":method", b"POST"), (b":scheme", b"http"), (b":path", long_path.encode()),
                       (b":authority", b"127.0.0.1:2379"), (b"content-type", b"application/grpc"),
                       (b"te", b"trailers"), (b"grpc-timeout", b"2500m")]
    assert b"grpc-timeout" not in lean_grpc.request_block("/a", "h:1", None)


async def exercise(endpoint: str) -> None:
    """Every kind of call the workloads make, through the lean client, checked
    against grpc.aio's answers where both apply."""
    lean = lean_grpc.Channel(endpoint)
    async with grpc.aio.insecure_channel(endpoint) as ref:
        kv, ref_kv = rpc_pb2_grpc.KVStub(lean), rpc_pb2_grpc.KVStub(ref)
        put = await kv.Put(rpc_pb2.PutRequest(key=b"lean/a", value=b"1"), timeout=5)
        got = await ref_kv.Range(rpc_pb2.RangeRequest(key=b"lean/a"), timeout=5)
        assert got.kvs[0].value == b"1" and got.kvs[0].mod_revision == put.header.revision

        # Larger than any initial window, both ways: flow control must move it.
        big = os.urandom(1_000_000)
        await kv.Put(rpc_pb2.PutRequest(key=b"lean/big", value=big), timeout=10)
        assert (await kv.Range(rpc_pb2.RangeRequest(key=b"lean/big"), timeout=10)).kvs[0].value == big

        # Many calls at once on the one connection, each with its own answer.
        keys = [f"lean/many/{i:03d}".encode() for i in range(200)]
        await asyncio.gather(*(kv.Put(rpc_pb2.PutRequest(key=k, value=k), timeout=10) for k in keys))
        answers = await asyncio.gather(*(kv.Range(rpc_pb2.RangeRequest(key=k), timeout=10) for k in keys))
        assert [a.kvs[0].value for a in answers] == keys

        # An error: the same code and message as grpc.aio reports.
        future = rpc_pb2.RangeRequest(key=b"lean/a", revision=put.header.revision + 10**6)
        with pytest.raises(grpc.aio.AioRpcError) as ref_err:
            await ref_kv.Range(future, timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as lean_err:
            await kv.Range(future, timeout=5)
        assert (lean_err.value.code(), lean_err.value.details()) == \
            (ref_err.value.code(), ref_err.value.details()) == \
            (grpc.StatusCode.OUT_OF_RANGE, "etcdserver: mvcc: required revision is a future revision")

        # A bidi stream: created, then an event per put.
        watch = rpc_pb2_grpc.WatchStub(lean).Watch()
        await watch.write(rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(key=b"lean/w")))
        assert (await watch.read()).created
        for i in range(3):
            await ref_kv.Put(rpc_pb2.PutRequest(key=b"lean/w", value=b"%d" % i), timeout=5)
        seen: list[bytes] = []
        while len(seen) < 3:
            seen += [ev.kv.value for ev in (await asyncio.wait_for(watch.read(), 10)).events]
        assert seen == [b"0", b"1", b"2"]
        assert watch.cancel()

        # A deadline: the call ends with DEADLINE_EXCEEDED, the connection serves on.
        quiet = rpc_pb2_grpc.WatchStub(lean).Watch(timeout=0.3)
        await quiet.write(rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(key=b"lean/q")))
        assert (await quiet.read()).created
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await asyncio.wait_for(quiet.read(), 10)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert (await kv.Range(rpc_pb2.RangeRequest(key=b"lean/a"), timeout=5)).count == 1
    await lean.close()


def test_lean_client_against_metastore(metastore_cluster):
    cluster = metastore_cluster(1)
    asyncio.run(exercise(cluster.members[0].endpoint))


def test_lean_client_against_etcd(etcd_installed, tmp_path):
    with EtcdCluster(1, exe=etcd_installed, base_dir=str(tmp_path)) as etcd:
        asyncio.run(exercise(etcd.endpoints[0]))


def test_nothing_listening_is_unavailable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there

    async def call() -> None:
        kv = rpc_pb2_grpc.KVStub(lean_grpc.Channel(f"127.0.0.1:{port}"))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await kv.Range(rpc_pb2.RangeRequest(key=b"a"), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    asyncio.run(call())


class _ScriptedServer(asyncio.Protocol):
    """A bare HTTP/2 server for the client's edge cases, answering each
    request as `answer(stream_id)` says: OK with one message, a compressed
    message (which the client did not ask for), or GOAWAY naming the streams
    it still serves. Fakes only the server; the client is the real one."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.buf = b""
        self.encoder = hpack.Encoder()
        self.ping_acks = 0

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(http2.frame(http2.SETTINGS, 0, 0))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.buf.startswith(http2.PREFACE):
            self.buf = self.buf[len(http2.PREFACE):]
        while len(self.buf) >= 9:
            length = int.from_bytes(self.buf[:3], "big")
            if len(self.buf) < 9 + length:
                return
            ftype, flags, sid = self.buf[3], self.buf[4], int.from_bytes(self.buf[5:9], "big")
            self.buf = self.buf[9 + length:]
            if ftype == http2.PING and flags & http2.ACK:
                self.ping_acks += 1
            if ftype == http2.DATA and flags & http2.END_STREAM:
                self.respond(sid, self.answer(sid))

    def respond(self, sid: int, how: str) -> None:
        if how.startswith("goaway"):
            last = int(how.split(":")[1])
            self.transport.write(http2.frame(http2.GOAWAY, 0, 0, last.to_bytes(4, "big") + bytes(4))
                                 + http2.frame(http2.PING, 0, 0, bytes(8)))
            return
        head = self.encoder.encode([(":status", "200"), ("content-type", "application/grpc")])
        body = rpc_pb2.RangeResponse(count=sid).SerializeToString()
        flag = b"\x01" if how == "compressed" else b"\x00"
        message = flag + len(body).to_bytes(4, "big") + body
        trailers = self.encoder.encode([("grpc-status", "0")])
        self.transport.write(http2.header_frames(head, sid, False, 16384)
                             + http2.frame(http2.DATA, 0, sid, message)
                             + http2.header_frames(trailers, sid, True, 16384))


def test_goaway_and_a_bad_stream_fail_only_the_calls_they_concern():
    """After GOAWAY the streams the server still serves get their answers
    (the connection still acknowledges PINGs), later calls go to a new one; a stream with a message the client
    cannot read fails alone, with INTERNAL."""
    async def main() -> None:
        connections = []
        held: list[int] = []

        def make():
            def answer(sid: int) -> str:
                if len(connections) == 1:
                    if sid == 1:
                        return "compressed"
                    if sid in (3, 5):  # held back, answered after the GOAWAY below
                        held.append(sid)
                        return "hold"
                    return "goaway:5"  # stream 7: beyond what the server serves
                return "ok"
            protocol = _ScriptedServer(answer)
            connections.append(protocol)
            return protocol

        server = await asyncio.get_running_loop().create_server(make, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        kv = rpc_pb2_grpc.KVStub(lean_grpc.Channel(f"127.0.0.1:{port}"))
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await kv.Range(rpc_pb2.RangeRequest(key=b"a"), timeout=5)
        assert bad.value.code() == grpc.StatusCode.INTERNAL
        calls = [asyncio.ensure_future(kv.Range(rpc_pb2.RangeRequest(key=b"a"), timeout=5)) for _ in range(3)]
        async def both_held() -> None:
            while len(held) < 2:
                await asyncio.sleep(0.01)
        await asyncio.wait_for(both_held(), 5)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await calls[2]  # stream 7, which the GOAWAY did not cover
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        async def ping_acked() -> None:  # the connection still talks: a graceful GOAWAY awaits this
            while connections[0].ping_acks == 0:
                await asyncio.sleep(0.01)
        await asyncio.wait_for(ping_acked(), 5)
        for sid in held:  # the server still answers 3 and 5 on the old connection
            connections[0].respond(sid, "ok")
        assert [r.count for r in await asyncio.gather(*calls[:2])] == [3, 5]
        assert (await kv.Range(rpc_pb2.RangeRequest(key=b"a"), timeout=5)).count == 1  # a new connection
        assert len(connections) == 2
        server.close()
    asyncio.run(main())
