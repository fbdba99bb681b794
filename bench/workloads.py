"""The workloads bench/compare.py runs against metastore and etcd alike.

Everything speaks etcd's v3 gRPC API through metastore's generated stubs,
on the lean client of bench/lean_grpc.py (or grpc.aio with --client grpcio),
so the very same client code measures both servers: any difference in the
numbers is the server's. `etcdctl check perf` is run as
etcdctl itself, since it is the check operators actually use.

Each workload returns a plain dict (JSON-ready) of its measurements;
measured() adds the CPU it cost the client (this process) and the servers
(see CpuMeter for why both matter on a machine they share).
"""
from __future__ import annotations

import array
import asyncio
import contextlib
import os
import re
import resource
import shutil
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import grpc

import lean_grpc
from metastore.api.pb import rpc_pb2, rpc_pb2_grpc
from put_bench import percentile

VALUE_SIZE = 256
CHECK_PERF_PREFIX = b"/etcdctl-check-perf/"
# etcdctl 3.4 runs each load for 60 s; allow for setup, the final delete and a slow server.
CHECK_PERF_TIMEOUT = 240.0


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads, including gRPC's)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of another process, from /proc/<pid>/stat (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


class CpuMeter:
    """CPU cores used meanwhile by this process (the client) and by the servers.

    Both share the machine, so `client_cpu` near 1.0 says the Python client may be
    what limits the rate; `server_cpu` (summed over members) says how much work
    the servers did for it: compare it per request between metastore and etcd."""

    def __init__(self, server_pids: list[int]) -> None:
        self.pids = server_pids
        self.t0 = time.perf_counter()
        self.client0 = cpu_seconds()
        self.server0 = sum(process_cpu_seconds(p) for p in server_pids)

    def result(self) -> dict:
        wall = time.perf_counter() - self.t0
        server = sum(process_cpu_seconds(p) for p in self.pids) - self.server0
        return {"client_cpu": (cpu_seconds() - self.client0) / wall if wall else 0.0,
                "server_cpu": server / wall if wall else 0.0, "server_cpu_seconds": server}


async def measured(coro: Awaitable[dict], server_pids: list[int]) -> dict:
    """Run a workload and add the CPU it cost, client and servers, to its result."""
    meter = CpuMeter(server_pids)
    result = await coro
    result.update(meter.result())
    return result


