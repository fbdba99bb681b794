"""Writes are on disk before they count: fsync happens before acknowledgement.

Three real pysyncobj members in this process, on loopback, each with the
durable journal. Every apply -- which is what acknowledges a client write --
checks that the entry is already fsynced on the applying member, and every
acknowledgement a follower sends the leader is checked against its journal.
"""
from __future__ import annotations

import errno
import logging
import os
import threading

import pytest

import metastore.raft.node as raft_node
from metastore.cluster import Membership
from metastore.raft import RaftConfig, RaftNode
from metastore.raft.journal import PREALLOCATE, DurableJournal, holds_entries
from metastore.testing import free_ports, wait_for


@pytest.fixture
def trio(tmp_path, monkeypatch):
    violations: list[str] = []
    acks: list[tuple[int, int]] = []  # (acknowledged index, durable index at send)
    real_send = raft_node.TCPTransport.send

    def checked_send(self, node, message):
        # What goes on the wire (the durable transport holds acknowledgements
        # back until an fsync, then hands them to pysyncobj's send).
        if message.get("type") == "next_node_idx" and message.get("success"):
            journal = self._syncObj._durable_journal
            acks.append((message["next_node_idx"] - 1, journal.durable_index))
        return real_send(self, node, message)

    monkeypatch.setattr(raft_node.TCPTransport, "send", checked_send)
    ports = free_ports(3)
    addresses = [f"127.0.0.1:{p}" for p in ports]
    membership = Membership("t", {f"n{i}": [f"http://{a}"] for i, a in enumerate(addresses)})
    nodes: list[RaftNode] = []
    applied: dict[int, list[int]] = {i: [] for i in range(3)}

    for i, address in enumerate(addresses):
        def apply(payload: bytes, index: int, i=i) -> int:
            journal = nodes[i].journal
            if journal.durable_index < index:
                violations.append(f"n{i} applied {index} with only {journal.durable_index} on disk")
            applied[i].append(index)
            return index

        cfg = RaftConfig(self_address=address, partner_addresses=[a for a in addresses if a != address],
                         bind_address=address, journal_file=str(tmp_path / f"n{i}.log"),
                         heartbeat_interval=0.05, election_timeout=0.5)
        nodes.append(RaftNode(cfg, i + 1, membership.id_of_address, apply))
    for n in nodes:
        n.start()
    yield nodes, violations, acks, applied
    for n in nodes:
        n.stop()


def test_every_applied_and_acknowledged_entry_is_already_fsynced(trio):
    nodes, violations, acks, applied = trio
    leader = wait_for(lambda: next((n for n in nodes if n.is_leader()), None), 15, "a leader")
    done = threading.Event()
    results: list[tuple[object, object]] = []
    lock = threading.Lock()
    total = 300

    def callback(result, error):
        with lock:
            results.append((result, error))
            if len(results) == total:
                done.set()

    fsyncs_before = leader.journal.fsync_count
    for i in range(total):
        leader.submit(f"entry {i}".encode(), callback)
    assert done.wait(30), f"only {len(results)} of {total} entries acknowledged"
    assert all(error is None for _, error in results)

    acked = sorted(result for result, _ in results)
    wait_for(lambda: all(set(acked) <= set(applied[i]) for i in range(3)), 15, "every member to apply")
    assert not violations, violations[:5]
    assert acks, "followers acknowledged entries"
    assert all(durable >= index for index, durable in acks), \
        [a for a in acks if a[1] < a[0]][:5]
    # Group commit: far fewer fsyncs than entries on the leader.
    fsyncs = leader.journal.fsync_count - fsyncs_before
    assert 0 < fsyncs < total, fsyncs
    # ... and on the followers, whose acknowledgements of the entries the
    # leader pipelined to them one message each share fsyncs.
    # (One fsync per message made it ~300 each here; sharing, a handful.)
    for follower in (n for n in nodes if n is not leader):
        assert follower.journal.fsync_count < total // 4, follower.journal.fsync_count


def test_journal_survives_reopen_and_cuts_a_torn_tail(tmp_path):
    path = str(tmp_path / "raft.log")
    j = DurableJournal(path)
    for i in range(1, 11):
        j.add(f"cmd{i}".encode(), i, 1)
    j.sync()
    j.add(b"unsynced", 11, 1)  # never synced: may be lost, must not corrupt
    j.setCurrentTerm(3, "127.0.0.1:1")
    j._destroy()
    with open(path, "ab") as f:
        f.write(b"\x10\x00\x00\x00garbage")  # a torn record
    j2 = DurableJournal(path)
    assert [e[1] for e in j2] == list(range(1, 12))
    assert j2.getCurrentTerm() == 3 and j2.getVotedForNodeId() == "127.0.0.1:1"
    j2.deleteEntriesFrom(4)  # positions: drops index 5 and later
    j2.add(b"new5", 5, 3)
    j2.sync()
    j2.deleteEntriesTo(2)
    j2._destroy()
    j3 = DurableJournal(path)
    assert [(e[0], e[1], e[2]) for e in j3] == [(b"cmd3", 3, 1), (b"cmd4", 4, 1), (b"new5", 5, 3)]
    assert j3.fsync_count == 0 and j3.durable_index == 5


