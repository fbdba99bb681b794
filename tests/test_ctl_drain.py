"""`metastore ctl drain ...` and the LIVENESS columns of `endpoint status`
and `member list`, against a real 3-member cluster whose members serve the
placement API on their HTTP listeners.

A drain normally finishes in well under a second, too fast to watch or to
cancel. The tests hold it open the way a real application would: the owner
of a workload on another member reports sub-units running on the drain
target, and the drain cannot complete until they are reported gone."""
from __future__ import annotations

import http.server
import json
import re
import subprocess
import sys
import threading
from typing import Any, Iterator

import pytest

from metastore.cmd.ctl_common import CtlError, parse_endpoint
from metastore.cmd.ctl_drain import PlacementApi, Unavailable, _reachable, parse_http_urls, status_line
from metastore.testing import LocalCluster, Member, free_ports, wait_for

WORKLOADS = ("w1", "w2", "w3")


def _workloads(m: Member) -> list[dict]:
    status, doc = m.http("GET", "/api/v2/workloads")
    assert status == 200, doc
    return doc["workloads"]  # type: ignore[index]


def settled(cluster: LocalCluster) -> bool:
    """Every workload runs, every member is online, and the coordinator has
    nothing left to balance (the loads of the ALIVE members differ by at most
    one, its rule): a workload that moves later would drop the sub-units a
    test reported on it."""
    leader = cluster.leader()
    ws = _workloads(leader)
    if len(ws) != len(WORKLOADS) or any(w["state"] != "running" for w in ws):
        return False
    status, doc = leader.http("GET", "/api/v2/captures")
    assert status == 200, doc
    captures = doc["captures"]  # type: ignore[index]
    if len(captures) != len(cluster.members) or not all(c["online"] for c in captures):
        return False  # a member whose session starts later would still be balanced onto
    loads = [c["workloads"] for c in captures if c["liveness"] == "ALIVE"]
    return bool(loads) and max(loads) - min(loads) <= 1


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(3, extra_args=["--session-ttl", "2"]) as c:
        for wid in WORKLOADS:
            status, doc = c.members[0].http("PUT", f"/api/v2/workloads/{wid}", {"app": wid})
            assert status in (200, 201), doc
        wait_for(lambda: settled(c), 30, "the workloads to run")
        yield c


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """cwd of every CLI run: never the source tree."""
    return str(tmp_path_factory.mktemp("ctl-drain-cwd"))


def ctl_argv(endpoints: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "metastore", "ctl", "--endpoints", endpoints, *args]


@pytest.fixture
def ctl(workdir, cluster):
    def run(*args: str, endpoints: str | None = None, check: bool = True,
            timeout: float = 30) -> subprocess.CompletedProcess:
        proc = subprocess.run(ctl_argv(endpoints or cluster.endpoints, *args), input="", capture_output=True,
                              text=True, timeout=timeout, cwd=workdir)
        assert "Traceback" not in proc.stderr, proc.stderr
        if check:
            assert proc.returncode == 0, f"ctl {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}"
        return proc
    return run


@pytest.fixture
def ctl_background(workdir, cluster):
    """Start a ctl command that follows a drain; killed if the test leaves it running."""
    procs: list[subprocess.Popen] = []

    def start(*args: str) -> subprocess.Popen:
        proc = subprocess.Popen(ctl_argv(cluster.endpoints, *args), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=workdir)
        procs.append(proc)
        return proc
    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def member_id(m: Member) -> str:
    return f"{m.status().header.member_id:x}"


def follower(cluster: LocalCluster) -> Member:
    return cluster.followers()[0]


def drain_doc(cluster: LocalCluster, m: Member) -> dict:
    status, doc = cluster.leader().http("GET", f"/api/v2/captures/{m.name}/drain")
    assert status == 200, doc
    return doc  # type: ignore[return-value]


def report_subunits(cluster: LocalCluster, target: Member, count: int, workload: str | None = None) -> str:
    """As the owner of a workload on another member, report `count` sub-units
    running on `target` (0 clears them); returns the workload's id."""
    target_id = member_id(target)
    for w in _workloads(cluster.leader()):
        if w["state"] == "running" and w["owner"] != target_id and workload in (None, w["id"]):
            status, doc = cluster.leader().http("PUT", f"/api/v2/workloads/{w['id']}/subunits", {
                "member": w["owner"], "epoch": w["epoch"], "subunits": {target_id: count} if count else {}})
            assert status == 200 or (count == 0 and status == 409), doc  # 409: moved since, nothing left to clear
            return w["id"]
    raise AssertionError(f"no running workload off {target.name}: {_workloads(cluster.leader())}")