def open_channels(endpoints: list[str], clients: int, client: str) -> list[Any]:
    """One channel per endpoint per 50 clients (at least one each), as put_bench does,
    so that no single HTTP/2 connection serialises hundreds of clients."""
    per_endpoint = max(1, clients // 50 // max(1, len(endpoints)))
    return [lean_grpc.connect(ep, client) for ep in endpoints for _ in range(per_endpoint)]


async def close_channels(channels: list[Any]) -> None:
    for ch in channels:
        await ch.close()


async def statuses(endpoints: list[str]) -> dict[str, rpc_pb2.StatusResponse]:
    """Maintenance.Status of every member that answers within 5 s."""
    out = {}
    for ep in endpoints:
        async with grpc.aio.insecure_channel(ep) as ch:
            with contextlib.suppress(grpc.aio.AioRpcError):
                out[ep] = await rpc_pb2_grpc.MaintenanceStub(ch).Status(rpc_pb2.StatusRequest(), timeout=5)
    return out


async def find_leader(endpoints: list[str], timeout: float = 30.0) -> str:
    """The endpoint of the member that currently leads (Status.leader == its member id),
    waiting out an election in progress.

    Single-client workloads talk to the leader so that neither system pays
    (or is spared) a follower's forwarding hop by chance of endpoint order."""
    deadline = time.monotonic() + timeout
    while True:
        for ep, status in (await statuses(endpoints)).items():
            if status.leader and status.leader == status.header.member_id:
                return ep
        if time.monotonic() > deadline:
            raise RuntimeError(f"no leader among {endpoints} after {timeout:g} s")
        await asyncio.sleep(0.2)


async def wait_healthy(endpoints: list[str], timeout: float = 60.0) -> float:
    """Wait until there is a leader and a linearizable read through it succeeds;
    returns the seconds waited. Run before each workload, so that one
    workload's aftermath (an election, a long apply) is not charged to the next."""
    t0 = time.perf_counter()
    leader = await find_leader(endpoints, timeout)
    async with grpc.aio.insecure_channel(leader) as ch:
        while True:
            try:
                await rpc_pb2_grpc.KVStub(ch).Range(rpc_pb2.RangeRequest(key=b"health"), timeout=5)
                return time.perf_counter() - t0
            except grpc.aio.AioRpcError:
                if time.perf_counter() - t0 > timeout:
                    raise
                await asyncio.sleep(0.2)


async def raft_term(endpoints: list[str]) -> int:
    """The highest Raft term the members report: each election bumps it, so the
    difference over a run counts the leader elections the load caused."""
    return max((st.header.raft_term for st in (await statuses(endpoints)).values()), default=0)


async def put_once(endpoint: str, key: bytes, value: bytes) -> None:
    async with grpc.aio.insecure_channel(endpoint) as ch:
        await rpc_pb2_grpc.KVStub(ch).Put(rpc_pb2.PutRequest(key=key, value=value), timeout=10)


async def idle(seconds: float) -> dict:
    """No client at all for `seconds`: measured() then shows what the servers
    burn on their own (heartbeats, tick loops), the floor under every other row."""
    await asyncio.sleep(seconds)
    return {"seconds": seconds}


# -- range reads ---------------------------------------------------------------

async def range_reads(endpoints: list[str], clients: int, duration: float, serializable: bool,
                      client: str = "lean") -> dict:
    """`clients` concurrent readers, each issuing Range on one pre-written key as fast
    as answers come back, spread over all members.

    Linearizable reads need a round of Raft (etcd's ReadIndex, metastore's read
    barrier) per batch of reads; serializable ones are answered locally. The gap
    between the two rows is the cost of that round."""
    key = b"bench/read-key"
    await put_once(endpoints[0], key, os.urandom(VALUE_SIZE))
    channels = open_channels(endpoints, clients, client)
    stubs = [rpc_pb2_grpc.KVStub(ch) for ch in channels]
    request = rpc_pb2.RangeRequest(key=key, serializable=serializable)
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + duration

    async def reader(i: int) -> None:
        nonlocal errors
        stub = stubs[i % len(stubs)]
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                resp = await stub.Range(request, timeout=10)
                if resp.count != 1:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - t0)
            except grpc.aio.AioRpcError:
                errors += 1

    start = time.perf_counter()
    try:
        await asyncio.gather(*(reader(i) for i in range(clients)))
    finally:
        await close_channels(channels)
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {"reads": len(latencies), "errors": errors, "seconds": elapsed,
            "reads_per_s": len(latencies) / elapsed if elapsed else 0.0,
            "p50_ms": percentile(latencies, 50) * 1000, "p99_ms": percentile(latencies, 99) * 1000}


# -- watch fan-out --------------------------------------------------------------

@dataclass
class FanOutTally:
    """What the watchers have received, shared by all their streams."""

    watchers: int
    received: int = 0
    expected: int | None = None  # known once the writer stops: puts x watchers
    last_event_at: float = 0.0
    lags: array.array = field(default_factory=lambda: array.array("d"))
    all_in: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, resp: rpc_pb2.WatchResponse) -> None:
        now = time.perf_counter()
        for ev in resp.events:
            # Each value starts with the writer's perf_counter() at send time
            # (same process, same clock): lag = send-to-delivery, commit included.
            self.lags.append(now - struct.unpack_from("<d", ev.kv.value)[0])
        self.received += len(resp.events)
        if resp.events:
            self.last_event_at = now
        self.check()

    def check(self) -> None:
        if self.expected is not None and self.received >= self.expected:
            self.all_in.set()


