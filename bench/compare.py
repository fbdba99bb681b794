#!/usr/bin/env python3
"""metastore vs etcd 3.4: the same workloads against both, side by side (a benchmark, not a test).

    python bench/compare.py                 # memory + rocksdb + etcd, ~8-9 min
    python bench/compare.py --quick         # smoke run, ~4 min (check perf alone is 60 s a load)
    python bench/compare.py --engine rocksdb --perf-loads none --json out.json

For each metastore engine it starts a fresh 3-member cluster on loopback
(metastore.testing.LocalCluster, durable: fsync on), and, when Debian's
`etcd` binary (package etcd-server) is installed, a fresh 3-member etcd
cluster the same way (metastore/testing_etcd.py); without it the etcd columns
are left out. Against each it runs, in order:

  0. idle: no client for a few seconds (the servers' own CPU floor)
  1. etcdctl check perf --load=s|m|l|xl   (60 s each; --perf-loads)
  2. sequential put, 1 client, to the leader: writes/s, p50/p99
  3. put with 100 and 500 concurrent clients over all members (put_bench.run)
  4. Range on one key, 100 concurrent clients, linearizable and serializable
  5. watch fan-out: 1 writer (paced, --watch-rate) and 1000 watchers of its
     key over 20 Watch streams: events/s delivered, p99 put-to-delivery lag

then reads each member's RSS, stops the cluster, and finally prints one
table with a metastore/etcd ratio per engine. Besides rates and latencies
each workload reports the servers' CPU per request (from /proc), which does
not depend on how fast the one Python client process can go. Every cluster
is stopped and its data removed on exit, Ctrl-C and SIGTERM included.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from typing import Awaitable, Callable, Iterator

import lean_grpc
import put_bench
import workloads
from metastore.testing import LocalCluster
from metastore.testing_etcd import EtcdCluster, etcd_binary, etcd_version

ENGINES = ("memory", "rocksdb")
PERF_LOADS = ("s", "m", "l", "xl")


@dataclass
class Settings:
    """How long and how hard each workload runs (--quick shortens all of them)."""

    quick: bool
    perf_loads: list[str]
    duration: float          # seconds per put / read workload
    idle: float              # seconds of the idle baseline
    watch_rate: float        # puts/s of the watch writer (0: as fast as it can)
    watch_drain: float       # seconds allowed after the writer stops for every event to arrive
    put_clients: list[int]
    read_clients: int
    watchers: int
    watch_streams: int
    client: str = "lean"     # the load's gRPC client (bench/lean_grpc.py): lean or grpcio
    key_size: int = 32
    value_size: int = workloads.VALUE_SIZE


@dataclass
class Target:
    """A running 3-member cluster under test."""

    name: str                        # table column, e.g. "memory" or "etcd"
    system: str                      # "metastore" or "etcd"
    endpoints: list[str]
    pids: Callable[[], dict[str, int]]  # member name -> pid


# -- clusters -------------------------------------------------------------------

@contextlib.contextmanager
def metastore_target(engine: str, keep: str | None) -> Iterator[Target]:
    """A fresh durable 3-member metastore cluster of `engine`, stopped on exit
    (its data and logs kept under `keep`/<engine> when given, else removed)."""
    cluster = LocalCluster(3, engine=engine, base_dir=keep_dir(keep, engine))
    cluster.start()
    try:
        yield Target(engine, "metastore", [m.endpoint for m in cluster.members],
                     lambda: {m.name: m.proc.pid for m in cluster.members if m.running})
    finally:
        cluster.stop()


@contextlib.contextmanager
def etcd_target(exe: str, keep: str | None) -> Iterator[Target]:
    """A fresh 3-member etcd cluster, stopped on exit (kept under `keep`/etcd when given)."""
    with EtcdCluster(3, exe=exe, base_dir=keep_dir(keep, "etcd")) as cluster:
        yield Target("etcd", "etcd", cluster.endpoints, cluster.pids)


def keep_dir(keep: str | None, name: str) -> str | None:
    if keep is None:
        return None
    path = os.path.abspath(os.path.join(keep, name))
    os.makedirs(path, exist_ok=True)
    return path


# -- measuring one target ---------------------------------------------------------

def run_target(target: Target, s: Settings) -> dict:
    """Every workload against one cluster, then its members' RSS."""
    return asyncio.run(run_all(target, s))


# (result key, what it is for the progress log, the workload)
Step = tuple[str, str, Callable[[], Awaitable[dict]]]


