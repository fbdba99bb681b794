"""`metastore ctl` against a real 3-member cluster, side by side with
etcdctl 3.4: the same output for the commands both have, metastore's Raft
status on top, membership, leadership, snapshots, and readable errors."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from metastore import dbsnapshot
from metastore.api.pb import rpc_pb2
from metastore.testing import LocalCluster, free_ports, wait_for

pytestmark = pytest.mark.usefixtures("etcdctl_installed")


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(3) as c:
        yield c


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """cwd of every CLI run: never the source tree."""
    return str(tmp_path_factory.mktemp("ctl-cwd"))


@pytest.fixture
def ctl(workdir, cluster):
    def run(*args: str, endpoints: str | None = None, check: bool = True, input: str | None = None,
            timeout: float = 30) -> subprocess.CompletedProcess:
        eps = endpoints if endpoints is not None else cluster.endpoints
        proc = subprocess.run([sys.executable, "-m", "metastore", "ctl", "--endpoints", eps, *args],
                              input=input if input is not None else "", capture_output=True, text=True,
                              timeout=timeout, cwd=workdir)
        assert "Traceback" not in proc.stderr, proc.stderr
        if check:
            assert proc.returncode == 0, f"ctl {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}"
        return proc
    return run


def etcdctl(cluster, *args: str, endpoints: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return cluster.etcdctl(*args, endpoints=endpoints, check=check)


# -- endpoint status --------------------------------------------------------------------------
def test_endpoint_status_json_reports_raft_state(ctl, cluster):
    entries = json.loads(ctl("endpoint", "status", "-w", "json").stdout)
    assert [e["Endpoint"] for e in entries] == [m.endpoint for m in cluster.members]
    leaders = [e for e in entries if e["Raft"]["state"] == "leader"]
    assert len(leaders) == 1, entries
    leader_id = leaders[0]["Status"]["header"]["member_id"]
    for e in entries:
        st, raft = e["Status"], e["Raft"]
        assert raft["state"] in ("leader", "follower"), raft
        assert raft["node_id"] == st["header"]["member_id"]
        assert raft["leader_id"] == st["leader"] == leader_id
        assert 0 < raft["applied"] <= raft["commit"], raft
        assert st["raftAppliedIndex"] <= st["raftIndex"]
        assert st["version"] and st["dbSize"] > 0
    # The "Status" part is etcdctl's own JSON shape.
    theirs = json.loads(etcdctl(cluster, "endpoint", "status", "-w", "json").stdout)
    assert [sorted(e) for e in theirs] == [["Endpoint", "Status"]] * 3
    assert [sorted(e["Status"]) for e in theirs] == [sorted(e["Status"]) for e in entries]


def test_endpoint_status_table_and_simple(ctl, cluster):
    table = ctl("endpoint", "status", "-w", "table").stdout.splitlines()
    header = [c.strip() for c in table[1].strip("|").split("|")]
    assert header[:10] == ["ENDPOINT", "ID", "VERSION", "DB SIZE", "IS LEADER", "IS LEARNER", "RAFT TERM",
                           "RAFT INDEX", "RAFT APPLIED INDEX", "RAFT STATE"]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table[3:-1]]
    assert len(rows) == 3 and table[0] == table[2] == table[-1]
    state = header.index("RAFT STATE")
    assert sorted(r[state] for r in rows) == ["follower", "follower", "leader"]
    assert [r[4] for r in rows if r[state] == "leader"] == ["true"]
    commit, applied = header.index("COMMIT INDEX"), header.index("APPLIED INDEX")
    assert all(int(r[applied]) <= int(r[commit]) for r in rows)
    # etcdctl's columns come first, with etcdctl's values (endpoint, id,
    # version, db size format, is leader, is learner).
    ours = [line.split(", ") for line in ctl("endpoint", "status").stdout.splitlines()]
    theirs = [line.split(", ") for line in etcdctl(cluster, "endpoint", "status").stdout.splitlines()]
    assert [r[:6] for r in ours] == [r[:6] for r in theirs]
    assert [r[9] for r in ours].count("leader") == 1
    # --cluster: every member's client URL, as etcdctl shows them.
    one = cluster.members[0].endpoint
    ours = ctl("endpoint", "status", "--cluster", endpoints=one).stdout.splitlines()
    theirs = etcdctl(cluster, "endpoint", "status", "--cluster", endpoints=one).stdout.splitlines()
    assert [line.split(", ")[:2] for line in ours] == [line.split(", ")[:2] for line in theirs]
    assert sorted(line.split(", ")[0] for line in ours) == sorted(m.client_url for m in cluster.members)


# -- member ---------------------------------------------------------------------------------
def member_lines(ctl) -> list[str]:
    return ctl("member", "list").stdout.splitlines()


def test_member_list_add_remove_round_trip(ctl, cluster):
    # Members publish their client URLs through Raft shortly after they start.
    wait_for(lambda: all(f"{m.peer_url}, {m.client_url}, false" in "\n".join(member_lines(ctl))
                         for m in cluster.members), 15, "every member to publish its client URL")
    assert ctl("member", "list").stdout == etcdctl(cluster, "member", "list").stdout
    # The table is etcdctl's with metastore's LIVENESS column appended.
    ours = ctl("member", "list", "-w", "table").stdout.splitlines()
    theirs = etcdctl(cluster, "member", "list", "-w", "table").stdout.splitlines()
    assert len(ours) == len(theirs) and all(o.startswith(t) for o, t in zip(ours, theirs)), (ours, theirs)
    assert ours[1].endswith(" LIVENESS |")
    listed = json.loads(ctl("member", "list", "-w", "json").stdout)
    assert sorted(m["name"] for m in listed["members"]) == ["m1", "m2", "m3"]

    founders = list(cluster.members)
    new = cluster.add_member("m4", start=False)
    try:
        _add_start_remove(ctl, cluster, founders, new)
    finally:
        # Whatever failed, leave the shared cluster as it was: three members.
        if new.running:
            cluster.kill(new)
        new.stopped = True
        ids = {line.split(", ")[0] for line in member_lines(ctl) if new.peer_url in line}
        for member_id in ids:
            ctl("member", "remove", member_id, check=False)
        cluster.members.remove(new)
    assert sorted(line.split(", ")[2] for line in member_lines(ctl)) == ["m1", "m2", "m3"]
    cluster.wait_ready()


def _add_start_remove(ctl, cluster, founders, new) -> None:
    out = ctl("member", "add", "m4", "--peer-urls", new.peer_url).stdout
    m = re.match(r"Member ([0-9a-f ]{16}) added to cluster ([0-9a-f ]{16})\n", out)
    assert m, out
    new_id = m.group(1).strip()
    assert "--initial-cluster-state existing" in out and f"m4={new.peer_url}" in out
    assert all(f"{f.name}={f.peer_url}" in out for f in founders)
    assert f"{new_id}, unstarted, , {new.peer_url}, , false" in member_lines(ctl)

    cluster.start_member(new)
    wait_for(lambda: new.kv().Range(rpc_pb2.RangeRequest(key=b"x"), timeout=2) is not None, 30,
             "the new member to serve")
    wait_for(lambda: f"{new_id}, started, m4, {new.peer_url}, {new.client_url}, false" in member_lines(ctl),
             15, "m4 to publish itself")

    eps = ",".join(f.endpoint for f in founders)
    out = ctl("member", "remove", new_id, endpoints=eps).stdout
    assert re.fullmatch(rf"Member {new_id:>16} removed from cluster [0-9a-f ]{{16}}\n", out), out
    new.proc.wait(timeout=30)
    new.stopped = True
    assert "removed from the cluster" in new.log()


# -- move-leader ----------------------------------------------------------------------------
def test_move_leader(ctl, cluster):
    leader = cluster.leader()
    leader_id = leader.status().header.member_id
    target = cluster.followers()[0]
    target_id = target.status().header.member_id
    out = ctl("move-leader", f"{target_id:x}").stdout
    assert out == f"Leadership transferred from {leader_id:x} to {target_id:x}\n"
    assert cluster.leader() is target
    # Given only followers, it finds the leader through the member list.
    followers = [m for m in cluster.running_members if m is not target]
    out = ctl("move-leader", f"{leader_id:x}", endpoints=",".join(m.endpoint for m in followers)).stdout
    assert out == f"Leadership transferred from {target_id:x} to {leader_id:x}\n"
    assert cluster.leader() is leader
    proc = ctl("move-leader", "abcdef", check=False)
    assert proc.returncode == 1 and "etcdserver: bad leader transferee" in proc.stderr


# -- snapshot -------------------------------------------------------------------------------
def test_snapshot_trailer_check_handles_any_chunking():
    from metastore.cmd.ctl_snapshot import _Trailer

    data = os.urandom(1000)
    stream = data + hashlib.sha256(data).digest()
    for cuts in ([], [1], [31, 32, 33], [990, 1000, 1010, 1031], list(range(1, len(stream), 7))):
        t = _Trailer()
        edges = [0, *cuts, len(stream)]
        for a, b in zip(edges, edges[1:]):
            t.feed(stream[a:b])
        assert t.tail == t.sha.digest() == hashlib.sha256(data).digest()
    t = _Trailer()
    t.feed(stream[:-1] + bytes([stream[-1] ^ 1]))
    assert t.tail != t.sha.digest()


def test_snapshot_save_and_restore(ctl, cluster, tmp_path):
    for i in range(20):
        cluster.members[0].kv().Put(rpc_pb2.PutRequest(key=b"snap/%02d" % i, value=b"value %d" % i), timeout=5)
    expected = etcdctl(cluster, "get", "--prefix", "snap/").stdout
    path = tmp_path / "backup.db"
    proc = ctl("snapshot", "save", str(path))
    assert proc.stdout == f"Snapshot saved at {path}\n"
    assert os.listdir(tmp_path) == ["backup.db"], "the temporary file is renamed into place"
    header = dbsnapshot.verify(str(path))  # sha256 trailer and format check
    data = path.read_bytes()
    assert hashlib.sha256(data[:-32]).digest() == data[-32:]
    info = json.loads(ctl("snapshot", "save", str(tmp_path / "again.db"), "-w", "json").stdout)
    assert info["size"] == os.path.getsize(tmp_path / "again.db")
    assert info["sha256"] == (tmp_path / "again.db").read_bytes()[-32:].hex()
    assert info["revision"] >= header["revision"]

    # Restore with `metastore ctl snapshot restore` (the same command as
    # `metastore snapshot restore`), then start `metastore serve` on it.
    restored = LocalCluster(1, base_dir=str(tmp_path / "restored"), token="ctl-restored")
    m = restored.members[0]
    proc = ctl("snapshot", "restore", str(path), "--data-dir", m.data_dir, "--name", m.name,
               "--initial-cluster", f"{m.name}={m.peer_url}", "--initial-cluster-token", restored.token,
               "--initial-advertise-peer-urls", m.peer_url)
    assert f"revision {header['revision']}" in proc.stdout
    with restored:
        assert ctl("get", "--prefix", "snap/", endpoints=m.endpoint).stdout == expected
        assert ctl("endpoint", "status", "-w", "json", endpoints=m.endpoint).stdout.count('"state":"leader"') == 1

    proc = ctl("snapshot", "save", str(tmp_path / "missing-dir" / "x.db"), check=False)
    assert proc.returncode == 1 and "does not exist" in proc.stderr


# -- get / put / del / watch: etcdctl's output ----------------------------------------------------
class Lines:
    """The stdout of a long-running process, line by line, without blocking."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.lines: queue.Queue[bytes] = queue.Queue()
        self.seen: list[bytes] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)

    def until(self, predicate, timeout: float = 15) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while not predicate(self.seen):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out; output so far: {self.seen!r}")
            try:
                self.seen.append(self.lines.get(timeout=left))
            except queue.Empty:
                pass
        return self.seen

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def spawn(argv: list[str], cwd: str) -> Lines:
    env = dict(os.environ, ETCDCTL_API="3")
    return Lines(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  stdin=subprocess.DEVNULL, cwd=cwd, env=env))


