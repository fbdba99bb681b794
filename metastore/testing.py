"""Real multi-member metastore clusters for integration tests.

`LocalCluster` starts N `metastore serve` processes on free loopback ports,
waits until they have elected a leader, and tears them down (killing anything
left). It is meant for metastore's own tests and for applications that want
to test against a real cluster:

    from metastore.testing import LocalCluster

    with LocalCluster(3) as cluster:
        print(cluster.client_urls)          # hand these to your etcd client
        cluster.kill(cluster.leader())      # SIGKILL the leader
        cluster.wait_ready()                # a new one is elected

With pytest, enable the fixture with `pytest_plugins = ["metastore.testing_plugin"]`
and ask for `metastore_cluster`.
"""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence, TypeVar

import grpc

from metastore.api.pb import metastore_pb2, metastore_pb2_grpc, rpc_pb2, rpc_pb2_grpc

T = TypeVar("T")


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports that were free on 127.0.0.1 a moment ago."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_for(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll `condition` until it returns something truthy; fail after `timeout` s.

    Exceptions raised by the condition count as "not yet" (the last one is
    reported if time runs out)."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = condition()
            if result:
                return result
        except Exception as exc:  # noqa: BLE001 - a probe that fails is "not yet"
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


@dataclass
class Member:
    """One member process of a LocalCluster."""

    name: str
    client_port: int
    peer_port: int
    data_dir: str
    log_path: str
    proc: subprocess.Popen | None = None
    # Set by LocalCluster.kill: the member is down on purpose.
    stopped: bool = False
    # "new" for the founding members; "existing" for one added later.
    cluster_state: str = "new"
    # A learner serves only serializable reads (set it again once promoted).
    learner: bool = False
    # The HTTP listener (--listen-metrics-urls): /metrics, /health, the
    # placement and drain API. 0 = none.
    http_port: int = 0
    _channel: grpc.Channel | None = field(default=None, repr=False)

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def endpoint(self) -> str:
        """host:port, as etcdctl's --endpoints and gRPC channels take it."""
        return f"127.0.0.1:{self.client_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def http(self, method: str, path: str, body: object = None, timeout: float = 10.0) -> tuple[int, object]:
        """One JSON request to the member's HTTP listener: (status, decoded body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=timeout)
        try:
            data = None if body is None else json.dumps(body).encode()
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
            resp = conn.getresponse()
            raw = resp.read()
            return resp.status, (json.loads(raw) if raw else None)
        finally:
            conn.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.endpoint)
        return self._channel

    def kv(self) -> rpc_pb2_grpc.KVStub:
        return rpc_pb2_grpc.KVStub(self.channel())

    def maintenance(self) -> rpc_pb2_grpc.MaintenanceStub:
        return rpc_pb2_grpc.MaintenanceStub(self.channel())

    def cluster(self) -> rpc_pb2_grpc.ClusterStub:
        return rpc_pb2_grpc.ClusterStub(self.channel())

    def raft_status(self, timeout: float = 2.0) -> metastore_pb2.GetRaftStatusResponse:
        stub = metastore_pb2_grpc.RaftStub(self.channel())
        return stub.GetRaftStatus(metastore_pb2.GetRaftStatusRequest(), timeout=timeout)

    def status(self, timeout: float = 2.0) -> rpc_pb2.StatusResponse:
        return self.maintenance().Status(rpc_pb2.StatusRequest(), timeout=timeout)

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None


class LocalCluster:
    """N metastore members as separate processes on loopback."""

    def __init__(self, size: int = 3, *, engine: str = "memory", base_dir: str | None = None,
                 token: str | None = None, extra_args: Sequence[str] = (),
                 env: dict[str, str] | None = None) -> None:
        if size < 1:
            raise ValueError("a cluster has at least one member")
        self.engine = engine
        self.token = token or f"test-{uuid.uuid4().hex[:12]}"
        self.extra_args = list(extra_args)
        self.env = dict(os.environ, **(env or {}))
        self._own_dir = base_dir is None
        self.base_dir = base_dir or tempfile.mkdtemp(prefix="metastore-cluster-")
        ports = free_ports(3 * size)
        self.members: list[Member] = []
        for i in range(size):
            name = f"m{i + 1}"
            self.members.append(Member(
                name=name, client_port=ports[3 * i], peer_port=ports[3 * i + 1], http_port=ports[3 * i + 2],
                data_dir=os.path.join(self.base_dir, f"{name}.data"),
                log_path=os.path.join(self.base_dir, f"{name}.log")))

    # -- lifecycle -----------------------------------------------------------
    def __enter__(self) -> "LocalCluster":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 30.0) -> None:
        try:
            for m in self.members:
                self._spawn(m)
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every member (SIGTERM, then SIGKILL) and remove the temp dir."""
        for m in self.members:
            m.close_channel()
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

    def command(self, m: Member) -> list[str]:
        initial = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        return [
            sys.executable, "-m", "metastore", "serve",
            "--name", m.name,
            "--data-dir", m.data_dir,
            "--listen-client-urls", m.client_url,
            "--advertise-client-urls", m.client_url,
            "--listen-peer-urls", m.peer_url,
            "--initial-advertise-peer-urls", m.peer_url,
            "--initial-cluster", initial,
            "--initial-cluster-token", self.token,
            "--initial-cluster-state", m.cluster_state,
            "--engine", self.engine,
            *(["--listen-metrics-urls", m.http_url] if m.http_port else []),
            *self.extra_args,
        ]

    def _spawn(self, m: Member) -> None:
        log = open(m.log_path, "ab")
        # cwd is the cluster dir: never the source tree, whose top-level
        # folders are not importable as metastore's subpackages.
        m.proc = subprocess.Popen(self.command(m), stdout=log, stderr=subprocess.STDOUT,
                                  cwd=self.base_dir, env=self.env, start_new_session=True)
        log.close()

    def add_member(self, name: str | None = None, start: bool = True, learner: bool = False) -> Member:
        """A new member on free ports that joins the running cluster
        (--initial-cluster-state existing), as after `etcdctl member add`
        (`--learner` for a learner): call MemberAdd with its peer URL first,
        then start it."""
        client_port, peer_port, http_port = free_ports(3)
        name = name or f"m{len(self.members) + 1}"
        m = Member(name=name, client_port=client_port, peer_port=peer_port, http_port=http_port,
                   data_dir=os.path.join(self.base_dir, f"{name}.data"),
                   log_path=os.path.join(self.base_dir, f"{name}.log"), cluster_state="existing",
                   learner=learner)
        self.members.append(m)
        m.stopped = not start
        if start:
            self._spawn(m)
        return m

    def start_member(self, m: Member) -> None:
        """Start a member created with add_member(start=False)."""
        m.stopped = False
        self._spawn(m)

    def kill(self, m: Member, sig: int = signal.SIGKILL) -> None:
        """Send `sig` (default SIGKILL) to a member and wait for it to exit."""
        m.close_channel()
        m.stopped = True
        if m.running:
            m.proc.send_signal(sig)
            m.proc.wait(timeout=15)

    def restart(self, m: Member, timeout: float = 30.0, wait: bool = True) -> None:
        """Start a stopped member again on the same ports and data dir; with
        wait, return once the cluster is ready again."""
        if m.running:
            raise RuntimeError(f"{m.name} is still running")
        m.stopped = False
        self._spawn(m)
        if wait:
            self.wait_ready(timeout)

    # -- observation ---------------------------------------------------------
    @property
    def running_members(self) -> list[Member]:
        return [m for m in self.members if m.running]

    @property
    def client_urls(self) -> list[str]:
        return [m.client_url for m in self.running_members]

    @property
    def endpoints(self) -> str:
        """Comma-separated host:port of the running members (etcdctl --endpoints)."""
        return ",".join(m.endpoint for m in self.running_members)

    def statuses(self) -> dict[str, rpc_pb2.StatusResponse]:
        return {m.name: m.status() for m in self.running_members}

    def wait_ready(self, timeout: float = 30.0) -> Member:
        """Wait until every running member serves, agrees on one leader, and
        answers a linearizable read; return the leader."""

        def ready() -> Member | None:
            for m in self.members:
                if m.proc is not None and not m.running and not m.stopped:
                    raise RuntimeError(f"{m.name} exited with {m.proc.returncode}:\n{m.log()[-3000:]}")
            statuses = self.statuses()
            leaders = {s.leader for s in statuses.values()}
            if len(leaders) != 1 or 0 in leaders:
                return None
            leader = self._member_by_id(leaders.pop(), statuses)
            if leader is None or not leader.running:
                return None
            for m in self.running_members:
                # A learner refuses linearizable reads.
                m.kv().Range(rpc_pb2.RangeRequest(key=b"health", serializable=m.learner), timeout=2)
            return leader

        return wait_for(ready, timeout, "the cluster to elect a leader and serve")

    def leader(self, timeout: float = 30.0) -> Member:
        return self.wait_ready(timeout)

    def followers(self) -> list[Member]:
        leader = self.leader()
        return [m for m in self.running_members if m is not leader]

    def _member_by_id(self, member_id: int, statuses: dict[str, rpc_pb2.StatusResponse]) -> Member | None:
        for m in self.running_members:
            if statuses[m.name].header.member_id == member_id:
                return m
        return None

    def logs(self) -> str:
        return "\n".join(f"===== {m.name} =====\n{m.log()}" for m in self.members)

    # -- etcdctl -------------------------------------------------------------
    def etcdctl(self, *args: str, endpoints: str | Sequence[Member] | None = None, check: bool = True,
                input: str | None = None, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run etcdctl (v3 API) against the cluster; returns the completed process."""
        if endpoints is None:
            eps = self.endpoints
        elif isinstance(endpoints, str):
            eps = endpoints
        else:
            eps = ",".join(m.endpoint for m in endpoints)
        exe = shutil.which("etcdctl")
        if exe is None:
            raise RuntimeError("etcdctl not found: install Debian's etcd-client (etcdctl 3.4)")
        proc = subprocess.run([exe, "--endpoints", eps, *args], input=input, capture_output=True,
                              text=True, timeout=timeout, env=dict(os.environ, ETCDCTL_API="3"))
        if check and proc.returncode != 0:
            raise AssertionError(f"etcdctl {' '.join(args)} exited {proc.returncode}:\n"
                                 f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
        return proc


@contextlib.contextmanager
def local_cluster(size: int = 3, **kwargs: object) -> Iterator[LocalCluster]:
    """`with local_cluster(3) as c:` -- the same as `with LocalCluster(3) as c:`."""
    with LocalCluster(size, **kwargs) as cluster:  # type: ignore[arg-type]
        yield cluster
