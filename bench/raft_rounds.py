#!/usr/bin/env python3
"""What one Raft round costs, without gRPC (a benchmark, not a test).

    python bench/raft_rounds.py                  # ~15 s
    python bench/raft_rounds.py --ops 5000 --payload 300

Starts three `metastore.raft.RaftNode`s, each in a process of its own, on
free loopback ports with durable journals (fsync on) in a temporary
directory, and no store: an applied entry is only counted. Then, from one
member at a time, it runs one operation after the other and prints the
operations per second and the CPU time (user + system, from /proc) each of
the three processes spent per operation:

- read on a follower / read on the leader: `RaftNode.read_barrier`, the
  ReadIndex confirmation a linearizable read waits for;
- write on a follower / write on the leader: `RaftNode.submit` of a
  PAYLOAD-byte entry, until it is applied on the member that proposed it.

One operation at a time, nothing shares a round: this is the fixed cost
of the Raft layer (its messages, wakeups and fsyncs), which batching
spreads over many requests under load -- the figure to compare before and
after a change to raft/ (run it a few times: on a shared machine both
columns move by ~20 % between runs).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection

from metastore.cluster import Membership
from metastore.raft import RaftConfig, RaftNode
from metastore.testing import free_ports
from workloads import process_cpu_seconds

OP_TIMEOUT = 5.0


def member(index: int, addresses: list[str], data_dir: str, conn: Connection) -> None:
    """One member's process: a RaftNode, driven by commands from the parent."""
    membership = Membership("bench", {f"m{i}": [f"http://{a}"] for i, a in enumerate(addresses)})
    cfg = RaftConfig(self_address=addresses[index],
                     partner_addresses=[a for a in addresses if a != addresses[index]],
                     bind_address=addresses[index], journal_file=os.path.join(data_dir, f"m{index}.log"))
    node = RaftNode(cfg, index + 1, membership.id_of_address, lambda payload, raft_index: raft_index)
    node.start()
    try:
        while True:
            command, arg = conn.recv()
            if command == "is_leader":
                conn.send(node.is_leader())
            elif command in ("read", "write"):
                conn.send(run_ops(node, command, *arg))
            else:
                break
    finally:
        node.stop()


def run_ops(node: RaftNode, kind: str, ops: int, payload_size: int) -> tuple[float, int]:
    """`ops` reads or writes one after the other: (seconds, failures)."""
    finished = threading.Event()
    failures = 0
    payload = b"x" * payload_size

    def read_done(error: object) -> None:
        nonlocal failures
        failures += error is not None
        finished.set()

    def write_done(_result: object, error: object) -> None:
        read_done(error)

    start = time.perf_counter()
    for _ in range(ops):
        finished.clear()
        if kind == "read":
            node.read_barrier(read_done)
        else:
            node.submit(payload, write_done)
        if not finished.wait(OP_TIMEOUT):
            failures += 1
    return time.perf_counter() - start, failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=3000, help="operations per row (default 3000)")
    parser.add_argument("--payload", type=int, default=300, help="bytes per written entry (default 300)")
    args = parser.parse_args()

    addresses = [f"127.0.0.1:{port}" for port in free_ports(3)]
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="raft-rounds-") as data_dir:
        pipes = [ctx.Pipe() for _ in addresses]
        procs = [ctx.Process(target=member, args=(i, addresses, data_dir, child), daemon=True)
                 for i, (_parent, child) in enumerate(pipes)]
        for proc in procs:
            proc.start()
        try:
            leader = wait_for_leader([parent for parent, _child in pipes])
            if leader is None:
                print("no leader elected within 20 s", file=sys.stderr)
                return 1
            follower = (leader + 1) % 3
            parent_of = [parent for parent, _child in pipes]
            # Warm up: every member connected and holding the leader's first entry.
            for who in (leader, follower):
                parent_of[who].send(("write", (20, args.payload)))
                parent_of[who].recv()
            other = 3 - leader - follower
            print(f"{'row':<20} {'ops/s':>8} {'CPU us/op':>10}  {'leader':>7} {'follower':>8} {'other':>7}")
            for kind in ("read", "write"):
                for who, where in ((follower, "follower"), (leader, "leader")):
                    before = [process_cpu_seconds(p.pid) for p in procs]
                    parent_of[who].send((kind, (args.ops, args.payload)))
                    seconds, failures = parent_of[who].recv()
                    spent = [process_cpu_seconds(p.pid) - b for p, b in zip(procs, before)]
                    per_op = [s / args.ops * 1e6 for s in spent]
                    print(f"{kind + ' on ' + where:<20} {args.ops / seconds:>8.0f} {sum(per_op):>10.0f}  "
                          f"{per_op[leader]:>7.0f} {per_op[follower]:>8.0f} {per_op[other]:>7.0f}"
                          + (f"  ({failures} failed)" if failures else ""))
            print("(CPU us/op: all three processes, then each; 'follower' is the one the follower "
                  "rows run on, 'other' the follower no row runs on)")
        finally:
            for parent, _child in pipes:
                try:
                    parent.send(("stop", None))
                except OSError:
                    pass
            for proc in procs:
                proc.join(10)
                if proc.is_alive():
                    proc.kill()
    return 0


def wait_for_leader(parents: list[Connection], timeout: float = 20.0) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for i, parent in enumerate(parents):
            parent.send(("is_leader", None))
            if parent.recv():
                return i
        time.sleep(0.1)
    return None


if __name__ == "__main__":
    sys.exit(main())