def test_get_put_del_output_equals_etcdctls(ctl, cluster):
    one = cluster.members[0].endpoint  # one endpoint: the same member_id in JSON headers
    same = lambda *args: (ctl(*args, endpoints=one).stdout, etcdctl(cluster, *args, endpoints=one).stdout)  # noqa: E731

    for key, value in [("kv/a", "1"), ("kv/b", "two words"), ("kv/c", "héllo"), ("kv/d", "x\ny")]:
        assert ctl("put", key, value).stdout == "OK\n"
    lease = etcdctl(cluster, "lease", "grant", "600").stdout.split()[1]
    assert ctl("put", "kv/leased", "v", "--lease", lease).stdout == etcdctl(
        cluster, "put", "kv/leased", "v", "--lease", lease).stdout == "OK\n"
    first_rev = json.loads(ctl("get", "kv/a", "-w", "json").stdout)["kvs"][0]["mod_revision"]
    ctl("put", "kv/a", "updated")

    comparisons = [
        ("get", "kv/a"),
        ("get", "kv/missing"),
        ("get", "--prefix", "kv/"),
        ("get", "kv/a", "kv/c"),
        ("get", "--prefix", "kv/", "--keys-only"),
        ("get", "--prefix", "kv/", "--print-value-only"),
        ("get", "--prefix", "kv/", "--limit", "2"),
        ("get", "--prefix", "kv/", "--rev", str(first_rev)),
        ("get", "--prefix", "kv/", "--order", "DESCEND", "--sort-by", "MODIFY"),
        ("get", "--from-key", "kv/c"),
        ("--hex", "get", "kv/c"),
        ("get", "--prefix", "kv/", "-w", "json"),
        ("get", "--prefix", "kv/", "--limit", "1", "-w", "json"),
        ("get", "kv/missing", "-w", "json"),
        ("get", "kv/leased", "-w", "json"),
    ]
    with ThreadPoolExecutor(4) as pool:
        for args, (ours, theirs) in zip(comparisons, pool.map(lambda args: same(*args), comparisons)):
            assert ours == theirs, args
    assert same("get", "kv/c")[0] == "kv/c\nhéllo\n"

    # put: --prev-kv prints the previous pair; -w json is etcd's PutResponse.
    assert ctl("put", "kv/a", "again", "--prev-kv").stdout == "OK\nkv/a\nupdated\n"
    ours = json.loads(ctl("put", "kv/a", "3", "-w", "json", endpoints=one).stdout)
    theirs = json.loads(etcdctl(cluster, "put", "kv/a", "4", "-w", "json", endpoints=one).stdout)
    assert ours["header"]["revision"] + 1 == theirs["header"]["revision"]
    assert sorted(ours) == sorted(theirs) == ["header"]

    # del: the same keys deleted by each tool print the same.
    def fill() -> None:
        for k in ("a", "b", "c"):
            etcdctl(cluster, "put", f"del/{k}", f"v-{k}")

    for args in [("del", "del/a"), ("del", "del/nothing"), ("del", "--prefix", "del/"),
                 ("del", "del/a", "del/c"), ("del", "--prefix", "del/", "--prev-kv")]:
        fill()
        ours = ctl(*args).stdout
        fill()
        assert ours == etcdctl(cluster, *args).stdout, args
    fill()
    deleted = json.loads(ctl("del", "--prefix", "del/", "--prev-kv", "-w", "json").stdout)
    assert deleted["deleted"] == 3
    assert [base64.b64decode(kv["key"]) for kv in deleted["prev_kvs"]] == [b"del/a", b"del/b", b"del/c"]

    # Stdin as the value, as etcdctl.
    assert ctl("put", "kv/stdin", input="from stdin").stdout == "OK\n"
    assert ctl("get", "kv/stdin", "--print-value-only").stdout == "from stdin\n"