def records(path: str) -> bytes:
    """The journal file's records: its bytes up to the preallocated zeros."""
    with open(path, "rb") as f:
        return f.read().rstrip(b"\0")


def test_the_journal_is_preallocated_and_a_cut_leaves_nothing_stale(tmp_path, caplog):
    """Records are written into space allocated ahead (zeros), which a reload
    takes as the end of the log, silently. A cut tail must not come back:
    a new record as long as the old one would otherwise be followed, on disk,
    by the old records after it, intact."""
    path = str(tmp_path / "raft.log")
    j = DurableJournal(path)
    assert os.path.getsize(path) >= PREALLOCATE and not holds_entries(path)
    for i in range(1, 6):
        j.add(b"cmd%d" % i, i, 1)
    j.sync()
    assert holds_entries(path) and os.path.getsize(path) >= PREALLOCATE
    j.deleteEntriesFrom(2)          # drop indexes 3..5
    j.add(b"new3", 3, 2)            # as long as cmd3's record
    j.sync()
    j._destroy()
    with caplog.at_level(logging.WARNING, logger="metastore.raft.journal"):
        reloaded = DurableJournal(path)
    assert [(e[0], e[1], e[2]) for e in reloaded] == [(b"cmd1", 1, 1), (b"cmd2", 2, 1), (b"new3", 3, 2)]
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    # More than the allocation ahead: the file grows by another step.
    big = b"x" * (PREALLOCATE // 4)
    for i in range(4, 10):
        reloaded.add(big, i, 2)
    reloaded.sync()
    reloaded._destroy()
    assert [e[1] for e in DurableJournal(path)] == list(range(1, 10))
    assert os.path.getsize(path) >= len(records(path)) + PREALLOCATE


def test_identical_resent_entries_are_not_cut_from_disk(tmp_path):
    """pysyncobj deletes and re-adds entries a leader resends; identical ones
    must stay durable (no truncate, no re-write), diverging ones replace the tail."""
    path = str(tmp_path / "raft.log")
    j = DurableJournal(path)
    for i in range(1, 6):
        j.add(f"cmd{i}".encode(), i, 1)
    j.sync()
    on_disk, fsyncs = records(path), j.fsync_count
    j.deleteEntriesFrom(2)          # drop indexes 3..5 ...
    for i in range(3, 6):           # ... and re-add them unchanged
        j.add(f"cmd{i}".encode(), i, 1)
    assert records(path) == on_disk and j.durable_index == 5
    j.sync()
    assert records(path) == on_disk and j.fsync_count == fsyncs
    j.deleteEntriesFrom(2)
    j.add(b"cmd3", 3, 1)
    j.add(b"other4", 4, 2)          # diverges: 4 and 5 are replaced
    j.sync()
    j._destroy()
    assert [(e[0], e[1]) for e in DurableJournal(path)] == [
        (b"cmd1", 1), (b"cmd2", 2), (b"cmd3", 3), (b"other4", 4)]


def test_acknowledgements_do_not_make_the_leader_resend(trio, monkeypatch):
    """With entries pipelined to followers, an acknowledgement of an older
    entry must not rewind the leader (pysyncobj's default), which makes it
    resend what is in flight and the followers cut and re-append their logs."""
    nodes, _violations, _acks, applied = trio
    leader = wait_for(lambda: next((n for n in nodes if n.is_leader()), None), 15, "a leader")
    cuts: list[tuple[int, int]] = []
    real_delete = DurableJournal.deleteEntriesFrom

    def counting_delete(self, entry_from):
        if entry_from < len(self):
            cuts.append((entry_from, len(self)))
        return real_delete(self, entry_from)

    monkeypatch.setattr(DurableJournal, "deleteEntriesFrom", counting_delete)
    total = 1500
    done = threading.Event()
    count = [0]
    lock = threading.Lock()

    def callback(result, error):
        assert error is None
        with lock:
            count[0] += 1
            if count[0] == total:
                done.set()

    term = leader.raft_status().term
    for i in range(total):
        leader.submit(b"x" * 200 + str(i).encode(), callback)
    assert done.wait(60), f"only {count[0]} of {total} entries acknowledged"
    assert leader.is_leader() and leader.raft_status().term == term, "the leader changed: no verdict"
    last = max(applied[nodes.index(leader)])
    wait_for(lambda: all(applied[i] and max(applied[i]) >= last for i in range(3)), 15, "every member to apply")
    assert cuts == [], f"followers cut their logs {len(cuts)} times: {cuts[:5]}"


def test_a_failed_write_leaves_the_journal_failed(tmp_path, monkeypatch):
    """After a write (or fsync) fails, nothing appended may ever be reported
    durable: a retry could skip the lost records and write later ones in
    their place, or fsync pages the kernel already dropped."""
    path = str(tmp_path / "raft.log")
    j = DurableJournal(path)
    told: list[OSError] = []
    j.on_failure = told.append  # the member stops on it (test_embed: a member whose log fails)
    for i in (1, 2):
        j.add(b"cmd%d" % i, i, 1)
    j.sync()
    for i in (3, 4):
        j.add(b"cmd%d" % i, i, 1)

    def full(*_args):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "pwrite", full)
        with pytest.raises(OSError):
            j.sync()
    assert j.failed and [e.errno for e in told] == [errno.ENOSPC]
    j.add(b"cmd5", 5, 1)
    assert j.needs_sync()
    with pytest.raises(OSError, match="failed earlier"):
        j.sync()
    assert len(told) == 1  # told once, not at every later attempt
    assert j.durable_index == 2
    j._destroy()  # pysyncobj's close: quietly, writing nothing more
    assert [e[1] for e in DurableJournal(path)] == [1, 2]


