#!/usr/bin/env python3
"""Put throughput and latency against a running cluster (a benchmark, not a test).

    python bench/put_bench.py --endpoints 127.0.0.1:2379 --clients 100 --duration 10

Spreads `--clients` concurrent writers over the endpoints (one gRPC channel
per endpoint per 50 clients), each putting keys of `--key-size` bytes and
values of `--value-size` bytes as fast as answers come back, and prints
writes/s with p50/p90/p99/max latency. With --start N it first starts an
N-member cluster (metastore.testing.LocalCluster) on free ports and
measures that, once per engine (memory, rocksdb) and durability (durable,
--unsafe-no-fsync) unless --engine / --fsync pick one, printing one table row
each.

    python bench/put_bench.py --start 3 --clients 100 --duration 10
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

import grpc

import lean_grpc
from metastore.api.pb import rpc_pb2, rpc_pb2_grpc


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


async def run(endpoints: list[str], clients: int, duration: float, key_size: int, value_size: int,
              total: int | None, client: str = "lean") -> dict:
    channels_per_ep = max(1, clients // 50 // max(1, len(endpoints)))
    channels = [lean_grpc.connect(ep, client) for ep in endpoints for _ in range(channels_per_ep)]
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


ENGINES = ("memory", "rocksdb")
MODES = ("durable", "no-fsync")


def measure_started(size: int, engine: str, mode: str, ns: argparse.Namespace) -> dict:
    """Start a fresh `size`-member cluster of `engine`, benchmark it, stop it."""
    from metastore.testing import LocalCluster

    extra = ["--unsafe-no-fsync"] if mode == "no-fsync" else []
    cluster = LocalCluster(size, engine=engine, extra_args=extra)
    cluster.start()
    try:
        endpoints = [m.endpoint for m in cluster.members]
        return asyncio.run(run(endpoints, ns.clients, ns.duration, ns.key_size, ns.value_size, ns.total,
                               ns.client))
    finally:
        cluster.stop()


def print_table(rows: list[tuple[str, str, dict]]) -> None:
    head = f"{'engine':<8} {'fsync':<9} {'writes/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} " \
           f"{'max ms':>8} {'errors':>6}"
    print(head)
    print("-" * len(head))
    for engine, mode, r in rows:
        print(f"{engine:<8} {mode:<9} {r['writes_per_s']:>9.0f} {r['p50_ms']:>8.2f} {r['p90_ms']:>8.2f} "
              f"{r['p99_ms']:>8.2f} {r['max_ms']:>8.2f} {r['errors']:>6}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--endpoints", default="127.0.0.1:2379", help="comma-separated host:port list")
    ap.add_argument("--start", type=int, default=0, metavar="N",
                    help="start an N-member cluster on free ports for each engine/fsync combination "
                         "and benchmark those instead")
    ap.add_argument("--engine", choices=(*ENGINES, "both"), default="both",
                    help="engine(s) of the clusters --start starts")
    ap.add_argument("--fsync", choices=(*MODES, "both"), default="both",
                    help="durable (the default of a server) and/or --unsafe-no-fsync clusters")
    ap.add_argument("--clients", type=int, default=1)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds to run (ignored with --total)")
    ap.add_argument("--total", type=int, default=None, help="stop after this many puts")
    ap.add_argument("--key-size", type=int, default=32)
    ap.add_argument("--client", choices=lean_grpc.CLIENTS, default="lean",
                    help="gRPC client of the load: lean (bench/lean_grpc.py) or grpcio (grpc.aio)")
    ap.add_argument("--value-size", type=int, default=256)
    ns = ap.parse_args()

    print(f"clients={ns.clients} key={ns.key_size}B value={ns.value_size}B "
          + (f"total={ns.total}" if ns.total else f"duration={ns.duration:g}s"))
    if ns.start:
        engines = ENGINES if ns.engine == "both" else (ns.engine,)
        modes = MODES if ns.fsync == "both" else (ns.fsync,)
        rows = [(e, m, measure_started(ns.start, e, m, ns)) for e in engines for m in modes]
        print(f"{ns.start}-member clusters started on loopback")
    else:
        endpoints = [e.strip() for e in ns.endpoints.split(",") if e.strip()]
        res = asyncio.run(run(endpoints, ns.clients, ns.duration, ns.key_size, ns.value_size, ns.total,
                              ns.client))
        rows = [("?", "?", res)]
        print(f"endpoints={','.join(endpoints)} (engine and fsync: as the servers were started)")
    print_table(rows)
    return 1 if any(r["errors"] for _, _, r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