def test_watch_output_equals_etcdctls(ctl, cluster, workdir):
    one = cluster.members[1].endpoint
    start = json.loads(ctl("put", "w/a", "1", "-w", "json").stdout)["header"]["revision"]
    ctl("put", "w/b", "2")
    ctl("del", "w/a")
    ctl("put", "w/b", "three")
    ctl("put", "w/zz-end", "done")
    cmd = [sys.executable, "-m", "metastore", "ctl", "--endpoints", one]
    tool = ["etcdctl", "--endpoints", one]
    # History replay (--rev) gives both tools the same events.
    for extra in ([], ["--prev-kv"]):
        args = ["watch", "--prefix", "w/", "--rev", str(start), *extra]
        outputs = []
        for argv in (cmd + args, tool + args):
            lines = spawn(argv, workdir)
            try:
                outputs.append(lines.until(lambda seen: b"w/zz-end\n" in seen and seen[-1] == b"done\n"))
            finally:
                lines.stop()
        assert outputs[0] == outputs[1], extra
    assert outputs[0][:4] == [b"PUT\n", b"w/a\n", b"1\n", b"PUT\n"]
    assert b"DELETE\n" in outputs[0]

    # JSON: etcdctl's WatchResponse lines; the same events.
    end_key = base64.b64encode(b"w/zz-end").decode()
    args = ["watch", "--prefix", "w/", "--rev", str(start), "--prev-kv", "-w", "json"]
    events = []
    for argv in (cmd + args, tool + args):
        lines = spawn(argv, workdir)
        try:
            seen = lines.until(lambda seen: any(end_key.encode() in line for line in seen))
        finally:
            lines.stop()
        responses = [json.loads(line) for line in seen]
        assert all(sorted(r) == ["Canceled", "CompactRevision", "Created", "Events", "Header"] for r in responses)
        events.append([e for r in responses for e in r["Events"]])
    assert events[0] == events[1]

    # Live: events after the watch starts, for a single key.
    lines = spawn(cmd + ["watch", "w/live"], workdir)
    try:
        n = 0

        def pinged() -> bool:
            nonlocal n
            n += 1
            ctl("put", "w/live", f"ping{n}")
            try:
                lines.until(lambda seen: b"PUT\n" in seen, timeout=0.5)
                return True
            except AssertionError:
                return False

        wait_for(pinged, 20, "the watch to see a put")
        ctl("put", "w/live", "x y")
        ctl("del", "w/live")
        got = lines.until(lambda seen: seen[-3:] == [b"DELETE\n", b"w/live\n", b"\n"])
        assert got[-6:] == [b"PUT\n", b"w/live\n", b"x y\n", b"DELETE\n", b"w/live\n", b"\n"]
    finally:
        lines.stop()


