"""`metastore serve` as a user runs it: refusals, port clashes, clean shutdown."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import grpc
import pytest

from metastore.api.pb import rpc_pb2
from metastore.testing import LocalCluster, free_ports


def serve(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "metastore", "serve", "--data-dir", str(tmp_path / "d"), *args],
                          capture_output=True, text=True, timeout=30, cwd=tmp_path)


def test_refuses_public_peer_port_without_secret(tmp_path):
    client, peer = free_ports(2)
    proc = serve(tmp_path, "--listen-client-urls", f"http://127.0.0.1:{client}",
                 "--listen-peer-urls", f"http://0.0.0.0:{peer}")
    assert proc.returncode != 0
    assert "without a cluster secret" in proc.stderr


def test_bad_flag_value_is_a_usage_error(tmp_path):
    proc = serve(tmp_path, "--listen-client-urls", "not-a-url")
    assert proc.returncode == 2
    assert "expected http://host:port" in proc.stderr


@pytest.mark.parametrize("busy_port, message", [("client", "cannot listen for clients"),
                                                ("peer", "cannot listen for peers")])
def test_port_in_use_fails_loudly(tmp_path, busy_port, message):
    ports = dict(zip(("client", "peer"), free_ports(2)))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", ports[busy_port]))
        busy.listen()
        proc = serve(tmp_path, "--listen-client-urls", f"http://127.0.0.1:{ports['client']}",
                     "--listen-peer-urls", f"http://127.0.0.1:{ports['peer']}",
                     "--initial-advertise-peer-urls", f"http://127.0.0.1:{ports['peer']}")
    assert proc.returncode == 1
    assert f"{message} on 127.0.0.1:{ports[busy_port]}" in proc.stderr


def test_sigterm_and_sigint_stop_cleanly_and_data_survives_restart():
    with LocalCluster(1) as cluster:
        m = cluster.members[0]
        m.kv().Put(rpc_pb2.PutRequest(key=b"k", value=b"v"), timeout=5)
        cluster.kill(m, signal.SIGTERM)
        assert m.proc.returncode == 0, m.log()
        assert "stopped" in m.log()
        cluster.restart(m)
        resp = m.kv().Range(rpc_pb2.RangeRequest(key=b"k"), timeout=5)
        assert [kv.value for kv in resp.kvs] == [b"v"] and resp.kvs[0].mod_revision == 2
        cluster.kill(m, signal.SIGINT)
        assert m.proc.returncode == 0, m.log()


def _tree(root: str) -> dict[str, tuple[int, int]]:
    """Every file under root with its size and modification time."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            st = os.stat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), root)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.parametrize("written_by, opened_with", [("memory", "rocksdb"), ("rocksdb", "memory")])
def test_data_dir_of_the_other_engine_is_refused_untouched(written_by, opened_with):
    with LocalCluster(1, engine=written_by) as cluster:
        m = cluster.members[0]
        m.kv().Put(rpc_pb2.PutRequest(key=b"k", value=b"kept"), timeout=5)
        cluster.kill(m, signal.SIGTERM)
        before = _tree(m.data_dir)
        cmd = cluster.command(m)
        cmd[cmd.index("--engine") + 1] = opened_with
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=cluster.base_dir)
        assert proc.returncode == 1, proc.stderr
        assert f"written with engine={written_by}, this server has engine={opened_with}" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert _tree(m.data_dir) == before
        # The right engine still finds everything.
        cluster.restart(m)
        resp = m.kv().Range(rpc_pb2.RangeRequest(key=b"k"), timeout=5)
        assert [kv.value for kv in resp.kvs] == [b"kept"]


def test_json_logs_name_the_member_and_leadership():
    with LocalCluster(1, extra_args=["--log-format", "json"]) as cluster:
        m = cluster.members[0]
        m.kv().Put(rpc_pb2.PutRequest(key=b"k", value=b"v"), timeout=5)
        cluster.kill(m, signal.SIGTERM)
        entries = [json.loads(line) for line in m.log().splitlines() if line.startswith("{")]
        assert entries and all(e["member"] == "m1" and e["level"] and e["ts"] and e["logger"] for e in entries)
        elected = [e for e in entries if "elected leader" in e["msg"]]
        assert elected and elected[0]["term"] >= 1
        assert any(e["msg"] == "stopped" for e in entries)


def test_a_full_disk_stops_the_member_with_exit_status_1(tmp_path):
    """The Raft log's disk fills up: the member stops, as etcd does on a
    failed WAL write, and exits 1 with the reason; given room again, it
    restarts with every write it acknowledged."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {mounted.stderr.strip()}")
    try:
        filler = disk / "filler"
        filler.write_bytes(bytes(14 << 20))  # leaves ~26 MiB for the member
        (tmp_path / "cluster").mkdir()
        cluster = LocalCluster(1, base_dir=str(tmp_path / "cluster"))
        m = cluster.members[0]
        # Only the data dir (the Raft log with it) is on the small disk; the
        # process output stays where it can still be written.
        m.data_dir = str(disk / "m1.data")
        with cluster:
            acked: dict[bytes, bytes] = {}
            for i in range(60):
                key, value = b"k%02d" % i, os.urandom(1 << 20)
                try:
                    m.kv().Put(rpc_pb2.PutRequest(key=key, value=value), timeout=5)
                except grpc.RpcError:
                    break
                acked[key] = value
            else:
                pytest.fail("the disk never filled up")
            assert m.proc.wait(timeout=30) == 1, m.log()
            log = m.log()
            assert "the Raft log failed" in log and "No space left on device" in log, log
            assert log.count("failed _onTick") <= 1, "one report, not one per tick"
            filler.unlink()
            cluster.restart(m)
            for key, value in acked.items():
                assert [kv.value for kv in m.kv().Range(rpc_pb2.RangeRequest(key=key), timeout=10).kvs] == [value]
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
