#!/usr/bin/env python3
"""Put throughput and latency against a running cluster (a benchmark, not a test).

    python bench/put_bench.py --endpoints 127.0.0.1:2379 --clients 100 --duration 10

Spreads `--clients` concurrent writers over the endpoints (one gRPC channel
per endpoint per 50 clients), each putting keys of `--key-size` bytes and
values of `--value-size` bytes as fast as answers come back, and prints
writes/s with p50/p90/p99/max latency. With --start N it first starts an
N-member cluster (metastore.testing.LocalCluster) on free ports and
measures that.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

import grpc

from metastore.api.pb import rpc_pb2, rpc_pb2_grpc


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


async def run(endpoints: list[str], clients: int, duration: float, key_size: int, value_size: int,
              total: int | None) -> dict:
    channels_per_ep = max(1, clients // 50 // max(1, len(endpoints)))
    channels = [grpc.aio.insecure_channel(ep) for ep in endpoints for _ in range(channels_per_ep)]
    stubs = [rpc_pb2_grpc.KVStub(ch) for ch in channels]
    value = os.urandom(value_size // 2 + 1).hex()[:value_size].encode()
    latencies: list[float] = []
    errors = 0
    counter = 0
    deadline = time.perf_counter() + duration

    async def writer(i: int) -> None:
        nonlocal errors, counter
        stub = stubs[i % len(stubs)]
        while True:
            if total is not None:
                if counter >= total:
                    return
            elif time.perf_counter() >= deadline:
                return
            n = counter
            counter += 1
            key = f"bench/{i:05d}/{n:010d}".encode().ljust(key_size, b"k")[:max(key_size, 1)]
            t0 = time.perf_counter()
            try:
                await stub.Put(rpc_pb2.PutRequest(key=key, value=value), timeout=10)
                latencies.append(time.perf_counter() - t0)
            except grpc.aio.AioRpcError:
                errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(writer(i) for i in range(clients)))
    elapsed = time.perf_counter() - start
    for ch in channels:
        await ch.close()
    latencies.sort()
    return {
        "writes": len(latencies), "errors": errors, "seconds": elapsed,
        "writes_per_s": len(latencies) / elapsed if elapsed else 0.0,
        "p50_ms": percentile(latencies, 50) * 1000, "p90_ms": percentile(latencies, 90) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000, "max_ms": (latencies[-1] * 1000) if latencies else 0.0,
        "mean_ms": statistics.fmean(latencies) * 1000 if latencies else 0.0,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--endpoints", default="127.0.0.1:2379", help="comma-separated host:port list")
    ap.add_argument("--start", type=int, default=0, metavar="N",
                    help="start an N-member cluster on free ports and benchmark it instead")
    ap.add_argument("--engine", default="memory", help="engine of the cluster --start starts")
    ap.add_argument("--clients", type=int, default=1)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds to run (ignored with --total)")
    ap.add_argument("--total", type=int, default=None, help="stop after this many puts")
    ap.add_argument("--key-size", type=int, default=32)
    ap.add_argument("--value-size", type=int, default=256)
    ns = ap.parse_args()

    cluster = None
    endpoints = [e.strip() for e in ns.endpoints.split(",") if e.strip()]
    if ns.start:
        from metastore.testing import LocalCluster

        cluster = LocalCluster(ns.start, engine=ns.engine)
        cluster.start()
        endpoints = [m.endpoint for m in cluster.members]
    try:
        res = asyncio.run(run(endpoints, ns.clients, ns.duration, ns.key_size, ns.value_size, ns.total))
    finally:
        if cluster is not None:
            cluster.stop()
    print(f"endpoints={','.join(endpoints)} clients={ns.clients} key={ns.key_size}B value={ns.value_size}B")
    print(f"writes={res['writes']} errors={res['errors']} time={res['seconds']:.2f}s "
          f"throughput={res['writes_per_s']:.0f} writes/s")
    print(f"latency ms: mean={res['mean_ms']:.2f} p50={res['p50_ms']:.2f} p90={res['p90_ms']:.2f} "
          f"p99={res['p99_ms']:.2f} max={res['max_ms']:.2f}")
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