# -- errors -------------------------------------------------------------------------------------
def test_cli_misuse_gives_readable_errors(ctl, cluster):
    for args in [("member", "remove", "zz"), ("move-leader", "not-hex"), ("member", "promote", "12345678901234567")]:
        proc = ctl(*args, check=False)
        assert proc.returncode == 128, (args, proc.stderr)
        assert "bad member ID" in proc.stderr and "Hex" in proc.stderr
        assert proc.returncode == etcdctl(cluster, *args, check=False).returncode
    proc = ctl("member", "remove", "abcdef", check=False)
    assert proc.returncode == 1 and proc.stderr == "Error: etcdserver: member not found\n"
    proc = ctl("member", "promote", f"{cluster.members[0].status().header.member_id:x}", check=False)
    assert proc.returncode == 1 and proc.stderr == "Error: etcdserver: can only promote a learner member\n"
    proc = ctl("get", "a", "b", "--prefix", check=False)
    assert proc.returncode == 128 and "only accept one argument" in proc.stderr
    proc = ctl("put", "k", "v", "--lease", "xyz", check=False)
    assert proc.returncode == 128 and "bad lease ID" in proc.stderr
    proc = ctl("get", "k", "-w", "yaml", check=False)
    assert proc.returncode == 4 == etcdctl(cluster, "get", "k", "-w", "yaml", check=False).returncode
    # Like etcdctl, KV commands have no table format; nothing is written.
    proc = ctl("put", "table/k", "v", "-w", "table", check=False)
    assert proc.returncode == 4 and proc.stderr == "Error: table not supported as output format\n"
    assert ctl("get", "table/k").stdout == ""
    assert etcdctl(cluster, "get", "k", "-w", "table", check=False).returncode == 4
    proc = ctl("get", "--no-such-flag", "k", check=False)
    assert proc.returncode == 128 and "no-such-flag" in proc.stderr
    proc = ctl("get", "k", endpoints="not-an-endpoint", check=False)
    assert proc.returncode == 128 and "not-an-endpoint" in proc.stderr and "host:port" in proc.stderr