def test_a_failed_rewrite_or_meta_write_fails_the_journal(tmp_path, monkeypatch):
    """Log compaction (a rewrite of the file) and the term/vote record fail
    the journal like an append: pysyncobj rewrites in the middle of a tick,
    after appending entries and before they are synced."""
    path = str(tmp_path / "raft.log")
    j = DurableJournal(path)
    told: list[OSError] = []
    j.on_failure = told.append
    for i in (1, 2, 3):
        j.add(b"cmd%d" % i, i, 1)
    j.sync()

    def full(*_args):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(j, "_fsync", full)  # syncing the new copy of the log fails
        with pytest.raises(OSError):
            j.deleteEntriesTo(1)  # pysyncobj's compaction: drop the first entry
    assert j.failed and len(told) == 1
    assert not os.path.exists(path + ".tmp"), "a copy of the log left on a full disk"
    assert [e[1] for e in DurableJournal(path)] == [1, 2, 3]  # the old file, whole

    meta = DurableJournal(str(tmp_path / "other.log"))
    meta_told: list[OSError] = []
    meta.on_failure = meta_told.append
    with monkeypatch.context() as m:
        m.setattr(meta, "_fsync", full)
        with pytest.raises(OSError):
            meta.setCurrentTerm(5, "n2")
    assert meta.failed and len(meta_told) == 1


def test_a_leader_whose_compaction_fails_acknowledges_nothing_more(tmp_path, monkeypatch):
    """One member (it alone makes a majority), its log compaction failing
    on a full disk and every write after it too: no entry may be applied
    (which is what answers a client) unless it is on disk."""
    from metastore.raft import journal as journal_module

    disk_full = threading.Event()
    real_rewrite = journal_module.DurableJournal._rewrite_locked
    real_write = journal_module.DurableJournal._write_and_sync

    def rewrite(self, entries):
        if entries:
            disk_full.set()
        if disk_full.is_set():
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_rewrite(self, entries)

    def write(self):
        if disk_full.is_set():
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self)

    monkeypatch.setattr(journal_module.DurableJournal, "_rewrite_locked", rewrite)
    monkeypatch.setattr(journal_module.DurableJournal, "_write_and_sync", write)
    address = f"127.0.0.1:{free_ports(1)[0]}"
    membership = Membership("t", {"n0": [f"http://{address}"]})
    applied: list[int] = []

    def apply(payload: bytes, index: int) -> int:
        applied.append(index)
        return index

    class Frozen:
        def write(self, path: str) -> None:
            with open(path, "wb") as f:
                f.write(b"state")

    cfg = RaftConfig(self_address=address, partner_addresses=[], bind_address=address,
                     journal_file=str(tmp_path / "raft.log"), snapshot_file=str(tmp_path / "raft.snapshot"),
                     snapshot_requests=50, heartbeat_interval=0.05, election_timeout=0.3)
    node = RaftNode(cfg, 1, membership.id_of_address, apply, lambda _raft: Frozen(), lambda _path: None)
    failures: list[OSError] = []
    node.on_log_failure = failures.append
    node.start()
    try:
        wait_for(node.is_leader, 10, "the member to lead")
        answered: list[int] = []
        slots = threading.Semaphore(32)

        def done(result, error):
            if error is None:
                answered.append(result)
            slots.release()

        for n in range(2000):
            if failures or not slots.acquire(timeout=5):
                break
            node.submit(b"x%d" % n, done)
        wait_for(lambda: failures, 10, "the log failure to be reported")
    finally:
        node.stop()
    assert disk_full.is_set(), "the compaction never ran"
    on_disk = DurableJournal(str(tmp_path / "raft.log"))
    last = on_disk[-1][1] if len(on_disk) else 0
    assert answered and not [i for i in answered if i > last], (
        f"acknowledged beyond the last index on disk ({last}): {[i for i in answered if i > last][:5]}")