def undrain(cluster: LocalCluster, m: Member) -> None:
    """Leave the shared cluster as the next test expects it: m ALIVE, nothing moving."""
    status, doc = cluster.leader().http("DELETE", f"/api/v2/captures/{m.name}/drain")
    assert status == 200 and doc["liveness"] == "ALIVE", doc  # type: ignore[index]
    wait_for(lambda: settled(cluster), 30, "the workloads to settle")


def table_rows(text: str) -> tuple[list[str], list[list[str]]]:
    lines = text.splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("|")]
    return cells[0], cells[1:]


def column(text: str, name: str) -> list[str]:
    header, rows = table_rows(text)
    return [r[header.index(name)] for r in rows]


def json_lines(text: str) -> list[Any]:
    return [json.loads(line) for line in text.splitlines()]


# -- listing ----------------------------------------------------------------------------------
def test_list_members_with_liveness(ctl, cluster):
    leader = cluster.leader()
    captures = json.loads(ctl("drain", "list", "-w", "json").stdout)["captures"]
    assert sorted(c["name"] for c in captures) == ["m1", "m2", "m3"]
    assert {c["liveness"] for c in captures} == {"ALIVE"} and all(c["online"] for c in captures)
    assert [c["name"] for c in captures if c["is_coordinator"]] == [leader.name]
    assert sum(c["workloads"] for c in captures) == len(WORKLOADS)

    table = ctl("drain", "members", "-w", "table").stdout
    header, rows = table_rows(table)
    assert header == ["MEMBER", "ID", "LIVENESS", "ONLINE", "COORDINATOR", "WORKLOADS", "SUB-UNITS"]
    assert sorted(column(table, "MEMBER")) == ["m1", "m2", "m3"]
    assert [r[0] for r in rows if r[4] == "true"] == [leader.name]

    # member list: LIVENESS added to the table; simple stays etcdctl's six fields.
    table = ctl("member", "list", "-w", "table").stdout
    assert table_rows(table)[0][-1] == "LIVENESS" and column(table, "LIVENESS") == ["ALIVE"] * 3
    assert all(len(line.split(", ")) == 6 for line in ctl("member", "list").stdout.splitlines())


# -- refusals and failures ---------------------------------------------------------------------
def test_errors_are_readable_and_fail(ctl, cluster):
    leader = cluster.leader()
    proc = ctl("drain", "start", leader.name, check=False)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("Error: ") and "coordinator" in proc.stderr, proc.stderr
    assert drain_doc(cluster, leader)["liveness"] == "ALIVE"

    proc = ctl("drain", "status", "nosuch", check=False)
    assert proc.returncode == 1 and "Error: no member" in proc.stderr, proc.stderr

    dead = free_ports(1)[0]
    proc = ctl("drain", "list", endpoints=f"127.0.0.1:{dead}", check=False)
    assert proc.returncode == 1, proc
    assert f"cannot connect to 127.0.0.1:{dead}" in proc.stderr and "connection refused" in proc.stderr

    # --http-url skips discovery: it is the only place asked.
    proc = ctl("drain", "status", "m1", "--http-url", f"http://127.0.0.1:{dead}", check=False)
    assert proc.returncode == 1 and "cannot reach the placement API" in proc.stderr, proc.stderr
    assert ctl("drain", "--http-url", leader.http_url, "status", "m1").stdout.startswith("m1 (")

    proc = ctl("drain", "start", "m1", "--deadline", "soon", check=False)
    assert proc.returncode == 128 and "--deadline" in proc.stderr, proc.stderr