def plan(target: Target, s: Settings) -> list[Step]:
    """The workloads, in the order they run."""
    eps = target.endpoints
    steps: list[Step] = [
        ("idle", f"idle, {s.idle:g} s", lambda: workloads.idle(s.idle))]
    for load in s.perf_loads:
        steps.append((f"check_perf_{load}", f"etcdctl check perf --load={load} (60 s)",
                      lambda ld=load: workloads.check_perf(eps, ld)))
    steps.append(("put_1", f"sequential put, 1 client (to the leader), {s.duration:g} s",
                  lambda: put_to_leader(eps, s)))
    for clients in s.put_clients:
        steps.append((f"put_{clients}", f"put, {clients} clients, {s.duration:g} s",
                      lambda c=clients: put_bench.run(eps, c, s.duration, s.key_size, s.value_size, None,
                                                      s.client)))
    for kind in ("linearizable", "serializable"):
        steps.append((f"range_{kind}", f"{kind} range, {s.read_clients} clients, {s.duration:g} s",
                      lambda k=kind: workloads.range_reads(eps, s.read_clients, s.duration, k == "serializable",
                                                           s.client)))
    steps.append(("watch", f"watch fan-out, {s.watchers} watchers, {s.duration:g} s",
                  lambda: workloads.watch_fanout(eps, s.watchers, s.watch_streams, s.duration,
                                                 s.watch_rate, s.watch_drain, s.client)))
    return steps


async def run_all(target: Target, s: Settings) -> dict:
    """Each workload from a healthy cluster (a leader, a linearizable read
    answered), measured with the CPU it cost and the elections it caused. One
    that fails is recorded and skipped: one bad row must not throw away the
    minutes spent on the others."""
    pids = list(target.pids().values())
    out: dict[str, dict] = {}
    for name, what, make in plan(target, s):
        log(f"  {target.name}: {what}")
        try:
            settle = await workloads.wait_healthy(target.endpoints)
            term = await workloads.raft_term(target.endpoints)
            result = await workloads.measured(make(), pids)
            result["elections"] = await workloads.raft_term(target.endpoints) - term
            out[name] = {**result, "settle_s": settle}
        except Exception as exc:  # noqa: BLE001 - reported in the table, the run goes on
            log(f"  {target.name}: {name} FAILED: {exc!r}")
            out[name] = {"failed": f"{type(exc).__name__}: {exc}"}
    return {"system": target.system, "workloads": out, "rss": await member_rss(target)}


async def put_to_leader(endpoints: list[str], s: Settings) -> dict:
    leader = await workloads.find_leader(endpoints)
    return await put_bench.run([leader], 1, s.duration, s.key_size, s.value_size, None, s.client)


def rss_mib(pid: int) -> float | None:
    """VmRSS of a process in MiB, from /proc/<pid>/status (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


async def member_rss(target: Target) -> list[dict]:
    """Each member's RSS after the run, the leader first (it does the most work)."""
    pids = target.pids()
    leader_ep = await workloads.find_leader(target.endpoints)
    rows = [{"member": name, "pid": pid, "endpoint": ep, "leader": ep == leader_ep, "rss_mib": rss_mib(pid)}
            for (name, pid), ep in zip(pids.items(), target.endpoints)]
    return sorted(rows, key=lambda r: not r["leader"])


# -- the table ----------------------------------------------------------------------

@dataclass
class Row:
    label: str
    get: Callable[[dict], object]  # target result -> number, text or None


def w(name: str, field: str) -> Callable[[dict], object]:
    """Getter for results["workloads"][name][field], None when it was not run."""
    return lambda r: r["workloads"].get(name, {}).get(field)


def cpu_per_op(name: str, count_field: str) -> Callable[[dict], object]:
    """Server CPU (all members) per request or event, in microseconds: unlike the
    rates, it does not depend on how fast the shared Python client can go."""
    def get(r: dict) -> float | None:
        res = r["workloads"].get(name, {})
        n = res.get(count_field)
        return res["server_cpu_seconds"] / n * 1e6 if n else None
    return get


