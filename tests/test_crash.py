"""kill -9 under a steady write load: nothing acknowledged is lost.

A writer thread puts unique keys through every member in turn and records
each acknowledged (key, value, revision). Each cycle kills the leader, a
follower, then all three members with SIGKILL, restarting them each time.
Afterwards every acknowledged write must be present on every member with the
same value and mod revision, and the revisions each client saw never went
backwards.
"""
from __future__ import annotations

import itertools
import threading

import grpc
import pytest

from metastore.api.pb import rpc_pb2
from metastore.testing import LocalCluster, wait_for

from store_engines import ENGINES


class Writer(threading.Thread):
    def __init__(self, cluster: LocalCluster) -> None:
        super().__init__(daemon=True)
        self.cluster = cluster
        self.acked: dict[bytes, tuple[bytes, int]] = {}
        self.stop_event = threading.Event()
        self.backwards: list[tuple[int, int]] = []

    def run(self) -> None:
        last_rev = 0
        for n in itertools.count():
            if self.stop_event.is_set():
                return
            members = self.cluster.running_members
            if not members:
                continue
            m = members[n % len(members)]
            key, value = f"crash/{n:08d}".encode(), f"value-{n}".encode()
            try:
                resp = m.kv().Put(rpc_pb2.PutRequest(key=key, value=value), timeout=3)
            except (grpc.RpcError, ValueError):
                continue  # not acknowledged: may or may not be there
            rev = resp.header.revision
            if rev <= last_rev:
                self.backwards.append((last_rev, rev))
            last_rev = rev
            self.acked[key] = (value, rev)

    def wait_for_progress(self, writes: int = 20) -> None:
        start = len(self.acked)
        wait_for(lambda: len(self.acked) >= start + writes, 30, f"{writes} more acknowledged writes")


def crash_cycles(engine: str, cycles: int) -> None:
    with LocalCluster(3, engine=engine, extra_args=["--snapshot-count", "300"]) as cluster:
        writer = Writer(cluster)
        writer.start()
        try:
            for _ in range(cycles):
                writer.wait_for_progress()
                leader = cluster.leader()
                cluster.kill(leader)
                cluster.wait_ready(30)
                writer.wait_for_progress()
                cluster.restart(leader)

                follower = cluster.followers()[0]
                writer.wait_for_progress()
                cluster.kill(follower)
                writer.wait_for_progress()
                cluster.restart(follower)

                writer.wait_for_progress()
                for m in cluster.members:
                    cluster.kill(m)
                for m in cluster.members:
                    cluster.restart(m, wait=False)
                cluster.wait_ready(60)
            writer.wait_for_progress()
        finally:
            writer.stop_event.set()
            writer.join(10)

        assert not writer.backwards, f"revisions went backwards: {writer.backwards[:5]}"
        assert len(writer.acked) > 0
        for m in cluster.members:
            def caught_up(m=m) -> bool:
                resp = m.kv().Range(rpc_pb2.RangeRequest(serializable=True, key=b"crash/", range_end=b"crash0"),
                                    timeout=10)
                return len(resp.kvs) >= len(writer.acked)
            wait_for(caught_up, 60, f"{m.name} to hold every acknowledged write")
            resp = m.kv().Range(rpc_pb2.RangeRequest(key=b"crash/", range_end=b"crash0"), timeout=10)
            found = {kv.key: (kv.value, kv.mod_revision) for kv in resp.kvs}
            missing = [k for k, v in writer.acked.items() if found.get(k) != v]
            assert not missing, f"{m.name}: {len(missing)} acknowledged writes lost or changed, e.g. " \
                                f"{[(k, writer.acked[k], found.get(k)) for k in missing[:3]]}"


@pytest.mark.parametrize("engine", ENGINES)
def test_crash_cycles_lose_nothing_acknowledged(engine, etcdctl_installed):
    crash_cycles(engine, cycles=2)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_crash_cycles_soak(engine, etcdctl_installed):
    crash_cycles(engine, cycles=20)