# -- a drain, followed -------------------------------------------------------------------------
def test_drain_watch_to_completion_then_undrain(ctl, ctl_background, cluster):
    target = follower(cluster)
    held = report_subunits(cluster, target, 2)
    try:
        out = ctl("drain", "start", target.name).stdout
        assert re.fullmatch(rf"draining {target.name}: \d+ workloads? and 2 sub-units to move\n", out), out
        watch = ctl_background("drain", "status", target.name, "--watch", "--interval", "0.1s")
        # Its own workloads move off; the two sub-units hold the drain open.
        wait_for(lambda: drain_doc(cluster, target)["remaining_maintainer_count"] == 0, 20,
                 "the target's workloads to move")
        doc = json.loads(ctl("drain", "status", target.name, "-w", "json").stdout)
        assert doc["is_draining"] and doc["liveness"] == "DRAINING", doc
        assert doc["remaining_dispatcher_count"] == doc["initial_dispatcher_count"] == 2, doc
        assert doc["name"] == target.name and doc["start_time"].endswith("Z") and doc["elapsed_seconds"] >= 0
        table = ctl("drain", "status", target.name, "-w", "table").stdout
        assert column(table, "LIVENESS") == ["DRAINING"] and column(table, "REMAINING SUB-UNITS") == ["2"]
        assert watch.poll() is None, watch.communicate()

        report_subunits(cluster, target, 0, held)
        stdout, stderr = watch.communicate(timeout=20)
    finally:
        report_subunits(cluster, target, 0, held)
    assert watch.returncode == 0, stderr
    lines = stdout.splitlines()
    assert lines[-1] == f"drain of {target.name} complete: STOPPING", stdout
    assert any(f"{target.name} (" in line and "DRAINING" in line and "2 of 2 sub-units left" in line
               for line in lines[:-1]), stdout
    # A line per change of progress, not per poll (it polled every 0.1 s for seconds).
    assert len(lines) <= 4, stdout

    try:
        # Drained: STOPPING everywhere the ctl shows liveness.
        doc = json.loads(ctl("drain", "status", target.name, "-w", "json").stdout)
        assert doc["liveness"] == "STOPPING" and not doc["is_draining"], doc
        table = ctl("endpoint", "status", "-w", "table").stdout
        by_endpoint = dict(zip(column(table, "ENDPOINT"), column(table, "LIVENESS")))
        assert by_endpoint == {m.endpoint: "STOPPING" if m is target else "ALIVE" for m in cluster.members}
        entries = json.loads(ctl("endpoint", "status", "-w", "json", endpoints=target.endpoint).stdout)
        assert entries[0]["Raft"]["liveness"] == "STOPPING"
        table = ctl("member", "list", "-w", "table").stdout
        assert dict(zip(column(table, "NAME"), column(table, "LIVENESS")))[target.name] == "STOPPING"
        # A watch of a drain already over says so at once.
        assert ctl("drain", "status", target.name, "--watch").stdout == \
            f"drain of {target.name} complete: STOPPING\n"

        assert ctl("drain", "cancel", target.name).stdout == f"{target.name} undrained: ALIVE\n"
        assert drain_doc(cluster, target)["liveness"] == "ALIVE"
    finally:
        undrain(cluster, target)


def test_cancelled_drain_ends_the_wait_with_an_error(ctl, ctl_background, cluster):
    target = follower(cluster)
    held = report_subunits(cluster, target, 1)
    try:
        waiting = ctl_background("drain", "start", target.name, "--wait", "-w", "json", "--interval", "0.1s")
        wait_for(lambda: drain_doc(cluster, target)["is_draining"], 20, "the drain to start")
        wait_for(lambda: drain_doc(cluster, target)["remaining_maintainer_count"] == 0, 20,
                 "the target's workloads to move")
        other = next(m for m in cluster.followers() if m is not target)
        proc = ctl("drain", "start", other.name, check=False)  # 409
        assert proc.returncode == 1 and "one drain at a time" in proc.stderr, proc.stderr
        assert ctl("drain", "cancel", target.name).stdout == f"drain of {target.name} cancelled: ALIVE\n"
        stdout, stderr = waiting.communicate(timeout=20)
    finally:
        report_subunits(cluster, target, 0, held)
        undrain(cluster, target)
    assert waiting.returncode == 5, stderr
    assert stderr.startswith(f"Error: drain of {target.name} ended without completing"), stderr
    docs = json_lines(stdout)  # -w json: one document per line, stable for scripts
    assert docs[0] == {"current_maintainer_count": docs[0]["current_maintainer_count"],
                       "current_dispatcher_count": 1}, docs[0]
    assert docs[1]["liveness"] == "DRAINING" and docs[-1]["liveness"] == "ALIVE", docs

    # Nothing holding it: --wait returns once the member is STOPPING.
    try:
        lines = ctl("drain", "start", target.name, "--wait", "--deadline", "1m").stdout.splitlines()
        assert lines[0].startswith(f"draining {target.name}: ") and \
            lines[-1] == f"drain of {target.name} complete: STOPPING", lines
    finally:
        undrain(cluster, target)


