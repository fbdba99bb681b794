"""etcd's JSON gateway, on the client port (HTTP/1.1 beside gRPC, as etcd
serves it) and on --listen-client-http-urls, driven as curl, APISIX
or Patroni drive etcd's: POSTs of JSON, answers in etcd's JSON (proto field
names, 64-bit integers as strings, bytes in base64), etcd's error bodies and
HTTP statuses, and streams of `{"result": ...}` lines for watch and lease
keep-alive. The shapes were compared with etcd 3.4.23's gateway."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import http.client
import json
import socket
import threading
import time

import pytest

from metastore import bbolt
from metastore.api.http import HTTPServer, Router, StreamResponse
from metastore.api.pb import rpc_pb2
from metastore.embed import free_ports
from metastore.testing import LocalCluster

pytestmark = pytest.mark.usefixtures("etcdctl_installed")


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture(scope="module", params=["client-port", "client-http-urls"])
def gateway(request):
    """(cluster, the port to send HTTP/1.1 to)."""
    if request.param == "client-port":
        with LocalCluster(1) as c:
            yield c, int(c.members[0].endpoint.rpartition(":")[2])
        return
    port = free_ports(1)[0]
    with LocalCluster(1, extra_args=["--listen-client-http-urls", f"http://127.0.0.1:{port}"]) as c:
        yield c, port


def post(port: int, path: str, body: object) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn.request("POST", path, data, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_kv_answers_in_etcds_json(gateway):
    cluster, port = gateway
    status, put = post(port, "/v3/kv/put", {"key": b64("gw/a"), "value": b64("1")})
    assert status == 200 and set(put) == {"header"}
    revision = int(put["header"]["revision"])
    assert isinstance(put["header"]["cluster_id"], str) and put["header"]["raft_term"] == "1"
    status, got = post(port, "/v3/kv/range", {"key": b64("gw/a")})
    assert status == 200 and got["count"] == "1"
    assert got["kvs"] == [{"key": b64("gw/a"), "create_revision": str(revision), "mod_revision": str(revision),
                           "version": "1", "value": b64("1")}]
    # The gateway and the gRPC port serve the same store.
    assert cluster.etcdctl("get", "gw/a", "--print-value-only").stdout == "1\n"
    status, txn = post(port, "/v3/kv/txn", {
        "compare": [{"key": b64("gw/a"), "target": "VALUE", "result": "EQUAL", "value": b64("1")}],
        "success": [{"request_put": {"key": b64("gw/a"), "value": b64("2"), "prev_kv": True}}]})
    assert status == 200 and txn["succeeded"] is True
    assert txn["responses"][0]["response_put"]["prev_kv"]["value"] == b64("1")
    status, deleted = post(port, "/v3/kv/deleterange", {"key": b64("gw/"), "range_end": b64("gw0"),
                                                        "prev_kv": True})
    assert status == 200 and deleted["deleted"] == "1" and deleted["prev_kvs"][0]["value"] == b64("2")


@pytest.mark.parametrize("path, body, status, code, message", [
    ("/v3/kv/range", {"key": ""}, 400, 3, "etcdserver: key is not provided"),
    ("/v3/kv/range", {"key": b64("k"), "revision": "999999"}, 400, 11,
     "etcdserver: mvcc: required revision is a future revision"),
    ("/v3/lease/revoke", {"ID": "5"}, 404, 5, "etcdserver: requested lease not found"),
    ("/v3/auth/authenticate", {"name": "root", "password": "x"}, 412, 9,
     "etcdserver: authentication is not enabled"),
])
def test_errors_carry_etcds_status_code_and_message(gateway, path, body, status, code, message):
    _, port = gateway
    assert post(port, path, body) == (status, {"error": message, "message": message, "code": code})


def test_malformed_requests_and_unknown_paths(gateway):
    _, port = gateway
    status, body = post(port, "/v3/kv/range", b"{not json")
    assert status == 400 and body["code"] == 3 and body["error"]
    status, body = post(port, "/v3/kv/range", {"key": "not base64!"})
    assert status == 400 and body["code"] == 3
    assert post(port, "/v3/kv/nope", {})[0] == 404
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/v3/kv/range")
    assert conn.getresponse().status == 405
    conn.close()


@pytest.mark.parametrize("body, fragment", [
    ({"key": "!!!notb64", "value": b64("v")}, "illegal base64 data"),
    ({"key": "-_8=", "value": b64("v")}, "illegal base64 data"),  # URL-safe alphabet
    ({"key": "Zm9vYg", "value": b64("v")}, "illegal base64 data"),  # no padding
    ({"key": b64("k"), "value": b64("v"), "lease": "abc"}, "lease"),
])
def test_a_put_etcd_would_refuse_writes_nothing(gateway, body, fragment):
    """protobuf's own JSON parser would take these (dropping characters,
    taking the URL-safe alphabet) and store a key nobody sent."""
    _, port = gateway
    before = post(port, "/v3/kv/range", {"key": b64("k")})[1]["header"]["revision"]
    status, answer = post(port, "/v3/kv/put", body)
    assert status == 400 and answer["code"] == 3 and fragment in answer["error"]
    assert post(port, "/v3/kv/range", {"key": b64("k")})[1]["header"]["revision"] == before


def test_unknown_enum_names_are_refused_not_defaulted(gateway):
    _, port = gateway
    status, answer = post(port, "/v3/kv/txn", {
        "compare": [{"key": b64("k"), "target": "BOGUS", "result": "EQUAL", "version": "0"}],
        "success": [{"request_put": {"key": b64("k"), "value": b64("v")}}]})
    assert status == 400 and 'unknown value "BOGUS"' in answer["error"]
    status, answer = post(port, "/v3/kv/range", {"key": b64("k"), "sort_order": "descend"})
    assert status == 400 and answer["code"] == 3
    # Numbers, etcd's /v3beta prefix, unknown fields and what follows the first object pass.
    assert post(port, "/v3beta/kv/range", b'{"key": "aw==", "sort_order": 2, "no_such_field": 1} trailing')[0] == 200


def test_watch_streams_result_lines_and_lease_keepalive_answers(gateway):
    _, port = gateway
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/v3/watch", json.dumps({"create_request": {"key": b64("gw/w"), "prev_kv": True}}))
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Transfer-Encoding") == "chunked"
    created = json.loads(resp.readline())["result"]
    assert created["created"] is True and created["header"]["revision"]
    post(port, "/v3/kv/put", {"key": b64("gw/w"), "value": b64("x")})
    post(port, "/v3/kv/deleterange", {"key": b64("gw/w")})
    put_event = json.loads(resp.readline())["result"]["events"][0]
    assert put_event["kv"]["value"] == b64("x") and "type" not in put_event  # PUT is the default (0)
    delete_event = json.loads(resp.readline())["result"]["events"][0]
    assert delete_event["type"] == "DELETE" and delete_event["prev_kv"]["value"] == b64("x")
    conn.close()

    status, grant = post(port, "/v3/lease/grant", {"TTL": 30})
    assert status == 200 and grant["TTL"] == "30"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    # Every request of the body up to a broken one is answered (etcd's gateway).
    conn.request("POST", "/v3/lease/keepalive", json.dumps({"ID": grant["ID"]}) * 2 + "{broken")
    lines = conn.getresponse().read().splitlines()
    assert [json.loads(line)["result"]["ID"] for line in lines] == [grant["ID"]] * 2
    conn.request("POST", "/v3/lease/keepalive", b"{broken")
    resp = conn.getresponse()
    assert resp.status == 500 and json.loads(resp.read())["code"] == 2
    conn.close()


def test_snapshot_streams_the_file_grpc_would(gateway, tmp_path):
    cluster, port = gateway
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v3/maintenance/snapshot", b"{}")
    chunks = [json.loads(line)["result"] for line in conn.getresponse().read().splitlines()]
    conn.close()
    blob = b"".join(base64.b64decode(c.get("blob", "")) for c in chunks)
    assert "remaining_bytes" not in chunks[-1]  # 0 on the last chunk: left out
    grpc_blob = b"".join(r.blob for r in cluster.members[0].maintenance().Snapshot(
        rpc_pb2.SnapshotRequest(), timeout=30))
    # Both are etcd databases followed by their sha256; the bytes differ by
    # when each was taken (the header's time).
    for data in (blob, grpc_blob):
        assert hashlib.sha256(data[:-32]).digest() == data[-32:]
        path = tmp_path / "snapshot.db"
        path.write_bytes(data)
        assert bbolt.is_bbolt(str(path))
    assert abs(len(blob) - len(grpc_blob)) <= 4096  # a page at most


def test_lock_and_election_through_the_gateway(gateway):
    _, port = gateway
    lease = post(port, "/v3/lease/grant", {"TTL": 30})[1]["ID"]
    status, held = post(port, "/v3/lock/lock", {"name": b64("gwlock"), "lease": lease})
    assert status == 200 and base64.b64decode(held["key"]) == b"gwlock/%x" % int(lease)
    assert post(port, "/v3/lock/unlock", {"key": held["key"]})[0] == 200
    assert post(port, "/v3/election/leader", {"name": b64("gwe")}) == \
        (500, {"error": "election: no leader", "message": "election: no leader", "code": 2})


def test_version_and_health_beside_the_gateway_and_lenient_bodies(gateway):
    """Patroni and APISIX ask for /version first; etcd's gateway takes the
    first object of a unary body, and a keep-alive body with no request
    gets no answer."""
    _, port = gateway
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/version")
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["etcdserver"].startswith("3.4")
    conn.request("GET", "/health")  # the same keep-alive connection
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["health"] == "true"
    conn.close()
    two = (json.dumps({"key": b64("gw/first"), "value": b64("1")}) +
           json.dumps({"key": b64("gw/second"), "value": b64("2")})).encode()
    assert post(port, "/v3/kv/put", two)[0] == 200
    assert post(port, "/v3/kv/range", {"key": b64("gw/second")})[1].get("count") is None  # 0: left out
    assert post(port, "/v3/kv/range", {"key": b64("gw/first")})[1]["count"] == "1"
    for body in (b"[]", b"1", b"null", b"[" * 100000):
        status, answer = post(port, "/v3/kv/range", body)
        assert status == 400 and answer["code"] == 3, body[:10]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/v3/lease/keepalive", b"")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read() == b""
    conn.close()


def test_a_lock_waiter_that_hangs_up_leaves_the_queue(gateway):
    cluster, port = gateway
    owner = post(port, "/v3/lease/grant", {"TTL": 30})[1]["ID"]
    quitter = post(port, "/v3/lease/grant", {"TTL": 30})[1]["ID"]
    assert post(port, "/v3/lock/lock", {"name": b64("hang"), "lease": owner})[0] == 200
    body = json.dumps({"name": b64("hang"), "lease": quitter}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST /v3/lock/lock HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    waiting = b"hang/%x" % int(quitter)
    deadline = time.monotonic() + 10
    while waiting not in keys(port, b"hang/"):
        assert time.monotonic() < deadline, "the waiter never queued"
        time.sleep(0.05)
    sock.close()
    deadline = time.monotonic() + 10
    while waiting in keys(port, b"hang/"):
        assert time.monotonic() < deadline, "the waiter's key stayed after its client hung up"
        time.sleep(0.05)


def keys(port: int, prefix: bytes) -> list[bytes]:
    end = prefix[:-1] + bytes([prefix[-1] + 1])
    got = post(port, "/v3/kv/range", {"key": base64.b64encode(prefix).decode(),
                                      "range_end": base64.b64encode(end).decode(), "keys_only": True})[1]
    return [base64.b64decode(kv["key"]) for kv in got.get("kvs", [])]


def test_a_stream_ends_when_its_client_goes_away():
    """The HTTP listener closes a StreamResponse's chunks once the client
    has closed its side, even while no chunk is due."""
    closed = threading.Event()
    started = threading.Event()

    async def chunks():
        try:
            yield b"first\n"
            started.set()
            await asyncio.sleep(3600)
            yield b"never\n"
        finally:
            closed.set()

    async def stream(req):
        return StreamResponse(200, chunks())

    router = Router()
    router.add("POST", "/s", stream)
    loop = asyncio.new_event_loop()
    server = HTTPServer(router, ["http://127.0.0.1:0"], what="test")
    loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        host, port = server.addresses[0]
        sock = socket.create_connection((host, port), timeout=10)
        sock.sendall(b"POST /s HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        received = b""
        while b"first" not in received:
            received += sock.recv(4096)
        assert b"Transfer-Encoding: chunked" in received and b"6\r\nfirst\n\r\n" in received
        assert started.wait(10)
        sock.close()
        assert closed.wait(10), "the stream was not closed after the client went away"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def _handled(port: int, method: str, code: str) -> float:
    """grpc_server_handled_total for an etcdserverpb.KV method, read from /metrics on `port`."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    want = {f'grpc_code="{code}"', f'grpc_method="{method}"', 'grpc_service="etcdserverpb.KV"', 'grpc_type="unary"'}
    for line in text.splitlines():
        if line.startswith("grpc_server_handled_total{"):
            labels = set(line[line.index("{") + 1:line.index("}")].split(","))
            if labels == want:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_gateway_calls_count_in_the_grpc_metrics_as_etcds_do(gateway):
    """etcd's gateway is a gRPC client of its own server: its calls show in
    grpc_server_* with their codes."""
    _cluster, port = gateway
    ranges, bad_puts = _handled(port, "Range", "OK"), _handled(port, "Put", "InvalidArgument")
    for _ in range(3):
        assert post(port, "/v3/kv/range", {"key": b64("gw/counted")})[0] == 200
    status, body = post(port, "/v3/kv/put", {"key": "", "value": b64("x")})  # etcd: key is not provided
    assert status == 400, body
    assert _handled(port, "Range", "OK") == ranges + 3
    assert _handled(port, "Put", "InvalidArgument") == bad_puts + 1