def rows_for(s: Settings) -> list[Row]:
    rows: list[Row] = [Row("idle: server CPU cores (3 members)", w("idle", "server_cpu"))]
    for load in s.perf_loads:
        rows += [Row(f"check perf {load}: result", w(f"check_perf_{load}", "verdict")),
                 Row(f"check perf {load}: writes/s", w(f"check_perf_{load}", "writes_per_s")),
                 Row(f"check perf {load}: slowest ms", w(f"check_perf_{load}", "slowest_ms"))]
    rows += [Row("put 1 client (seq): writes/s", w("put_1", "writes_per_s")),
             Row("put 1 client (seq): p50 ms", w("put_1", "p50_ms")),
             Row("put 1 client (seq): p99 ms", w("put_1", "p99_ms")),
             Row("put 1 client (seq): server CPU us/write", cpu_per_op("put_1", "writes"))]
    for c in s.put_clients:
        rows += [Row(f"put {c} clients: writes/s", w(f"put_{c}", "writes_per_s")),
                 Row(f"put {c} clients: p99 ms", w(f"put_{c}", "p99_ms")),
                 Row(f"put {c} clients: server CPU us/write", cpu_per_op(f"put_{c}", "writes"))]
    for kind in ("linearizable", "serializable"):
        label = f"range {kind[:3]}. {s.read_clients} clients"
        rows += [Row(f"{label}: reads/s", w(f"range_{kind}", "reads_per_s")),
                 Row(f"{label}: p99 ms", w(f"range_{kind}", "p99_ms")),
                 Row(f"{label}: server CPU us/read", cpu_per_op(f"range_{kind}", "reads"))]
    label = f"watch {s.watchers} watchers"
    pace = f"paced {s.watch_rate:g}/s" if s.watch_rate else "unpaced"
    rows += [Row(f"{label}: writer puts/s ({pace})", w("watch", "puts_per_s")),
             Row(f"{label}: events/s", w("watch", "events_per_s")),
             Row(f"{label}: p99 lag ms", w("watch", "lag_p99_ms")),
             Row(f"{label}: server CPU us/event", cpu_per_op("watch", "events")),
             Row(f"{label}: events missing", w("watch", "missing"))]
    for i, who in enumerate(("leader", "follower", "follower")):
        rows.append(Row(f"RSS {who} MiB", lambda r, i=i: r["rss"][i]["rss_mib"] if len(r["rss"]) > i else None))
    rows.append(Row("request errors (all workloads)",
                    lambda r: sum(int(x.get("errors") or 0) for x in r["workloads"].values())))
    rows.append(Row("leader elections during the run",
                    lambda r: sum(int(x.get("elections") or 0) for x in r["workloads"].values())))
    rows.append(Row("failed workloads (see --json)",
                    lambda r: ",".join(n for n, x in r["workloads"].items() if "failed" in x) or "none"))
    return rows


def fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"
    return str(v)


def ratio(a: object, b: object) -> str:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and b:
        return f"{a / b:.2f}"
    return "-"


def table(results: dict[str, dict], s: Settings) -> str:
    """A Markdown table (aligned, so it reads in a terminal too): one column per
    cluster, then metastore/etcd per engine when etcd ran."""
    engines = [n for n in results if results[n]["system"] == "metastore"]
    has_etcd = "etcd" in results
    head = ["workload", *[f"metastore {e}" for e in engines]]
    if has_etcd:
        head += ["etcd", *[f"{e}/etcd" for e in engines]]
    body = []
    for row in rows_for(s):
        vals = {n: row.get(r) for n, r in results.items()}
        line = [row.label, *[fmt(vals[e]) for e in engines]]
        if has_etcd:
            line += [fmt(vals["etcd"]), *[ratio(vals[e], vals["etcd"]) for e in engines]]
        body.append(line)
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]

    def render(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(wd) if i == 0 else c.rjust(wd)
                                 for i, (c, wd) in enumerate(zip(cells, widths))) + " |"

    sep = "|" + "|".join("-" * (wd + 1) + (":" if i else "-") for i, wd in enumerate(widths)) + "|"
    return "\n".join([render(head), sep, *map(render, body)])


# -- orchestration ------------------------------------------------------------------

def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def machine() -> dict:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    return {"nproc": os.cpu_count(), "cpu": model, "date": datetime.date.today().isoformat()}