# -- no HTTP listener ---------------------------------------------------------------------------
def test_without_http_listener(workdir):
    single = LocalCluster(1)
    single.members[0].http_port = 0  # no --listen-metrics-urls
    with single:
        eps = single.endpoints
        proc = subprocess.run(ctl_argv(eps, "drain", "list"), capture_output=True, text=True, cwd=workdir,
                              timeout=30)
        assert proc.returncode == 1 and "--listen-metrics-urls" in proc.stderr, proc.stderr
        # member list still shows liveness, from the member's own GetRaftStatus
        # (once the member's session is registered, shortly after it starts).
        def liveness_column() -> list[str]:
            proc = subprocess.run(ctl_argv(eps, "member", "list", "-w", "table"), capture_output=True,
                                  text=True, cwd=workdir, timeout=30)
            assert proc.returncode == 0, proc.stderr
            return column(proc.stdout, "LIVENESS")

        wait_for(lambda: liveness_column() == ["ALIVE"], 15, "member list to show the member ALIVE")


# -- the client's pieces, without a cluster ------------------------------------------------------
def test_listener_urls():
    via = parse_endpoint("10.0.0.5:2379")
    # A member listening on every interface is reached where its gRPC endpoint was.
    assert _reachable("http://0.0.0.0:2381", via) == "http://10.0.0.5:2381"
    assert _reachable("http://[::]:2381/", via) == "http://10.0.0.5:2381"
    assert _reachable("http://[::1]:2381", via) == "http://[::1]:2381"
    assert _reachable("http://127.0.0.1:99999", via) is None and _reachable("unix:///sock", via) is None
    assert parse_http_urls("127.0.0.1:2381, https://h:1/") == ["http://127.0.0.1:2381", "https://h:1"]
    for bad in ("", "ftp://h:1", "http://h", "http://h:port"):
        with pytest.raises(ValueError):
            parse_http_urls(bad)


def test_status_lines_for_people():
    draining = {"name": "m2", "member_id": "ab", "is_draining": True, "liveness": "DRAINING", "online": True,
                "elapsed_seconds": 125.3, "remaining_maintainer_count": 3, "initial_maintainer_count": 10,
                "remaining_dispatcher_count": 1, "initial_dispatcher_count": 1, "deadline": ""}
    assert status_line(draining) == \
        "m2 (ab): DRAINING for 2m05s, 3 of 10 workloads and 1 of 1 sub-unit left\n"
    idle = {"name": "m3", "member_id": "cd", "is_draining": False, "draining_capture_id": "ab",
            "liveness": "ALIVE", "online": False}
    assert status_line(idle) == "m3 (cd): ALIVE, not draining (member ab is being drained); offline\n"


@pytest.fixture
def stub_listeners() -> Iterator[dict[int, str]]:
    """HTTP listeners answering every request with a fixed status: 503
    (no leader), 200 and 409, as {status: url}."""
    servers = []

    def serve(status: int) -> str:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                body = json.dumps({"error": "the cluster has no leader"} if status >= 400 else {"ok": True})
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args: object) -> None:
                pass
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield {status: serve(status) for status in (503, 200, 409)}
    for server in servers:
        server.shutdown()
        server.server_close()


def test_client_moves_on_past_unreachable_and_unavailable_listeners(stub_listeners):
    refused = f"http://127.0.0.1:{free_ports(1)[0]}"
    api = PlacementApi([refused, stub_listeners[503], stub_listeners[200]], 1.0, 2.0)
    assert api.get("/api/v2/captures") == {"ok": True}
    with pytest.raises(Unavailable, match="unavailable, retry: .*no leader .*HTTP 503"):
        PlacementApi([refused, stub_listeners[503]], 1.0, 2.0).get("/x")
    with pytest.raises(Unavailable, match=f"cannot reach the placement API at {refused}: connection refused"):
        PlacementApi([refused], 1.0, 2.0).get("/x")
    # A 4xx is the server's final word: no other listener is asked.
    with pytest.raises(CtlError) as refused_4xx:
        PlacementApi([stub_listeners[409], stub_listeners[200]], 1.0, 2.0).get("/x")
    assert not isinstance(refused_4xx.value, Unavailable)
    assert refused_4xx.value.format_message() == "the cluster has no leader"
