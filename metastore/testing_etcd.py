"""A real etcd 3.4 cluster on loopback: the baseline bench/compare.py measures
against, and the other side of the tests that move data between etcd and
metastore (tests/test_etcd_snapshots.py).

Mirrors metastore.testing.LocalCluster (free ports, its own temporary data
dirs, separate processes, everything killed and removed on stop) so both
systems are started and measured the same way. Uses Debian's `etcd` binary
(package `etcd-server`); `etcd_binary()` is None when it is not installed.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from dataclasses import dataclass

import grpc

from metastore.api.pb import rpc_pb2, rpc_pb2_grpc
from metastore.testing import free_ports, wait_for


def etcd_binary() -> str | None:
    """Path of the etcd server binary, or None (the harness then skips etcd)."""
    return shutil.which("etcd")


def etcd_version(exe: str) -> str:
    """`etcd --version`'s first line's version, e.g. "3.4.23" (for the report)."""
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout
    first = out.splitlines()[0] if out else ""
    return first.split(":", 1)[-1].strip() or "?"


@dataclass
class EtcdMember:
    name: str
    client_port: int
    peer_port: int
    data_dir: str
    log_path: str
    proc: subprocess.Popen | None = None

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class EtcdCluster:
    """`size` etcd members as separate processes on free loopback ports.

    Uses etcd's own defaults for everything that affects performance (fsync on,
    heartbeat 100 ms, election 1000 ms, snapshot count), as a user would run it."""

    def __init__(self, size: int = 3, exe: str = "etcd", base_dir: str | None = None) -> None:
        """With `base_dir` the members' data and logs go there and are kept
        after stop (for a post-mortem); by default a temp dir, removed on stop."""
        self.exe = exe
        self.token = f"etcd-{uuid.uuid4().hex[:12]}"
        self._own_dir = base_dir is None
        if base_dir is not None:
            os.makedirs(base_dir, exist_ok=True)
        self.base_dir = base_dir or tempfile.mkdtemp(prefix="etcd-cluster-")
        ports = free_ports(2 * size)
        self.members = [
            EtcdMember(name=f"e{i + 1}", client_port=ports[2 * i], peer_port=ports[2 * i + 1],
                       data_dir=os.path.join(self.base_dir, f"e{i + 1}.etcd"),
                       log_path=os.path.join(self.base_dir, f"e{i + 1}.log"))
            for i in range(size)]

    def __enter__(self) -> "EtcdCluster":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def pids(self) -> dict[str, int]:
        return {m.name: m.proc.pid for m in self.members if m.running}

    def command(self, m: EtcdMember) -> list[str]:
        initial = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        return [
            self.exe,
            "--name", m.name,
            "--data-dir", m.data_dir,
            "--listen-client-urls", m.client_url,
            "--advertise-client-urls", m.client_url,
            "--listen-peer-urls", m.peer_url,
            "--initial-advertise-peer-urls", m.peer_url,
            "--initial-cluster", initial,
            "--initial-cluster-token", self.token,
            "--initial-cluster-state", "new",
            "--logger", "zap",
        ]

    def start(self, timeout: float = 30.0) -> None:
        """Spawn every member and wait until they agree on a leader and serve reads."""
        # ETCD_* variables (e.g. from /etc/default/etcd in a login shell) would
        # override the flags above; the members must see only what we pass.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        try:
            for m in self.members:
                with open(m.log_path, "ab") as log:
                    # Own session: a Ctrl-C in the terminal reaches the harness,
                    # which then stops the members in order (stop()).
                    m.proc = subprocess.Popen(self.command(m), stdout=log, stderr=subprocess.STDOUT,
                                              cwd=self.base_dir, env=env, start_new_session=True)
            wait_for(self._ready, timeout, "the etcd cluster to elect a leader and serve")
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        for m in self.members:
            if m.proc is not None and not m.running:
                raise RuntimeError(f"etcd {m.name} exited with {m.proc.returncode}:\n{self.log(m)[-3000:]}")
        leaders = set()
        for m in self.members:
            with grpc.insecure_channel(m.endpoint) as ch:
                status = rpc_pb2_grpc.MaintenanceStub(ch).Status(rpc_pb2.StatusRequest(), timeout=2)
                rpc_pb2_grpc.KVStub(ch).Range(rpc_pb2.RangeRequest(key=b"health"), timeout=2)
            leaders.add(status.leader)
        return len(leaders) == 1 and 0 not in leaders

    def stop(self) -> None:
        """SIGTERM every member, SIGKILL what is left after 10 s, remove our temp dir."""
        for m in self.members:
            if m.running:
                m.proc.send_signal(signal.SIGTERM)
        for m in self.members:
            if m.proc is not None:
                try:
                    m.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    m.proc.kill()
                    m.proc.wait()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    @staticmethod
    def log(m: EtcdMember) -> str:
        try:
            with open(m.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""
