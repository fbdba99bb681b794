"""The HTTP listener (--listen-metrics-urls): /metrics, /health, /version.

Real member processes are scraped over HTTP and the exposition parsed with
prometheus-client's parser; the HTTP server and router are also driven
in-process with raw requests (malformed ones included).
"""
from __future__ import annotations

import asyncio
import http.client
import json
import socket
import subprocess
import sys
import threading
from types import SimpleNamespace

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from metastore.api.http import HTTPError, HTTPServer, Request, Response, Router
from metastore.api.pb import rpc_pb2
from metastore.config import DEFAULT_METRICS_URL, ConfigError, ServerConfig
from metastore.metrics import NodeMetrics, grpc_code_name
from metastore.testing import LocalCluster, free_ports, wait_for
from metastore.types import RaftStatus


# -- helpers -----------------------------------------------------------------------
class MetricsCluster(LocalCluster):
    """A LocalCluster (each member serves HTTP on a free port of its own)."""

    def metrics_address(self, m) -> tuple[str, int]:
        return "127.0.0.1", m.http_port


def http_request(address: tuple[str, int], path: str, method: str = "GET", body: bytes | None = None,
                 headers: dict[str, str] | None = None, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(*address, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(address: tuple[str, int]) -> Samples:
    status, headers, body = http_request(address, "/metrics")
    assert status == 200, body
    assert headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def grpc_handled(samples: Samples, method: str, code: str, service: str = "etcdserverpb.KV") -> float:
    return value(samples, "grpc_server_handled_total", grpc_type="unary", grpc_service=service,
                 grpc_method=method, grpc_code=code) or 0


@pytest.fixture
def cluster(request):
    c = MetricsCluster(3)
    c.start()
    yield c
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        request.node.add_report_section("call", "metastore logs", c.logs()[-20000:])
    c.stop()


# -- against real members ------------------------------------------------------------
def test_metrics_report_leadership_sizes_process_and_version(cluster):
    leader = cluster.leader()

    def settled() -> dict[str, Samples] | None:
        scraped = {m.name: scrape(cluster.metrics_address(m)) for m in cluster.members}
        # Requests made before the election (a member publishing itself)
        # wait for the leader, then finish: nothing stays pending.
        if all(value(s, "etcd_server_has_leader") == 1 and value(s, "etcd_server_proposals_pending") == 0
               for s in scraped.values()):
            return scraped
        return None

    scraped = wait_for(settled, 10, "every member to report a leader and no pending proposal")
    assert [name for name, s in scraped.items() if value(s, "etcd_server_is_leader") == 1] == [leader.name]
    for s in scraped.values():
        assert value(s, "etcd_server_leader_changes_seen_total") >= 1
        assert value(s, "etcd_mvcc_db_total_size_in_bytes") > 0
        assert 0 < value(s, "etcd_mvcc_db_total_size_in_use_in_bytes") <= value(s, "etcd_mvcc_db_total_size_in_bytes")
        assert value(s, "process_resident_memory_bytes") > 0
        assert value(s, "etcd_server_version", server_version="3.4.0") == 1
        assert value(s, "etcd_disk_wal_fsync_duration_seconds_count") > 0
        assert value(s, "etcd_server_proposals_applied_total") <= value(s, "etcd_server_proposals_committed_total")


def test_proposal_counters_follow_writes_on_every_member(cluster):
    before = {m.name: scrape(cluster.metrics_address(m)) for m in cluster.members}
    kv = cluster.followers()[0].kv()
    for i in range(20):
        kv.Put(rpc_pb2.PutRequest(key=f"k{i}".encode(), value=b"v"), timeout=5)

    for m in cluster.members:
        def advanced(m=m) -> Samples | None:
            s = scrape(cluster.metrics_address(m))
            old = before[m.name]
            ok = (value(s, "etcd_server_proposals_committed_total")
                  >= value(old, "etcd_server_proposals_committed_total") + 20
                  and value(s, "etcd_server_proposals_applied_total")
                  >= value(old, "etcd_server_proposals_applied_total") + 20
                  and value(s, "etcd_debugging_mvcc_keys_total") == 20)
            return s if ok else None

        wait_for(advanced, 10, f"{m.name}'s proposal counters to count 20 writes")


def test_grpc_requests_are_counted_by_method_and_code(cluster):
    m = cluster.members[0]
    before = scrape(cluster.metrics_address(m))
    kv = m.kv()
    for _ in range(3):
        kv.Put(rpc_pb2.PutRequest(key=b"a", value=b"1"), timeout=5)
    kv.Range(rpc_pb2.RangeRequest(key=b"a"), timeout=5)
    kv.Range(rpc_pb2.RangeRequest(key=b"a"), timeout=5)
    with pytest.raises(grpc.RpcError) as info:
        kv.Put(rpc_pb2.PutRequest(key=b"", value=b"x"), timeout=5)  # etcd: key is not provided
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    after = scrape(cluster.metrics_address(m))
    assert grpc_handled(after, "Put", "OK") - grpc_handled(before, "Put", "OK") == 3
    assert grpc_handled(after, "Range", "OK") - grpc_handled(before, "Range", "OK") == 2
    assert grpc_handled(after, "Put", "InvalidArgument") - grpc_handled(before, "Put", "InvalidArgument") == 1
    labels = dict(grpc_type="unary", grpc_service="etcdserverpb.KV", grpc_method="Put")
    assert value(after, "grpc_server_started_total", **labels) >= 4
    assert value(after, "grpc_server_handling_seconds_count", **labels) >= 4
    assert value(after, "grpc_server_handling_seconds_bucket", le="+Inf", **labels) >= 4


def test_watch_responses_sent_together_are_each_counted(cluster):
    """A Watch stream sends what its queue holds in one write; the message
    counter still counts every response, as etcd's does."""
    from metastore.api.pb import rpc_pb2_grpc

    m = cluster.members[0]
    labels = dict(grpc_type="bidi_stream", grpc_service="etcdserverpb.Watch", grpc_method="Watch")
    before = value(scrape(cluster.metrics_address(m)), "grpc_server_msg_sent_total", **labels) or 0
    watchers, puts = 20, 3
    requests = [rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(key=b"counted"))
                for _ in range(watchers)]
    done = threading.Event()
    call = rpc_pb2_grpc.WatchStub(m.channel()).Watch(_then_block(requests, done), timeout=30)
    got = created = 0
    kv = m.kv()
    for resp in call:
        created += resp.created
        got += len(resp.events)
        if created == watchers and got == 0:
            for i in range(puts):
                kv.Put(rpc_pb2.PutRequest(key=b"counted", value=b"%d" % i), timeout=5)
        if got == watchers * puts:
            break
    done.set()
    call.cancel()
    expected = before + watchers + watchers * puts  # one created and one response per put, per watcher

    def counted():
        now = value(scrape(cluster.metrics_address(m)), "grpc_server_msg_sent_total", **labels)
        return now if now == expected else None
    # A response counts once its write went out: the last batch may be a moment behind.
    wait_for(counted, 10, f"grpc_server_msg_sent_total for Watch to reach {expected}")


def test_a_streamed_response_counts_once_written():
    """A response is counted when the caller comes back for the next one (its
    write went out), so a call reset while writing counts only what went out."""
    from metastore.api.grpc_server import SerializedMessages

    m = NodeMetrics(_fake_node(SimpleNamespace(fsync_count=0, fsync_seconds=0.0)))
    watch = m.grpc._metrics_for("/etcdserverpb.Watch/Watch", "bidi_stream")

    async def responses(request, context):
        yield "one"
        yield SerializedMessages((b"a", b"b", b"c"))
        yield "never written"

    async def main() -> None:
        gen = m.grpc._stream_response(responses, watch, True)(_requests_of([]), SimpleNamespace(code=lambda: None))
        assert await gen.__anext__() == "one"
        assert await gen.__anext__() == SerializedMessages((b"a", b"b", b"c"))
        assert watch.sent == 1
        assert await gen.__anext__() == "never written"
        assert watch.sent == 4
        await gen.aclose()  # the write of the third failed: the call ends
        assert watch.sent == 4

    asyncio.run(main())


async def _requests_of(items):
    for item in items:
        yield item


def _then_block(requests, done):
    """The requests, then a request stream that stays open until `done`."""
    yield from requests
    done.wait(30)


def test_health_version_and_http_errors(cluster):
    for m in cluster.members:
        address = cluster.metrics_address(m)
        status, headers, body = wait_for(lambda: (r := http_request(address, "/health"))[0] == 200 and r,
                                         10, f"{m.name} /health to be 200")
        assert headers["content-type"] == "application/json"
        assert json.loads(body) == {"health": "true", "reason": ""}
        status, _, body = http_request(address, "/version")
        assert status == 200 and json.loads(body) == {"etcdserver": "3.4.0", "etcdcluster": "3.4.0"}

    address = cluster.metrics_address(cluster.members[0])
    status, _, body = http_request(address, "/no/such/path")
    assert status == 404 and "error" in json.loads(body)
    status, headers, body = http_request(address, "/health", method="DELETE")
    assert status == 405 and "error" in json.loads(body)
    assert headers["allow"] == "GET, HEAD"
    # A malformed request gets 400 and the listener keeps serving.
    with socket.create_connection(address, timeout=5) as s:
        s.sendall(b"NOT A REQUEST\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 400 ")
    assert http_request(address, "/version")[0] == 200


def test_leader_changes_are_counted_and_health_fails_without_quorum(cluster):
    old = cluster.leader()
    survivors = [m for m in cluster.members if m is not old]
    before = {m.name: value(scrape(cluster.metrics_address(m)), "etcd_server_leader_changes_seen_total")
              for m in survivors}
    cluster.kill(old)
    new = cluster.wait_ready(30)

    for m in survivors:
        def counted(m=m) -> bool:
            s = scrape(cluster.metrics_address(m))
            return (value(s, "etcd_server_leader_changes_seen_total") >= before[m.name] + 1
                    and value(s, "etcd_server_has_leader") == 1
                    and value(s, "etcd_server_is_leader") == (1 if m is new else 0))

        wait_for(counted, 10, f"{m.name} to count the leader change")

    # Without a quorum the last member is unhealthy, with etcd's answer.
    last = next(m for m in survivors if m is not new)
    cluster.kill(new)

    def unhealthy() -> dict | None:
        status, _, body = http_request(cluster.metrics_address(last), "/health")
        return json.loads(body) if status == 503 else None

    health = wait_for(unhealthy, 20, "/health to report the lost quorum")
    assert health["health"] == "false"
    assert health["reason"] == "RAFT NO LEADER" or health["reason"].startswith("RANGE ERROR:")


def test_drain_and_liveness_metrics_move():
    """The drain gauges, the liveness gauge and the drain duration histogram."""
    with MetricsCluster(3, extra_args=["--session-ttl", "2"]) as c:
        leader = c.leader()
        target = next(m for m in c.members if m is not leader)
        for i in range(6):
            assert leader.http("PUT", f"/api/v2/workloads/w{i}", {"i": i})[0] == 201

        def settled() -> bool:
            """Two running on every member and nothing else: no move in flight
            that the drain would also count as still on the target."""
            s = scrape(c.metrics_address(leader))
            owned = {k: v for k, v in s.items() if k[0] == "metastore_workloads"}
            return owned == {("metastore_workloads", (("member", m.name), ("state", "running"))): 2
                             for m in c.members}
        wait_for(settled, 30, "two workloads running on every member, no move in flight")
        before = scrape(c.metrics_address(target))
        assert value(before, "metastore_drain_in_progress") == 0
        target_id = f"{target.status().header.member_id:x}"
        assert value(before, "metastore_member_liveness", member=target.name, member_id=target_id) == 0
        assert value(before, "metastore_member_online", member=target.name, member_id=target_id) == 1
        status, body = target.http("PUT", f"/api/v2/captures/{target.name}/drain")
        assert status == 200 and body["current_maintainer_count"] == 2, body

        def drained() -> bool:
            s = scrape(c.metrics_address(target))
            return value(s, "metastore_member_liveness", member=target.name, member_id=target_id) == 1
        wait_for(drained, 30, "the target to be STOPPING (liveness gauge 1)")
        after_target = scrape(c.metrics_address(target))
        assert value(after_target, "metastore_drain_in_progress") == 0
        assert value(after_target, "metastore_drain_remaining_workloads") == 0
        coordinator = scrape(c.metrics_address(c.leader()))
        assert value(coordinator, "metastore_drain_duration_seconds_count") == 1
        assert value(coordinator, "metastore_workloads", member=target.name, state="running") is None


def test_metrics_port_in_use_fails_loudly(tmp_path):
    client, peer, metrics = free_ports(3)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", metrics))
        busy.listen()
        proc = subprocess.run(
            [sys.executable, "-m", "metastore", "serve", "--data-dir", str(tmp_path / "d"),
             "--listen-client-urls", f"http://127.0.0.1:{client}",
             "--listen-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
             "--listen-metrics-urls", f"http://127.0.0.1:{metrics}"],
            capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert f"cannot listen for metrics on 127.0.0.1:{metrics}" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- configuration ----------------------------------------------------------------------
def test_default_metrics_url_only_with_the_default_client_url():
    assert ServerConfig().resolved().listen_metrics_urls == [DEFAULT_METRICS_URL] == ["http://127.0.0.1:2381"]
    own = ServerConfig(listen_client_urls=["http://127.0.0.1:12379"]).resolved()
    assert own.listen_metrics_urls == []  # several members per machine never fight over 2381
    given = ServerConfig(listen_client_urls=["http://127.0.0.1:12379"],
                         listen_metrics_urls=["http://127.0.0.1:12381"]).resolved()
    assert given.listen_metrics_urls == ["http://127.0.0.1:12381"]
    assert ServerConfig(listen_metrics_urls=[]).resolved().listen_metrics_urls == []


@pytest.mark.parametrize("urls, fragment", [
    (["http://127.0.0.1:2379"], "needs a port of its own"),
    (["http://127.0.0.1:2380"], "needs a port of its own"),
    (["127.0.0.1:2381"], "expected http://host:port"),
])
def test_bad_metrics_urls_are_refused(urls, fragment):
    with pytest.raises(ConfigError) as info:
        ServerConfig(listen_metrics_urls=urls).resolved()
    assert fragment in str(info.value)


def test_metrics_flag_empty_means_none_and_absent_means_default():
    from metastore.cmd.serve import _optional_urls

    assert _optional_urls(None, None, None) is None  # not given: ServerConfig's default applies
    assert _optional_urls(None, None, "") == []  # given empty: no listener
    assert _optional_urls(None, None, "http://127.0.0.1:1,http://127.0.0.1:2") == [
        "http://127.0.0.1:1", "http://127.0.0.1:2"]


# -- the HTTP server in-process -----------------------------------------------------------
async def _exchange(address: tuple[str, int], data: bytes, *, until_close: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection(*address)
    writer.write(data)
    await writer.drain()
    try:
        if until_close:
            return await asyncio.wait_for(reader.read(), 5)
        return await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()


def _responses(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Split a byte stream of HTTP/1.1 responses (each with Content-Length)."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        out.append((status, headers, rest[:length]))
        raw = rest[length:]
    return out


def _router() -> Router:
    router = Router()

    @router.route("PUT", "/api/v2/captures/{member}/drain")
    async def drain(req: Request):
        body = req.json()
        return 200, {"member": req.params["member"], "body": body}

    @router.route("GET", "/api/v2/workloads/{id}")
    async def workload(req: Request):
        if req.params["id"] == "missing":
            raise HTTPError(404, "no workload missing")
        await asyncio.sleep(0)  # a real coroutine on the server's loop
        return 200, {"id": req.params["id"], "q": req.query}

    @router.route("DELETE", "/api/v2/workloads/{id}")
    async def delete(req: Request):
        return Response(204)

    @router.route("GET", "/boom")
    async def boom(req: Request):
        raise RuntimeError("bug")

    return router


def test_http_server_routes_json_handlers_and_survives_bad_requests():
    async def main() -> None:
        server = HTTPServer(_router(), ["http://127.0.0.1:0"], what="test")
        await server.start()
        address = server.addresses[0]
        try:
            # Keep-alive: three requests on one connection, the last closes it.
            body = b'{"reason": "maintenance"}'
            raw = await _exchange(address, (
                b"PUT /api/v2/captures/m%201/drain HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body +
                b"GET /api/v2/workloads/w7?verbose=1 HTTP/1.1\r\nHost: x\r\n\r\n"
                b"DELETE /api/v2/workloads/w7 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
            (s1, h1, b1), (s2, _, b2), (s3, h3, b3) = _responses(raw)
            assert s1 == 200 and h1["content-type"] == "application/json"
            assert json.loads(b1) == {"member": "m 1", "body": {"reason": "maintenance"}}
            assert s2 == 200 and json.loads(b2) == {"id": "w7", "q": {"verbose": ["1"]}}
            assert s3 == 204 and b3 == b"" and h3["connection"] == "close"

            # A chunked body with Expect: 100-continue.
            raw = await _exchange(address, (
                b"PUT /api/v2/captures/m2/drain HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
                b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
                b"5\r\n{\"a\":\r\n2;ext=1\r\n1}\r\n0\r\n\r\n"))
            assert raw.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
            (status, _, body_), = _responses(raw[len(b"HTTP/1.1 100 Continue\r\n\r\n"):])
            assert status == 200 and json.loads(body_)["body"] == {"a": 1}

            async def one(data: bytes) -> tuple[int, dict[str, str], dict]:
                status, headers, payload = _responses(await _exchange(address, data))[0]
                return status, headers, json.loads(payload)

            cases = [
                (b"GET /nowhere HTTP/1.1\r\n\r\n", 404),
                (b"POST /api/v2/workloads/w7 HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
                (b"GET /api/v2/workloads/missing HTTP/1.1\r\n\r\n", 404),
                (b"PUT /api/v2/captures/m/drain HTTP/1.1\r\nContent-Length: 3\r\n\r\nnot", 400),
                (b"PUT /api/v2/captures/m/drain HTTP/1.1\r\n\r\n", 400),
                (b"GET /boom HTTP/1.1\r\n\r\n", 500),
                (b"BROKEN\r\n\r\n", 400),
                (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", 400),
                (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
                (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
                (b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
                (b"GET / HTTP/3.0\r\n\r\n", 505),
            ]
            for data, expected in cases:
                status, headers, payload = await one(data if b"Connection" in data else
                                                     data.replace(b"\r\n", b"\r\nConnection: close\r\n", 1))
                assert status == expected, (data, status, payload)
                assert isinstance(payload.get("error"), str) and payload["error"], data
            status, headers, _ = await one(b"PUT /api/v2/workloads/w7 HTTP/1.1\r\nConnection: close\r\n\r\n")
            assert headers["allow"] == "DELETE, GET, HEAD"

            # HEAD of a GET route: the headers only.
            raw = await _exchange(address, b"HEAD /api/v2/workloads/w1 HTTP/1.0\r\n\r\n")
            head, _, rest = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ") and rest == b"" and b"Content-Length: " in head

            # Still serving after all of that.
            assert _responses(await _exchange(address, b"GET /api/v2/workloads/ok HTTP/1.0\r\n\r\n"))[0][0] == 200
        finally:
            await server.stop()
        with pytest.raises(OSError):
            socket.create_connection(address, timeout=1).close()

    asyncio.run(main())


def test_http_server_stop_closes_idle_keep_alive_connections():
    async def main() -> None:
        server = HTTPServer(_router(), ["http://127.0.0.1:0"])
        await server.start()
        reader, writer = await asyncio.open_connection(*server.addresses[0])
        writer.write(b"GET /api/v2/workloads/a HTTP/1.1\r\n\r\n")
        await writer.drain()
        assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200")
        await asyncio.wait_for(server.stop(), 5)
        await asyncio.wait_for(reader.read(), 5)  # EOF: the server closed it
        writer.close()

    asyncio.run(main())


def test_http_bind_failure_names_the_listener():
    async def main() -> None:
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            server = HTTPServer(Router(), [f"http://127.0.0.1:{port}"], what="metrics")
            with pytest.raises(RuntimeError, match=f"cannot listen for metrics on 127.0.0.1:{port}"):
                await server.bind()

    asyncio.run(main())


# -- metrics without a process ----------------------------------------------------------------
def _fake_node(journal: object) -> SimpleNamespace:
    store = SimpleNamespace(db_size=lambda: (100, 80), revision=5, compact_revision=0, backend=None)
    status = RaftStatus(node_id=1, term=2, leader_id=1, state="leader", applied=9, commit=10)
    return SimpleNamespace(raft_status=lambda: status, store=store, raft=SimpleNamespace(journal=journal),
                           proposer=SimpleNamespace(pending=0, failed=0),
                           read_peers=SimpleNamespace(confirmed=7), read_barrier=SimpleNamespace(raft_rounds=2))


def _parse(metrics: NodeMetrics) -> Samples:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(body.decode()) for s in f.samples}


def test_wal_fsync_histogram_uses_a_per_fsync_hook_when_the_journal_has_one():
    async def main() -> None:
        totals = SimpleNamespace(fsync_count=3, fsync_seconds=0.006)
        m = NodeMetrics(_fake_node(totals))
        m.start()
        s = _parse(m)
        assert value(s, "etcd_disk_wal_fsync_duration_seconds_count") == 3
        assert value(s, "etcd_disk_wal_fsync_duration_seconds_sum") == pytest.approx(0.006)
        assert value(s, "etcd_server_proposals_committed_total") == 10
        assert value(s, "etcd_server_is_leader") == 1
        assert value(s, "etcd_mvcc_db_total_size_in_use_in_bytes") == 80
        assert value(s, "metastore_read_index_rounds_total", via="peers") == 7
        assert value(s, "metastore_read_index_rounds_total", via="raft") == 2
        await m.stop()

        hooked = SimpleNamespace(fsync_count=0, fsync_seconds=0.0, on_fsync=None)
        m = NodeMetrics(_fake_node(hooked))
        m.start()
        hooked.on_fsync(0.0015)
        hooked.on_fsync(0.0150)
        s = _parse(m)
        assert value(s, "etcd_disk_wal_fsync_duration_seconds_count") == 2
        assert value(s, "etcd_disk_wal_fsync_duration_seconds_bucket", le="0.002") == 1
        assert value(s, "etcd_disk_wal_fsync_duration_seconds_bucket", le="0.016") == 2
        await m.stop()
        assert hooked.on_fsync is None

    asyncio.run(main())


def test_grpc_code_names_are_go_names():
    assert grpc_code_name(grpc.StatusCode.OK) == "OK"
    assert grpc_code_name(grpc.StatusCode.INVALID_ARGUMENT) == "InvalidArgument"
    assert grpc_code_name(grpc.StatusCode.CANCELLED) == "Canceled"
    assert grpc_code_name(grpc.StatusCode.DEADLINE_EXCEEDED) == "DeadlineExceeded"


def test_grpc_calls_fill_buckets_codes_and_message_counts(monkeypatch):
    import metastore.metrics as metrics_module

    m = NodeMetrics(_fake_node(SimpleNamespace(fsync_count=0, fsync_seconds=0.0)))
    put = m.grpc._metrics_for("/etcdserverpb.KV/Put", "unary")
    clock = iter([10.0, 10.03, 0.0, 0.005])  # each call: its start, then its end (5 ms: on a bound)
    monkeypatch.setattr(metrics_module.time, "perf_counter", lambda: next(clock))

    async def answers(request, context):
        return "response"

    async def refuses(request, context):
        raise grpc.aio.AbortError(grpc.StatusCode.INVALID_ARGUMENT, "bad")

    async def main() -> None:
        assert await m.grpc._unary_response(answers, put, False)(None, SimpleNamespace(code=lambda: None)) \
            == "response"
        with pytest.raises(grpc.aio.AbortError):
            await m.grpc._unary_response(refuses, put, False)(
                None, SimpleNamespace(code=lambda: grpc.StatusCode.INVALID_ARGUMENT))

    asyncio.run(main())
    s = _parse(m)
    labels = dict(grpc_type="unary", grpc_service="etcdserverpb.KV", grpc_method="Put")
    assert value(s, "grpc_server_started_total", **labels) == 2
    assert value(s, "grpc_server_msg_received_total", **labels) == 2
    assert value(s, "grpc_server_msg_sent_total", **labels) == 1  # only the answered one
    assert grpc_handled(s, "Put", "OK") == 1 and grpc_handled(s, "Put", "InvalidArgument") == 1
    bucket = {le: value(s, "grpc_server_handling_seconds_bucket", le=le, **labels)
              for le in ("0.005", "0.025", "0.05", "10.0", "+Inf")}
    assert bucket == {"0.005": 1, "0.025": 1, "0.05": 2, "10.0": 2, "+Inf": 2}  # 5 ms (le: at most) and 30 ms
    assert value(s, "grpc_server_handling_seconds_count", **labels) == 2
    assert value(s, "grpc_server_handling_seconds_sum", **labels) == pytest.approx(0.035)
