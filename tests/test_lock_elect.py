"""`etcdctl lock` and `etcdctl elect` (etcd's concurrency recipes: leases,
Txn on create revision, Range with max_create_revision, Watch) on a real
3-member cluster, both engines."""
from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import threading
import time

import pytest

from metastore.testing import LocalCluster
from store_engines import ENGINES

pytestmark = pytest.mark.usefixtures("etcdctl_installed")


@pytest.fixture(scope="module", params=ENGINES)
def cluster(request):
    with LocalCluster(3, engine=request.param) as c:
        yield c


class Ctl:
    """A long-running etcdctl whose stdout lines are collected as they come."""

    def __init__(self, endpoint: str, *args: str) -> None:
        self.proc = subprocess.Popen([shutil.which("etcdctl"), "--endpoints", endpoint, *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=dict(os.environ, ETCDCTL_API="3"), start_new_session=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def next_line(self, timeout: float) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output within {timeout}s (exit {self.proc.poll()}, "
                                 f"stderr {self.stderr_if_exited()!r})") from None

    def wait_line(self, want: str, timeout: float) -> list[str]:
        """Lines up to and including `want`."""
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while not seen or seen[-1] != want:
            seen.append(self.next_line(max(0.01, deadline - time.monotonic())))
        return seen

    def silent_for(self, seconds: float) -> bool:
        try:
            self.lines.get(timeout=seconds)
            return False
        except queue.Empty:
            return True

    def stderr_if_exited(self) -> str:
        return self.proc.stderr.read() if self.proc.poll() is not None else ""

    def signal(self, sig: int) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_two_lock_holders_take_turns_and_a_killed_holder_releases_within_its_ttl(cluster):
    a = Ctl(cluster.members[0].endpoint, "lock", "--ttl", "3", "turns")
    b = c = None
    try:
        held_a = a.next_line(15)
        assert held_a.startswith("turns/"), held_a
        b = Ctl(cluster.members[1].endpoint, "lock", "--ttl", "3", "turns")
        assert b.silent_for(2), "a second holder got the lock while the first held it"
        # A crashed holder (no chance to unlock) loses the lock when its lease expires.
        killed = time.monotonic()
        a.signal(signal.SIGKILL)
        held_b = b.next_line(10)
        waited = time.monotonic() - killed
        assert held_b.startswith("turns/") and held_b != held_a
        assert waited <= 3 + 2, f"lock released {waited:.1f}s after the holder died (TTL 3s)"
        # A holder that exits cleanly releases at once.
        c = Ctl(cluster.members[2].endpoint, "lock", "--ttl", "30", "turns")
        assert c.silent_for(1.5)
        released = time.monotonic()
        assert b.signal(signal.SIGINT) == 0
        assert c.next_line(5).startswith("turns/")
        assert time.monotonic() - released < 3
    finally:
        for p in (a, b, c):
            if p is not None:
                p.stop()


def test_lock_runs_a_command_while_holding_it(cluster):
    proc = cluster.etcdctl("lock", "cmdlock", "--", "echo", "inside")
    assert proc.stdout == "inside\n"
    # Released afterwards: another taker gets it immediately.
    assert cluster.etcdctl("lock", "cmdlock", "--", "echo", "again", timeout=10).stdout == "again\n"


def test_elect_campaign_observe_and_resign_on_exit(cluster):
    observer = Ctl(cluster.members[2].endpoint, "elect", "-l", "chief")
    first = Ctl(cluster.members[0].endpoint, "elect", "chief", "alice")
    second = None
    try:
        assert first.next_line(15).startswith("chief/")
        assert first.next_line(5) == "alice"
        assert observer.wait_line("alice", 15)[-2].startswith("chief/")
        second = Ctl(cluster.members[1].endpoint, "elect", "chief", "bob")
        assert second.silent_for(2), "bob was elected while alice leads"
        assert first.signal(signal.SIGINT) == 0  # resigns on exit
        assert second.next_line(10).startswith("chief/")
        assert second.next_line(5) == "bob"
        assert observer.wait_line("bob", 10)[-2].startswith("chief/")
    finally:
        for p in (observer, first, second):
            if p is not None:
                p.stop()