async def watch_stream(stub: rpc_pb2_grpc.WatchStub, key: bytes, watchers: int, tally: FanOutTally,
                       created: Callable[[], None]) -> None:
    """One bidi Watch stream carrying `watchers` watches of `key` (as etcd clients
    multiplex watchers on a stream); feeds every event into `tally` until cancelled."""
    call = stub.Watch()
    for _ in range(watchers):
        await call.write(rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(key=key)))
    try:
        while True:
            resp = await call.read()
            if resp is grpc.aio.EOF:
                return
            if resp.created:
                created()
            if resp.canceled:
                raise RuntimeError(f"watch {resp.watch_id} canceled: {resp.cancel_reason}")
            tally.add(resp)
    finally:
        call.cancel()


async def watch_fanout(endpoints: list[str], watchers: int, streams: int, duration: float,
                       rate: float, drain_timeout: float, client: str = "lean") -> dict:
    """1 writer, `watchers` watchers of one key spread over `streams` Watch streams
    over all members. The writer puts sequentially (to the leader) at `rate` puts/s
    (0: as fast as it can) for `duration`; then we wait up to `drain_timeout` for
    every event to arrive.

    events/s = events delivered / (first put .. last event delivered). While the
    watch path keeps up it is rate x watchers and the lag stays near a put's
    latency; when it does not, events/s is its capacity and the lag grows with
    the backlog."""
    key = b"bench/watch-key"
    leader = await find_leader(endpoints)
    channels = [lean_grpc.connect(ep, client) for ep in endpoints]
    tally = FanOutTally(watchers)
    ready = asyncio.Event()
    created = 0

    def on_created() -> None:
        nonlocal created
        created += 1
        if created == watchers:
            ready.set()

    per_stream = [watchers // streams + (1 if i < watchers % streams else 0) for i in range(streams)]
    tasks = [asyncio.ensure_future(watch_stream(rpc_pb2_grpc.WatchStub(channels[i % len(channels)]), key,
                                                n, tally, on_created))
             for i, n in enumerate(per_stream) if n]
    try:
        await wait_or_fail(ready, tasks, 60, f"{watchers} watches to be created")
        puts, put_errors, first_put, last_put = await timestamped_writer(leader, key, duration, rate, client)
        tally.expected = puts * watchers
        tally.check()
        try:
            await wait_or_fail(tally.all_in, tasks, drain_timeout, "every event to be delivered")
        except TimeoutError:
            pass  # reported as missing events
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close_channels(channels)
    lags = sorted(tally.lags)
    span = (tally.last_event_at - first_put) if tally.received else 0.0
    return {"watchers": watchers, "streams": len(tasks), "rate": rate, "puts": puts, "put_errors": put_errors,
            "puts_per_s": puts / (last_put - first_put) if last_put > first_put else 0.0,
            "events": tally.received, "events_expected": tally.expected,
            "missing": max(0, tally.expected - tally.received), "errors": put_errors,
            "events_per_s": tally.received / span if span > 0 else 0.0,
            "lag_p50_ms": percentile(lags, 50) * 1000, "lag_p99_ms": percentile(lags, 99) * 1000,
            "lag_max_ms": (lags[-1] * 1000) if lags else 0.0}


async def wait_or_fail(event: asyncio.Event, tasks: list[asyncio.Future], timeout: float, what: str) -> None:
    """Wait for `event`, but surface at once an error of any watch stream task
    (instead of waiting out the timeout), and raise TimeoutError after `timeout`."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait([waiter, *tasks], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t is not waiter:
                raise t.exception() or RuntimeError(f"a watch stream ended while waiting for {what}")
        if waiter not in done:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
    finally:
        waiter.cancel()


async def timestamped_writer(endpoint: str, key: bytes, duration: float,
                             rate: float, client: str) -> tuple[int, int, float, float]:
    """Sequential puts to `key` for `duration` s, at most `rate` a second (0: no
    limit), each value stamped with its send time.
    Returns (acknowledged puts, errors, time of first put, time of last ack)."""
    pad = os.urandom(VALUE_SIZE - 8)
    puts = errors = 0
    async with lean_grpc.connect(endpoint, client) as ch:
        stub = rpc_pb2_grpc.KVStub(ch)
        first = time.perf_counter()
        deadline = first + duration
        while time.perf_counter() < deadline:
            if rate:  # the n-th put is due at first + n/rate; a late one goes at once
                await asyncio.sleep(max(0.0, first + (puts + errors) / rate - time.perf_counter()))
            value = struct.pack("<d", time.perf_counter()) + pad
            try:
                await stub.Put(rpc_pb2.PutRequest(key=key, value=value), timeout=10)
                puts += 1
            except grpc.aio.AioRpcError:
                errors += 1
        return puts, errors, first, time.perf_counter()


# -- etcdctl check perf ----------------------------------------------------------

def etcdctl_binary() -> str | None:
    return shutil.which("etcdctl")


async def clear_prefix(endpoint: str, prefix: bytes, timeout: float = 60.0) -> None:
    """Delete every key under `prefix`: check perf refuses to start on a
    non-empty prefix (e.g. left by an interrupted earlier load)."""
    request = rpc_pb2.DeleteRangeRequest(key=prefix, range_end=prefix[:-1] + bytes([prefix[-1] + 1]))
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(endpoint) as ch:
        while True:
            try:
                await rpc_pb2_grpc.KVStub(ch).DeleteRange(request, timeout=10)
                return
            except grpc.aio.AioRpcError:  # e.g. an election: retry until the deadline
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(1)


async def check_perf(endpoints: list[str], load: str) -> dict:
    """`etcdctl check perf --load=LOAD` against all members; parses its verdict lines.

    etcdctl 3.4 prints e.g. "PASS: Throughput is 151 writes/s" or "FAIL: Throughput
    too low: 12 writes/s", "PASS: Slowest request took 0.08s" or "Slowest request
    took too long: 0.9s", the same for Stddev, and a final PASS or FAIL.
    (etcdctl is the client here, so measured()'s client_cpu is ~0.)

    --auto-compact: check perf deletes its keys afterwards, but their history
    stays until a compaction, and etcd 3.4 (no auto-compaction by default) then
    serves reads several times slower (measured: ~2,700 -> ~300 linearizable
    reads/s after 60k deleted keys, back to ~2,800 once compacted). Compacting
    keeps the next rows about the workload, not about check perf's leftovers."""
    exe = etcdctl_binary()
    if exe is None:
        return {"skipped": "etcdctl not found"}
    await clear_prefix(endpoints[0], CHECK_PERF_PREFIX)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
    env["ETCDCTL_API"] = "3"
    proc = await asyncio.create_subprocess_exec(
        exe, "--endpoints", ",".join(endpoints), "check", "perf", f"--load={load}", "--auto-compact",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env)
    try:
        stdout, _ = await asyncio.wait_for(proc.communicate(), CHECK_PERF_TIMEOUT)
    finally:  # timeout, Ctrl-C, SIGTERM: etcdctl must not outlive the harness
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    output = stdout.decode(errors="replace")
    result = {**parse_check_perf(output), "exit_code": proc.returncode}
    if result["verdict"] != "PASS":
        result["output"] = output[-2000:]
    return result


def parse_check_perf(output: str) -> dict:
    def number(pattern: str) -> float | None:
        m = re.search(pattern, output)
        return float(m.group(1)) if m else None

    lines = [line.strip() for line in output.splitlines()]
    verdicts = [line for line in lines if line in ("PASS", "FAIL")]
    # etcdctl gave up before its verdict, e.g. "Error: etcdserver: request timed out"
    # from the final delete of the prefix: the load ran, but no result was printed.
    error = next((line for line in reversed(lines) if line.startswith("Error:")), None)
    slowest = number(r"Slowest request took(?: too long:)? ([0-9.]+)s")
    stddev = number(r"Stddev (?:is|too high:) ([0-9.]+)s")
    return {
        "verdict": verdicts[-1] if verdicts else "ERROR" if error else None,
        "error": error,
        "writes_per_s": number(r"Throughput (?:is|too low:) ([0-9]+) writes/s"),
        "slowest_ms": slowest * 1000 if slowest is not None else None,
        "stddev_ms": stddev * 1000 if stddev is not None else None,
        "errors": len(re.findall(r"FAIL: ERROR", output)),
        "failures": [line for line in lines if "FAIL:" in line or "too long" in line or "too high" in line],
    }