def test_unreachable_endpoints_fail_within_the_dial_timeout(ctl, cluster):
    dead = ",".join(f"127.0.0.1:{p}" for p in free_ports(2))
    def attempt(args: tuple[str, ...]) -> tuple[subprocess.CompletedProcess, float]:
        started = time.monotonic()
        proc = ctl("--dial-timeout", "1s", *args, endpoints=dead, check=False, timeout=20)
        return proc, time.monotonic() - started

    commands = [("get", "k"), ("put", "k", "v"), ("member", "list"), ("watch", "k"),
                ("snapshot", "save", "never.db"), ("move-leader", "1")]
    with ThreadPoolExecutor(len(commands)) as pool:
        for args, (proc, elapsed) in zip(commands, pool.map(attempt, commands)):
            assert proc.returncode == 1, (args, proc.stderr)
            assert "within the dial timeout (1s)" in proc.stderr, (args, proc.stderr)
            assert "connection refused" in proc.stderr, (args, proc.stderr)
            assert elapsed < 8, f"{args}: {elapsed:.1f}s"
    # Status reports the dead endpoint, still prints the live one, exits 1.
    live = cluster.members[0].endpoint
    proc = ctl("endpoint", "status", "--dial-timeout", "500ms", endpoints=f"{dead},{live}", check=False)
    assert proc.returncode == 1
    assert proc.stdout.startswith(f"{live}, ") and proc.stdout.count("\n") == 1
    assert proc.stderr.count("Failed to get the status of endpoint") == 2
    # With one dead endpoint among live ones, requests go to a live one.
    assert ctl("get", "k", endpoints=f"{dead},{cluster.endpoints}").returncode == 0


def test_watch_canceled_by_compaction_exits_5(ctl, cluster):
    """Last in this module: compacts the shared cluster's history."""
    rev = json.loads(ctl("put", "compact/me", "x", "-w", "json").stdout)["header"]["revision"]
    etcdctl(cluster, "compaction", str(rev))
    proc = ctl("watch", "compact/me", "--rev", "1", check=False, timeout=20)
    assert proc.returncode == 5 == etcdctl(cluster, "watch", "compact/me", "--rev", "1", check=False).returncode
    assert "watch was canceled (etcdserver: mvcc: required revision has been compacted)" in proc.stderr
    assert "Error: watch is canceled by the server" in proc.stderr
