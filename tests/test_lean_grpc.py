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
