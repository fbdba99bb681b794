#!/usr/bin/env python3
"""How much memory a member needs for many keys (a benchmark, not a test).

    python bench/scale.py --engine memory --keys 1000000     # ~1.5 min
    python bench/scale.py --engine rocksdb --keys 5000000    # ~5 min

Starts a fresh durable 3-member cluster (metastore.testing.LocalCluster),
loads KEYS keys with VALUE_SIZE-byte values through Txns of 128 puts from 16
concurrent clients, then writes enough single puts for every member to take
a Raft snapshot of the whole store (--snapshot-count requests; 10,000 here
unless given) and waits for
it to be written. Prints, per member, the resident size after loading, after
the snapshot, and the peak (VmHWM: the most the process ever held, which is
what a machine must have room for). Every cluster is stopped and its data
removed on exit.
"""
from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import sys
import time

import grpc

from metastore.api.pb import rpc_pb2, rpc_pb2_grpc
from metastore.testing import LocalCluster

TXN_OPS = 128  # etcd's default --max-txn-ops
CLIENTS = 16


def proc_kib(pid: int, field: str) -> int | None:
    """A VmRSS / VmHWM line of /proc/<pid>/status, in KiB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


async def load(endpoints: list[str], keys: int, value_size: int) -> float:
    """Put keys "scale/%010d" through Txns; returns the seconds it took."""
    channels = [grpc.aio.insecure_channel(endpoints[i % len(endpoints)]) for i in range(CLIENTS)]
    stubs = [rpc_pb2_grpc.KVStub(c) for c in channels]
    value = b"v" * value_size
    next_key = 0
    began = time.monotonic()

    async def client(stub: rpc_pb2_grpc.KVStub) -> None:
        nonlocal next_key
        while next_key < keys:
            first = next_key
            next_key = min(keys, first + TXN_OPS)
            ops = [rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=b"scale/%010d" % k, value=value))
                   for k in range(first, next_key)]
            await stub.Txn(rpc_pb2.TxnRequest(success=ops), timeout=60)

    try:
        await asyncio.gather(*(client(s) for s in stubs))
    finally:
        for c in channels:
            await c.close()
    return time.monotonic() - began


async def single_puts(endpoint: str, count: int) -> None:
    """`count` sequential-ish puts (8 in flight): one Raft entry each, to reach a snapshot."""
    async with grpc.aio.insecure_channel(endpoint) as channel:
        stub = rpc_pb2_grpc.KVStub(channel)
        sem = asyncio.Semaphore(8)

        async def put(i: int) -> None:
            async with sem:
                await stub.Put(rpc_pb2.PutRequest(key=b"scale-tick/%d" % (i % 100), value=b"x"), timeout=60)

        await asyncio.gather(*(put(i) for i in range(count)))


def snapshot_files(cluster: LocalCluster) -> dict[str, float]:
    """Each member's Raft snapshot file modification time (0: none yet)."""
    out = {}
    for m in cluster.members:
        paths = glob.glob(os.path.join(m.data_dir, "member", "raft.snapshot"))
        out[m.name] = os.path.getmtime(paths[0]) if paths else 0.0
    return out


def log_sizes(cluster: LocalCluster) -> dict[str, int]:
    """Each member's Raft log file size: it shrinks once a snapshot let the
    member drop the entries before it, which is also when their memory goes."""
    out = {}
    for m in cluster.members:
        try:
            out[m.name] = os.path.getsize(os.path.join(m.data_dir, "member", "raft.log"))
        except OSError:
            out[m.name] = 0
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=("memory", "rocksdb"), default="memory")
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--value-size", type=int, default=256)
    ap.add_argument("--snapshot-count", type=int, default=10_000, help="as `metastore serve --snapshot-count`")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    result: dict = {"engine": args.engine, "keys": args.keys, "value_size": args.value_size}
    with LocalCluster(3, engine=args.engine, extra_args=["--snapshot-count", str(args.snapshot_count)]) as cluster:
        pids = {m.name: m.proc.pid for m in cluster.members}
        endpoints = [m.endpoint for m in cluster.members]
        result["load_seconds"] = round(asyncio.run(load(endpoints, args.keys, args.value_size)), 1)
        result["rss_loaded_mib"] = {n: proc_kib(p, "VmRSS") // 1024 for n, p in pids.items()}
        before, logs_before = snapshot_files(cluster), log_sizes(cluster)
        asyncio.run(single_puts(endpoints[0], args.snapshot_count + 100))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            after, logs = snapshot_files(cluster), log_sizes(cluster)
            # Written, and the log before it dropped (a moment later).
            if all(after[n] > before[n] and logs[n] < logs_before[n] for n in after):
                break
            time.sleep(0.5)
        else:
            print("warning: not every member wrote a snapshot and trimmed its log within 300 s",
                  file=sys.stderr)
        # The freed log goes back to the system on a thread of its own
        # (metastore.heap): wait until no member's resident size still falls.
        settled_by = time.monotonic() + 10
        rss = {n: proc_kib(p, "VmRSS") for n, p in pids.items()}
        while time.monotonic() < settled_by:
            time.sleep(1)
            now = {n: proc_kib(p, "VmRSS") for n, p in pids.items()}
            if all((now[n] or 0) >= (rss[n] or 0) for n in now):
                break
            rss = now
        result["rss_after_snapshot_mib"] = {n: proc_kib(p, "VmRSS") // 1024 for n, p in pids.items()}
        result["peak_rss_mib"] = {n: proc_kib(p, "VmHWM") // 1024 for n, p in pids.items()}
    print(f"{args.engine}: {args.keys:,} keys of {args.value_size} B loaded in {result['load_seconds']} s")
    for label, field in (("RSS after loading", "rss_loaded_mib"), ("RSS after a snapshot", "rss_after_snapshot_mib"),
                         ("peak RSS (VmHWM)", "peak_rss_mib")):
        print(f"  {label:22} " + "  ".join(f"{n} {v:,} MiB" for n, v in result[field].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