def settings_from(ns: argparse.Namespace) -> Settings:
    loads = ns.perf_loads if ns.perf_loads is not None else ("s" if ns.quick else "s,m")
    loads_list = [x.strip() for x in loads.split(",") if x.strip() and x.strip() != "none"]
    bad = [x for x in loads_list if x not in PERF_LOADS]
    if bad:
        raise SystemExit(f"--perf-loads: unknown load(s) {bad}; choose from {','.join(PERF_LOADS)} or none")
    duration = ns.duration if ns.duration is not None else (2.0 if ns.quick else 5.0)
    return Settings(quick=ns.quick, perf_loads=loads_list, duration=duration, idle=min(duration, 3.0),
                    watch_rate=ns.watch_rate, watch_drain=10.0 if ns.quick else 30.0,
                    put_clients=[100, 500], read_clients=ns.read_clients,
                    watchers=ns.watchers, watch_streams=ns.watch_streams, client=ns.client)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--engine", choices=(*ENGINES, "both", "none"), default="both",
                    help="metastore engine(s) to measure; none: etcd only")
    ap.add_argument("--no-etcd", action="store_true", help="skip etcd even when it is installed")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 2 s workloads, check perf load s only")
    ap.add_argument("--perf-loads", default=None, metavar="LOADS",
                    help="comma-separated etcdctl check perf loads (s,m,l,xl) or 'none' "
                         "(default: s,m; with --quick: s)")
    ap.add_argument("--duration", type=float, default=None,
                    help="seconds per put/read/watch workload (default 5, with --quick 2)")
    ap.add_argument("--read-clients", type=int, default=100)
    ap.add_argument("--watchers", type=int, default=1000)
    ap.add_argument("--watch-streams", type=int, default=20, help="Watch streams the watchers share")
    ap.add_argument("--watch-rate", type=float, default=20.0,
                    help="puts/s of the watch writer; each is delivered to every watcher (0: unpaced)")
    ap.add_argument("--client", choices=lean_grpc.CLIENTS, default="lean",
                    help="the load's gRPC client: lean (bench/lean_grpc.py, ~40 us of CPU a call) or "
                         "grpcio (grpc.aio, ~180-225 us a call: it caps the read rows on 2 cores)")
    ap.add_argument("--json", metavar="FILE", help="also write all raw results to FILE")
    ap.add_argument("--keep", metavar="DIR",
                    help="keep every member's data dir and log under DIR/<engine|etcd> (post-mortems)")
    ap.add_argument("--from-json", metavar="FILE", help="only print the table of an earlier --json FILE")
    return ap.parse_args()


def exit_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so the `with` blocks stop every cluster."""
    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, handler)


def report(meta: dict, results: dict[str, dict], s: Settings) -> None:
    """The one-line context (date, machine, settings) and the table, on stdout."""
    print(f"{meta['date']}, {meta['nproc']} cores ({meta['cpu']}), {meta['cluster']}, "
          f"etcd {meta['etcd'] or 'not run'}; {'--quick, ' if s.quick else ''}{s.duration:g} s per workload, "
          f"{s.value_size}-byte values, {s.client} client. ratio = metastore/etcd: above 1 is better for /s rows, worse for ms rows.")
    print(table(results, s))


def reprint(path: str) -> int:
    """--from-json: the table of an earlier run, from its --json file, without running anything."""
    with open(path) as f:
        saved = json.load(f)
    report(saved["meta"], saved["results"], Settings(**saved["meta"]["settings"]))
    return 0


def main() -> int:
    ns = parse_args()
    if ns.from_json:
        return reprint(ns.from_json)
    s = settings_from(ns)
    exit_on_sigterm()
    engines = {"both": ENGINES, "none": ()}.get(ns.engine, (ns.engine,))
    etcd_exe = None if ns.no_etcd else etcd_binary()
    meta = {**machine(), "settings": asdict(s), "etcd": etcd_version(etcd_exe) if etcd_exe else None,
            "etcdctl": workloads.etcdctl_binary(), "cluster": "3 members on loopback, fsync on"}
    if s.perf_loads and not meta["etcdctl"]:
        log("etcdctl not found (Debian's etcd-client): check perf rows skipped")
    if not etcd_exe:
        log("etcd not found or --no-etcd: measuring metastore only (apt-get install etcd-server for etcd)")
    results: dict[str, dict] = {}
    started = time.perf_counter()
    for engine in engines:
        log(f"metastore {engine}: starting 3 members")
        with metastore_target(engine, ns.keep) as target:
            results[engine] = run_target(target, s)
    if etcd_exe:
        log(f"etcd {meta['etcd']}: starting 3 members")
        with etcd_target(etcd_exe, ns.keep) as target:
            results["etcd"] = run_target(target, s)
    meta["seconds"] = round(time.perf_counter() - started, 1)
    meta["loadavg_after"] = os.getloadavg()  # other work on the machine skews every number
    report(meta, results, s)
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
        log(f"raw results written to {ns.json}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the clusters are already stopped by then
        log("interrupted")
        sys.exit(130)
